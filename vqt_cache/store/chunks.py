"""Reading and writing whole chunks of the image table's arrays on the caller's thread, without zarr's event loop.

zarr's synchronous API runs every write on one event-loop thread, so a writer's threads queue behind it and
extraction's host work stopped near 540 images a second however many cores it had. Here a chunk is encoded by the
array's own codecs (zarr's synchronous codec protocol: the very bytes zarr would write) and stored as zarr's local
store stores it (a temporary file renamed into place, so a chunk is written whole or not at all). The work
releases the GIL (the file write, zstd and blosc), so threads add up.

Reading is the mirror image (a missing chunk reads as the fill value, as in zarr), so that loading a cache into
memory is not bound by that thread either. Only a local store is read and written this way; an object store, or
a codec without a synchronous protocol, goes through zarr itself, whose bytes are the same.
"""

from __future__ import annotations

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
        store = array.store_path.store
        direct = (
            isinstance(store, LocalStore)
            and all(isinstance(c, SupportsSyncCodec) for c in self._codecs)
            and tuple(metadata.chunks[1:]) == tuple(array.shape[1:])
            and self._spec.fill_value == 0
        )
        self._folder = os.path.join(store.root, array.store_path.path) if direct else None

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
        try:
            with open(path, "rb") as handle:
                raw = np.empty(os.fstat(handle.fileno()).st_size, np.uint8)
                handle.readinto(raw)
        except FileNotFoundError:
            return np.zeros(self.array.metadata.chunks, self.array.dtype)
        data = default_buffer_prototype().buffer.from_array_like(raw)
        for codec in reversed(self._codecs):
            data = codec._decode_sync(data, self._spec)
        return data.as_numpy_array()

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
