"""Stage-two batches: a store split served as query-path batches, in the layer-major layout the query path reads.

Features stay in their stored dtype (int8 with float32 copies of their scales, float16 or float32) until a batch
is made. A split that fits the memory budget lives on the training device, image-major; a batch is gathered there
by casting each row straight into its slot of the layer-major batch (int8 times its scales in the same pass), in
the query path's dtype. A split that does not fit is streamed: a background thread reads the batch's rows from
the store (one Zarr chunk per image, a few at once, for object stores) into a host staging buffer (pinned, for a
GPU), copies it to the device on a side stream while the current batch computes, and the batch is widened there the
same way. Both modes widen the same stored values with the same ops, so they give bit-identical batches. No image
code, no timm.

Runs that read no cached tokens read only what they need: f_0 for the linear probe, and each layer's mean token
for the pooled baseline, computed once per split while its shards are checked.

Nothing is trusted unchecked: on opening, every shard the split reads is checked against the checksum recorded
when it was written (features, final features, valid flags), and its rows and labels against their hash, so a
missing chunk (which Zarr would read as zeros), an altered byte or a truncated chunk is an error, never training
data. In memory this hashes what was loaded anyway; streamed, it is one sequential read before the first epoch.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vqt_cache.errors import VQTError
from vqt_cache.formats import batch_axis, group_for
from vqt_cache.heads import token_means
from vqt_cache.recipe import BATCH_SIZE
from vqt_cache.schedule import epoch_order
from vqt_cache.store import Split, read_ahead

NO_PROBES = (
    "holds no probe arrays, which the attentive and linear-multi probes read: extract with --probes into another --out"
)

# Streamed rows are read this many at a time: object stores answer concurrent requests (one per chunk) far
# faster than a sequence of them, and local disks do not mind.
READERS = 4


def default_memory_budget() -> int:
    """Half of this machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass
class Batch:
    final: torch.Tensor  # (B, D) float32
    cache: torch.Tensor | None  # (L, 2, B, H, N, dh) or (L, B, N, D) in the query path's dtype; None: not read
    means: torch.Tensor | None  # (B, L, D) float32 per-layer mean tokens (the pooled baseline); None: not read
    labels: torch.Tensor  # (B,) int64
    rows: np.ndarray  # split position of each image
    probes: dict[str, torch.Tensor] | None = None  # float32 tokens, class_tokens, patch_mean; None: not read


def widen(values: torch.Tensor, scales: torch.Tensor | None, group: int, out: torch.Tensor) -> torch.Tensor:
    """Stored features -> `out` (float32 or bfloat16, same shape) in one pass: a cast, and for int8 the product with
    each channel group's scale (..., C // group). Into float32 this is exactly the stored value; into bfloat16 the
    scale is rounded to bfloat16 first (a relative error of at most 2^-8 per value, against 2^-9 for bfloat16
    itself)."""
    if scales is None:
        return out.copy_(values)
    channels = values.shape[-1]
    grouped = (channels // group, group)
    torch.mul(values.unflatten(-1, grouped), scales.to(out.dtype).unsqueeze(-1), out=out.unflatten(-1, grouped))
    return out


def _put_rows(target: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """target[index] = rows, as one block copy where `index` is a run of consecutive rows (a shard without skipped
    images: five times faster than indexing on the CPU)."""
    if not len(index):
        return
    if bool((index.diff() == 1).all()):
        first = int(index[0])
        target[first : first + len(index)].copy_(rows)
    else:
        target[index.to(target.device)] = rows.to(target.device)


class CachedSplit:
    """The valid rows of one store split, served as query-path batches in a given order."""

    def __init__(
        self,
        split: Split,
        memory_budget: int | None = None,
        batch_size: int = BATCH_SIZE,
        device: torch.device | str = "cpu",
        num_classes: int | None = None,
        dtype: torch.dtype = torch.float32,
        cache: bool = True,
        means: bool = False,
        probes: bool = False,
    ) -> None:
        """Serve `split` on `device`; batches carry the cache in `dtype` if `cache`, the mean tokens if `means`, the
        probe arrays (float32) if `probes` (held on the device in their stored dtype, whatever the budget).

        The split's features are held on the device if they and two widened batches fit `memory_budget` bytes
        (and, on a GPU, 80% of its free memory); else they are streamed through two staging batches (stored
        dtype, on the host), one filled while the other is widened.
        """
        self.split, self.batch_size, self.device, self.dtype = split, batch_size, torch.device(device), dtype
        self.rows = np.flatnonzero(split.valid())  # split positions (not rows of the store's image table)
        labels = torch.from_numpy(split.labels())
        if not len(self.rows):
            raise VQTError(f"split {split.name!r} has no valid images (every image was skipped at extraction)")
        if (labels[self.rows] < 0).any():
            raise VQTError(f"split {split.name!r} has no labels (label -1); it can be evaluated on, not trained on")
        if num_classes is not None and (labels[self.rows] >= num_classes).any():
            raise VQTError(
                f"split {split.name!r} has labels beyond the {num_classes} classes of the run; re-extract it"
            )
        self.num_classes = int(labels.max()) + 1
        self.labels = labels.to(self.device)
        self.final = torch.from_numpy(split.final()).to(self.device)
        self._resident = np.full(split.num_samples, -1)  # split position -> index among the valid rows
        self._resident[self.rows] = np.arange(len(self.rows))
        self.reads_cache = cache
        images = split.images
        self.layout, self.group, self.row_shape = split.layout, images.group_size, split.row_shape
        self.batch_axis = batch_axis(split.layout)  # (L, 2, B, ...) or (L, B, ...)
        self.stored_dtype = torch.from_numpy(np.empty(0, images.features.dtype)).dtype
        self.scale_shape = tuple(images.scales.shape[1:]) if split.quantized else None
        self.row_bytes = int(np.prod(self.row_shape)) * self.stored_dtype.itemsize
        if self.scale_shape:  # scales are held in float32
            self.row_bytes += int(np.prod(self.scale_shape)) * 4
        self.batch_rows = max(min(batch_size, len(self.rows)), 1)  # a buffer's batch size
        self.batch_bytes = self.batch_rows * int(np.prod(self.row_shape)) * dtype.itemsize  # one widened batch
        self.staging_bytes = self.batch_rows * self.row_bytes
        budget = default_memory_budget() if memory_budget is None else memory_budget
        features = len(self.rows) * self.row_bytes
        fits = features + 2 * self.batch_bytes <= budget
        if fits and self.device.type == "cuda":
            fits = features + 2 * self.batch_bytes <= 0.8 * torch.cuda.mem_get_info(self.device)[0]
        self.in_memory = fits or not cache
        self.means = torch.empty((len(self.rows), *self._means_shape()), device=self.device) if means else None
        if probes and not images.probes:
            raise VQTError(f"the store of split {split.name!r} {NO_PROBES}")
        self.probes: dict[str, torch.Tensor] | None = {} if probes else None
        self._values = self._scales = None
        self._widened: list[torch.Tensor] = []  # two, alternating
        self._staging: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if cache and fits:
            self.buffers = 0  # staging batches
            self._load()
        else:  # one sequential read checks every shard (and computes the means); the features are not kept
            self._scan()
            # two staging batches overlap reading with compute; more did not train faster (bench training,
            # memory), and the rest of the budget is left to the readers' transient copies
            self.buffers = 2 if cache else 0

    def _means_shape(self) -> tuple[int, int]:
        """(L, D) of one image's mean tokens."""
        if self.layout == "kv":
            L, _, H, _, dh = self.row_shape
            return L, H * dh
        L, _, D = self.row_shape
        return L, D

    def _batch_shape(self, rows: int, row_shape: tuple[int, ...]) -> list[int]:
        shape = list(row_shape)
        shape.insert(self.batch_axis, rows)
        return shape

    @property
    def resident_bytes(self) -> int:
        """Bytes held for the whole run: the features (in memory), the means and the batch buffers."""
        features = len(self.rows) * self.row_bytes if self._values is not None else 0
        means = self.means.numel() * 4 if self.means is not None else 0
        means += sum(t.numel() * t.element_size() for t in (self.probes or {}).values())
        return features + means + self.buffers * self.staging_bytes + 2 * self.batch_bytes * self.reads_cache

    def __len__(self) -> int:
        return len(self.rows)

    # -- reading the store -------------------------------------------------------------------------------------
    def _checked_blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Shard by shard, checked: (indices among the valid rows, their stored features, their float32 scales);
        the probe arrays, where read, are kept on the way."""
        for here, features, scales, probes in self.split.checked_shards():
            index = self._resident[here]
            keep = index >= 0
            if keep.all():
                keep = slice(None)  # no skipped image here: a view, not a copy of the shard
            if self.probes is not None:
                self._add_probes(torch.from_numpy(index[keep]), {k: v[keep] for k, v in probes.items()})
            yield (
                torch.from_numpy(index[keep]),
                torch.from_numpy(features[keep]),
                None if scales is None else torch.from_numpy(scales[keep]).float(),
            )

    def _add_means(self, index: torch.Tensor, values: torch.Tensor, scales: torch.Tensor | None) -> None:
        if self.means is not None:
            rows = widen(values, scales, self.group, torch.empty(values.shape))
            self.means[index.to(self.device)] = token_means(rows, self.layout).to(self.device)

    def _add_probes(self, index: torch.Tensor, probes: dict[str, np.ndarray]) -> None:
        for name, values in probes.items():
            values = torch.from_numpy(values)
            if name not in self.probes:
                dtype = torch.float32 if values.dtype == torch.float16 and name.endswith("scale") else values.dtype
                self.probes[name] = torch.empty((len(self.rows), *values.shape[1:]), dtype=dtype, device=self.device)
            self.probes[name][index.to(self.device)] = values.to(self.device, self.probes[name].dtype)

    def _batch_probes(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """A batch's probe arrays in float32 (patch tokens widened: int8 times their scales)."""
        if self.probes is None:
            return None
        tokens = self.probes["tokens"][index]
        scales = self.probes["tokens_scale"][index] if "tokens_scale" in self.probes else None
        widened = widen(tokens, scales, group_for(tokens.shape[-1]), torch.empty(tokens.shape, device=self.device))
        return {"tokens": widened, **{k: self.probes[k][index] for k in ("class_tokens", "patch_mean")}}

    def _load(self) -> None:
        """Hold the valid rows on the device, in their stored dtype (scales in float32)."""
        n = len(self.rows)
        self._values = torch.empty((n, *self.row_shape), dtype=self.stored_dtype, device=self.device)
        if self.scale_shape:
            self._scales = torch.empty((n, *self.scale_shape), device=self.device)
        for index, values, scales in self._checked_blocks():
            _put_rows(self._values, index, values)
            if scales is not None:
                _put_rows(self._scales, index, scales)
            self._add_means(index, values, scales)

    def _scan(self) -> None:
        for index, values, scales in self._checked_blocks():
            self._add_means(index, values, scales)

    def _read(self, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One streamed row, as stored (checked at open, so a failure now means the store changed since)."""
        try:
            values, scales = self.split.images.stored_row(int(self.split.rows()[position]))
        except Exception as exc:
            raise VQTError(
                f"split {self.split.name!r} row {position} cannot be read any more; run `vqt-cache verify`"
            ) from exc
        values = torch.from_numpy(values)
        scales = None if scales is None else torch.from_numpy(scales)
        if not torch.isfinite(values if scales is None else scales).all():
            raise VQTError(
                f"the cache of split {self.split.name!r} holds NaN or Inf at row {position} "
                f"({self.split.sources[position]}); re-extract it"
            )
        return values, scales

    def _read_rows(self, positions: np.ndarray) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
        """The rows in order, read from the store READERS at a time."""
        return read_ahead(self._read, positions, READERS)

    # -- batches -----------------------------------------------------------------------------------------------
    def _widened_buffer(self, slot: int) -> torch.Tensor:
        """Widened batch buffer `slot` (0 or 1), allocated once: a fresh 1 GB tensor per batch costs more in page
        faults than the copy itself."""
        while len(self._widened) <= slot:
            shape = self._batch_shape(self.batch_rows, self.row_shape)
            self._widened.append(torch.empty(shape, dtype=self.dtype, device=self.device))
        return self._widened[slot]

    def _staging_buffer(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Host staging buffer `slot`: one batch of stored values (and float32 scales), pinned for a GPU."""
        while len(self._staging) <= slot:
            values = torch.empty(self._batch_shape(self.batch_rows, self.row_shape), dtype=self.stored_dtype)
            scales = torch.empty(self._batch_shape(self.batch_rows, self.scale_shape)) if self.scale_shape else None
            if self.device.type == "cuda":
                values, scales = values.pin_memory(), scales if scales is None else scales.pin_memory()
            self._staging.append((values, scales))
        return self._staging[slot]

    def _batch(self, positions: np.ndarray, cache: torch.Tensor | None) -> Batch:
        """The batch of the given split positions, around its cache."""
        index = torch.from_numpy(positions).to(self.device)
        resident = torch.from_numpy(self._resident[positions]).to(self.device)
        means = None if self.means is None else self.means[resident]
        return Batch(self.final[index], cache, means, self.labels[index], positions, self._batch_probes(resident))

    def batches(self, order: np.ndarray | None = None) -> Iterator[Batch]:
        """Batches of `batch_size` rows in `order` (default: store order).

        Batch buffers are reused (two widened ones, alternating): a batch's tensors stay valid until the caller
        asks for the batch after the next one.
        """
        rows = self.rows if order is None else order
        chunks = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        if not self.reads_cache:
            yield from (self._batch(chunk, None) for chunk in chunks)
        elif self._values is not None:  # gathered inline: a second thread would fight the compute for the cores
            for k, chunk in enumerate(chunks):
                yield self._gathered(chunk, k % 2)
        else:
            yield from self._streamed(chunks)

    def _gathered(self, positions: np.ndarray, slot: int) -> Batch:
        """A batch from the rows held on the device: each row cast straight into its batch position (one pass, and
        faster than an index_select into a staging batch and a cast; int8 times its scales in the same pass)."""
        cache = self._widened_buffer(slot).narrow(self.batch_axis, 0, len(positions))
        for b, row in enumerate(self._resident[positions].tolist()):
            scales = None if self._scales is None else self._scales[row]
            widen(self._values[row], scales, self.group, cache.select(self.batch_axis, b))
        return self._batch(positions, cache)

    def _streamed(self, chunks: list[np.ndarray]) -> Iterator[Batch]:
        """A thread reads the next batches into staging buffers (and copies them to the GPU on a side stream)
        while the caller trains on the current one."""
        ready: queue.Queue = queue.Queue()
        free: queue.Queue = queue.Queue()
        for slot in range(self.buffers):
            free.put(slot)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None

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
                    values, scales = (
                        v.narrow(self.batch_axis, 0, len(chunk)) if v is not None else None
                        for v in self._staging_buffer(slot)
                    )
                    for b, (row_values, row_scales) in enumerate(self._read_rows(chunk)):
                        values.select(self.batch_axis, b).copy_(row_values)
                        if scales is not None:
                            scales.select(self.batch_axis, b).copy_(row_scales)
                    if cuda:
                        with torch.cuda.stream(side):
                            values = values.to(self.device, non_blocking=True)
                            scales = scales if scales is None else scales.to(self.device, non_blocking=True)
                        side.synchronize()  # the host buffer is free again; the device copy is handed over
                    ready.put((chunk, slot, values, scales))
                ready.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                ready.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            k = 0
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                chunk, slot, values, scales = item
                del item
                if cuda:  # made on the side stream, read on this one: the allocator must know
                    for tensor in (values, scales):
                        if tensor is not None:
                            tensor.record_stream(torch.cuda.current_stream(self.device))
                cache = self._widened_buffer(k % 2).narrow(self.batch_axis, 0, len(chunk))
                batch = self._batch(chunk, widen(values, scales, self.group, cache))
                free.put(slot)  # on the CPU, widened (synchronously); on a GPU, the copy finished before it came
                del values, scales
                yield batch
                k += 1
        finally:
            stop.set()
            thread.join()

    def shuffled(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's order of rows: a permutation fixed by (seed, epoch) alone, so resumes replay it."""
        return epoch_order(seed, epoch, self.rows)
