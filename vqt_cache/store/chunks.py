"""Reading and writing whole chunks of the image table's arrays on the caller's thread, without zarr's event loop.

zarr's synchronous API runs every write on one event-loop thread, so a writer's threads queue behind it and
extraction's host work stopped near 540 images a second however many cores it had. Here a chunk is encoded by the
array's own codecs (zarr's synchronous codec protocol: the very bytes zarr would write) and stored as zarr's local
store stores it (a temporary file renamed into place, so a chunk is written whole or not at all). The work
releases the GIL (the file write, zstd and blosc), so threads add up.

Reading is the mirror image (a missing chunk reads as the fill value, as in zarr), so that loading a cache into
memory is not bound by that thread either; `read_whole` reads any array so (the frozen weights: 343 MB of ViT-B/16
in 0.3-0.5 s instead of zarr's 0.9 s, paid by every stage-two command). Only a local store is read and written this
way; an object store, or a codec without a synchronous protocol, goes through zarr itself, whose bytes are the same.
"""

from __future__ import annotations

import itertools
import math
import os
import uuid

import numpy as np
import zarr
from zarr.abc.codec import SupportsSyncCodec
from zarr.core.array_spec import ArrayConfig
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import NDBuffer
from zarr.storage import LocalStore


class Chunks:
    """Reads and writes whole chunks of `array` along its first axis (the image table's arrays: a chunk is one
    image's row, or one shard's rows), as zarr would: `empty=True` writes a chunk that holds only the fill value
    too (the feature rows: zarr would otherwise compare each chunk with it first), `empty=False` removes such a
    chunk instead."""

    def __init__(self, array: zarr.Array, empty: bool) -> None:
        metadata = array.metadata
        self.array, self.empty = array, empty
        self._rows = metadata.chunks[0]  # rows a chunk holds
        self._spec = metadata.get_chunk_spec((0,) * array.ndim, ArrayConfig.from_dict({}), default_buffer_prototype())
        self._codecs = list(metadata.codecs)
        self._length = array.shape[0]
        self._rest = (0,) * (array.ndim - 1)
        direct = tuple(metadata.chunks[1:]) == tuple(array.shape[1:]) and self._spec.fill_value == 0
        self._folder = _folder(array) if direct else None

    @property
    def direct(self) -> bool:
        """Whether chunks are written here (a local store) rather than by zarr."""
        return self._folder is not None

    def encode(self, chunk: np.ndarray) -> memoryview:
        """One chunk's bytes as zarr stores them."""
        data = NDBuffer.from_ndarray_like(np.ascontiguousarray(chunk, dtype=self.array.dtype))
        for codec in self._codecs:
            data = codec._encode_sync(data, self._spec)
        return memoryview(data.as_buffer_like())

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 (a new, writable array)."""
        if start < 0 or stop > self._length:
            raise IndexError(f"rows {start}..{stop - 1} are outside {self.array.path} ({self._length} rows)")
        if not self.direct:
            return self.array[start:stop]
        first, last = start // self._rows, -(-stop // self._rows)
        chunks = [self._decode(self._path(index)) for index in range(first, last)]
        rows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        return rows[start - first * self._rows : stop - first * self._rows]

    def _decode(self, path: str) -> np.ndarray:
        chunk = _decode(path, self._codecs, self._spec)
        return np.zeros(self.array.metadata.chunks, self.array.dtype) if chunk is None else chunk

    def _path(self, index: int) -> str:
        return os.path.join(self._folder, self.array.metadata.encode_chunk_key((index, *self._rest)))

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write rows start.. , which begin a chunk and fill whole chunks, or end where no row of the last chunk is
        ever written (the image table's shards end at a block's end): the rest of that chunk is the fill value."""
        stop = start + len(rows)
        if start < 0 or stop > self._length or start % self._rows:
            raise IndexError(
                f"rows {start}..{stop - 1} do not begin a chunk of {self.array.path} ({self._length} rows)"
            )
        if not self.direct:
            self.array.with_config({"write_empty_chunks": self.empty})[start:stop] = rows
            return
        for at in range(0, len(rows), self._rows):
            chunk = rows[at : at + self._rows]
            if len(chunk) < self._rows:
                chunk = np.concatenate([chunk, np.zeros((self._rows - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            path = self._path((start + at) // self._rows)
            if self.empty or chunk.any():
                _put(path, self.encode(chunk))
            elif os.path.exists(path):
                os.unlink(path)


def read_whole(array: zarr.Array) -> np.ndarray:
    """The whole of `array` (any regular chunking), its chunks read and decoded on this thread from a local store,
    else by zarr. A missing chunk reads as the fill value, as in zarr."""
    metadata = array.metadata
    folder = _folder(array) if array.ndim else None
    if folder is None:
        return array[...]
    spec = metadata.get_chunk_spec((0,) * array.ndim, ArrayConfig.from_dict({}), default_buffer_prototype())
    codecs = list(metadata.codecs)
    out = np.empty(array.shape, array.dtype)  # every region is written below (a fill ahead costs a third more)
    scratch = np.empty(math.prod(metadata.chunks) * array.dtype.itemsize, np.uint8)  # one chunk's bytes, reused
    grid = [range(-(-size // chunk)) for size, chunk in zip(array.shape, metadata.chunks, strict=True)]
    for index in itertools.product(*grid):
        region = tuple(
            slice(i * c, min((i + 1) * c, size)) for i, c, size in zip(index, metadata.chunks, array.shape, strict=True)
        )
        chunk = _decode(os.path.join(folder, metadata.encode_chunk_key(index)), codecs, spec, scratch)
        if chunk is None:
            out[region] = spec.fill_value
        else:
            out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]  # an edge chunk is stored whole
    return out


def _folder(array: zarr.Array) -> str | None:
    """Where a local store keeps `array`'s chunks, if they can be read and written here; None: through zarr."""
    store = array.store_path.store
    direct = isinstance(store, LocalStore) and all(isinstance(c, SupportsSyncCodec) for c in array.metadata.codecs)
    return os.path.join(store.root, array.store_path.path) if direct else None


def _decode(path: str, codecs: list, spec, scratch: np.ndarray | None = None) -> np.ndarray | None:
    """One stored chunk, decoded (None: no such chunk); its bytes are read into `scratch` where they fit (the
    decoded chunk may then be a view of it)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            raw = scratch[:size] if scratch is not None and size <= len(scratch) else np.empty(size, np.uint8)
            handle.readinto(raw)
    except FileNotFoundError:
        return None
    data = default_buffer_prototype().buffer.from_array_like(raw)
    for codec in reversed(codecs):
        data = codec._decode_sync(data, spec)
    return data.as_numpy_array()


def _put(path: str, data: memoryview) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
