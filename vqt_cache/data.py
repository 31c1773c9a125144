"""Stage-two data: batches from a store split, in the layer-major layout the query path reads.

A split is held in memory when it fits the memory budget, and streamed image by image from the store otherwise
(one Zarr chunk per image, so random access is cheap; a few images are read at once, for object stores). Either
way a batch is built the same way, one copy per image that casts to float32 and moves the batch axis inside, so
both modes give bit-identical batches. A background thread prepares the next batches while the current one
trains. No image code, no timm.

Nothing is trusted unchecked: on opening, every shard the split reads is checked against the checksum recorded
when it was written (features, final features, valid flags), and its rows and labels against their hash, so a
missing chunk (which Zarr would read as zeros), an altered byte or a truncated chunk is an error, never training
data. In memory this hashes what was loaded anyway; streamed, it is one sequential read before the first epoch.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vqt_cache.errors import VQTError
from vqt_cache.quantize import dequantize
from vqt_cache.store import Split

# Streamed rows are read this many at a time: object stores answer concurrent requests (one per chunk) far
# faster than a sequence of them, and local disks do not mind.
READERS = 4


def default_memory_budget() -> int:
    """Half of this machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass
class Batch:
    final: torch.Tensor  # (B, D) float32
    cache: torch.Tensor  # (L, 2, B, H, N, dh) or (L, B, N, D), float32
    labels: torch.Tensor  # (B,) int64
    rows: np.ndarray  # store row of each image


class CachedSplit:
    """The valid rows of one store split, served as query-path batches in a given order."""

    def __init__(
        self,
        split: Split,
        memory_budget: int | None = None,
        batch_size: int = 128,
        device: torch.device | str = "cpu",
        num_classes: int | None = None,
    ) -> None:
        """Hold the split in memory if its valid rows and two batches fit `memory_budget` bytes, else stream it.

        The budget covers the resident features and the float32 batch buffers: two in memory (one trained on,
        one being filled), and as many as fit (at least two) when streaming, to read ahead.
        """
        self.split, self.batch_size, self.device = split, batch_size, torch.device(device)
        self.rows = np.flatnonzero(split.valid())  # rows of the split (not of the store's image table)
        self.labels = torch.from_numpy(split.labels())
        self.final = torch.from_numpy(split.final())
        if not len(self.rows):
            raise VQTError(f"split {split.name!r} has no valid images (every image was skipped at extraction)")
        if (self.labels[self.rows] < 0).any():
            raise VQTError(f"split {split.name!r} has no labels (label -1); it can be evaluated on, not trained on")
        if num_classes is not None and (self.labels[self.rows] >= num_classes).any():
            raise VQTError(
                f"split {split.name!r} has labels beyond the {num_classes} classes of the run; re-extract it"
            )
        images = split.images
        self.row_shape = split.row_shape
        self.batch_axis = 2 if split.layout == "kv" else 1  # (L, 2, B, ...) or (L, B, ...)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.row_bytes = int(np.prod(self.row_shape)) * images.features.dtype.itemsize
        if split.quantized:  # int8 values and their float16 scales, dequantized row by row into the batch
            self.row_bytes += int(np.prod(images.scales.shape[1:])) * 2
        budget = default_memory_budget() if memory_budget is None else memory_budget
        self.batch_rows = max(min(batch_size, len(self.rows)), 1)  # a buffer's batch size
        self.batch_bytes = self.batch_rows * int(np.prod(self.row_shape)) * 4  # one float32 batch buffer
        self.in_memory = len(self.rows) * self.row_bytes + 2 * self.batch_bytes <= budget
        self._features = self._scales = None
        self._pool: list[torch.Tensor] = []
        if self.in_memory:
            self.buffers = 2
            features, scales = split.load()  # every shard read is checked against its checksum
            self._features = torch.from_numpy(features)
            self._scales = None if scales is None else torch.from_numpy(scales)
        else:  # the rows being read ahead come out of the budget too
            split.check_shards()
            self.buffers = max(2, (budget - READERS * self.row_bytes) // self.batch_bytes)

    @property
    def resident_bytes(self) -> int:
        """Bytes held for the whole run: the features (in memory) and the batch buffers."""
        features = len(self.rows) * self.row_bytes if self._features is not None else 0
        return features + self.buffers * self.batch_bytes

    def __len__(self) -> int:
        return len(self.rows)

    def _check_finite(self, features: torch.Tensor, row: int) -> None:
        if not torch.isfinite(features).all():
            raise VQTError(
                f"the cache of split {self.split.name!r} holds NaN or Inf at row {row} "
                f"({self.split.sources[row]}); re-extract it"
            )

    def _read(self, row: int) -> torch.Tensor:
        try:
            features = torch.from_numpy(self.split.row(int(row)))
        except Exception as exc:  # checked at open, so the store changed since: say so, in one sentence
            raise VQTError(
                f"split {self.split.name!r} row {row} cannot be read any more; run `vqt-cache verify`"
            ) from exc
        self._check_finite(features, row)
        return features

    def _rows(self, rows: np.ndarray) -> Iterable[torch.Tensor]:
        """The rows' features in order: from memory, or read from the store READERS at a time."""
        if self._features is not None:
            if self._scales is None:
                yield from (self._features[row] for row in rows)
            else:
                group = self.split.images.group_size
                yield from (dequantize(self._features[row], self._scales[row], group) for row in rows)
            return
        with ThreadPoolExecutor(READERS) as pool:
            ahead: deque = deque()
            for row in rows:
                ahead.append(pool.submit(self._read, row))
                if len(ahead) == READERS:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()

    def new_buffer(self) -> torch.Tensor:
        """A float32 layer-major buffer for one full batch."""
        shape = list(self.row_shape)
        shape.insert(self.batch_axis, self.batch_rows)
        return torch.empty(shape, dtype=torch.float32)

    def make_batch(self, rows: np.ndarray, buffer: torch.Tensor | None = None) -> Batch:
        """One copy per image: cast to float32 and place it at its batch position of the layer-major cache.

        The cache is written into `buffer` (reused across batches: a fresh 1 GB tensor costs more in page
        faults than the copy itself) or a new one; a short last batch is a narrowed view of it.
        """
        cache = (self.new_buffer() if buffer is None else buffer).narrow(self.batch_axis, 0, len(rows))
        for b, features in enumerate(self._rows(rows)):
            cache.select(self.batch_axis, b).copy_(features)
        index = torch.from_numpy(rows)
        return Batch(self.final[index].to(self.device), cache.to(self.device), self.labels[index].to(self.device), rows)

    def batches(self, order: np.ndarray | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` rows in `order` (default: store order).

        Batch buffers are reused (at most `self.buffers` exist): a batch's tensors stay valid until the caller asks
        for the batch after the next one (when it asks for batch k+1, batch k-1's buffer is refilled).
        """
        rows = self.rows if order is None else order
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if self.in_memory:  # a memory copy: done inline, as a second thread would fight the compute for the cores
            for k, chunk in enumerate(chunks):
                yield self.make_batch(chunk, self._buffer(k % 2))
            return
        yield from self._prefetched(chunks)

    def _buffer(self, slot: int) -> torch.Tensor:
        """Batch buffer number `slot`, allocated once and kept for every later epoch."""
        while len(self._pool) <= slot:
            self._pool.append(self.new_buffer())
        return self._pool[slot]

    def _prefetched(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        """Streaming: a thread reads and builds the next batches while the caller trains on the current one."""
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for slot in range(self.buffers):
            free.put(slot)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in chunks:
                    while True:
                        if stop.is_set():
                            return
                        try:
                            slot = free.get(timeout=0.1)
                            break
                        except queue.Empty:
                            continue
                    ready.put((self.make_batch(chunk, self._buffer(slot)), slot))
                ready.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                ready.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        previous = None
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                batch, buffer = item
                del item
                yield batch
                del batch
                if previous is not None:
                    free.put(previous)  # the caller now holds this batch and has dropped the one before
                previous = buffer
        finally:
            stop.set()
            thread.join()

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's order of rows: a permutation fixed by (seed, epoch) alone, so resumes replay it."""
        return np.random.default_rng([seed, epoch]).permutation(self.rows)
