"""Stage-two data: batches from a store split, in the layer-major layout the query path reads.

A split is held in memory when it fits the memory budget, and streamed image by image from the store otherwise
(one Zarr chunk per image, so random access is cheap). Either way a batch is built the same way, one copy per
image that casts to float32 and moves the batch axis inside, so both modes give bit-identical batches. A
background thread prepares the next batches while the current one trains. No image code, no timm.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vqt_cache.errors import VQTError
from vqt_cache.store import Split


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
        prefetch: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        self.split, self.batch_size, self.prefetch, self.device = split, batch_size, prefetch, torch.device(device)
        self.rows = np.flatnonzero(split.valid())
        self.labels = torch.from_numpy(split.labels())
        if (self.labels[self.rows] < 0).any():
            raise VQTError(f"split {split.name!r} has no labels (label -1); it can be evaluated on, not trained on")
        self.final = torch.from_numpy(split.group["final"][:])
        self.row_shape = split.features.shape[1:]
        self.batch_axis = 2 if split.layout == "kv" else 1  # (L, 2, B, ...) or (L, B, ...)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.row_bytes = int(np.prod(self.row_shape)) * split.features.dtype.itemsize
        budget = default_memory_budget() if memory_budget is None else memory_budget
        self.in_memory = len(self.rows) * self.row_bytes <= budget
        self._features = None
        if not self.in_memory:  # the budget holds the batches being prepared and trained on instead
            batch_bytes = batch_size * int(np.prod(self.row_shape)) * 4
            self.prefetch = max(1, min(prefetch, budget // max(batch_bytes, 1) - 1))
        if self.in_memory:
            self._features = torch.from_numpy(split.features[:])
            self._check_finite(self._features[self.rows], self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def _check_finite(self, features: torch.Tensor, rows: np.ndarray) -> None:
        finite = torch.isfinite(features.reshape(len(rows), -1)).all(dim=1)
        if not finite.all():
            bad = rows[int(torch.nonzero(~finite)[0])]
            raise VQTError(
                f"the cache of split {self.split.name!r} holds NaN or Inf at row {bad} "
                f"({self.split.sources[bad]}); re-extract it"
            )

    def _row(self, row: int) -> torch.Tensor:
        if self._features is not None:
            return self._features[row]
        return torch.from_numpy(self.split.features[int(row)])

    def make_batch(self, rows: np.ndarray) -> Batch:
        """One copy per image: cast to float32 and place it at its batch position of the layer-major cache."""
        shape = list(self.row_shape)
        shape.insert(self.batch_axis, len(rows))
        cache = torch.empty(shape, dtype=torch.float32)
        for b, row in enumerate(rows):
            cache.select(self.batch_axis, b).copy_(self._row(row))
        if not self.in_memory:
            moved = cache.movedim(self.batch_axis, 0)
            self._check_finite(moved, rows)
        index = torch.from_numpy(rows)
        return Batch(self.final[index].to(self.device), cache.to(self.device), self.labels[index].to(self.device), rows)

    def batches(self, order: np.ndarray | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` rows in `order` (default: store order), prepared ahead on a thread."""
        rows = self.rows if order is None else order
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        ready: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for chunk in chunks:
                    if not put(self.make_batch(chunk)):
                        return
                put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's order of rows: a permutation fixed by (seed, epoch) alone, so resumes replay it."""
        return np.random.default_rng([seed, epoch]).permutation(self.rows)
