"""Stage one: run the frozen backbone once over a dataset and write the store (docs/design.md §5, §8).

Work is done shard by shard of the store's image table (each image once, however many splits list it). Each
shard is read in the same fixed batches whatever the run, so a resumed or multi-process extraction writes the very
bytes a single uninterrupted run would. Under torchrun, rank r owns the shards s with s % world_size == r; rank 0
writes all metadata before any rank writes data.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vqt_cache import package_versions
from vqt_cache.backbones import Backbone, load_backbone, resolve_device
from vqt_cache.config import ExtractConfig
from vqt_cache.datasets import (
    Dataset,
    ImageSplit,
    index_hash,
    open_extracted,
    preprocessing,
)
from vqt_cache.errors import VQTError
from vqt_cache.formats import (
    FORWARD_PRECISION,
    WRITERS,
    forward_dtype,
    group_for,
    quantized,
)
from vqt_cache.quantize import quantize
from vqt_cache.query import resolve_precision
from vqt_cache.store import (
    Images,
    Store,
    check_resumable,
    create_store,
    forward_precision,
    hash_rows,
)


@dataclass
class SplitSummary:
    name: str
    images: int
    written: int
    skipped: list[str]
    seconds: float
    bytes_written: int


@dataclass
class ExtractSummary:
    store: str
    splits: list[SplitSummary]
    nothing_to_do: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Progress: called with (split name, images done in this run, images to do in this run)
Progress = Callable[[str, int, int], None]


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@contextmanager
def _creation_lock(url: str):
    """An exclusive lock around creating a local store's metadata (chunk writes are atomic renames already).

    Object stores get no lock: run their concurrent writers under torchrun, whose rank 0 alone creates.
    """
    if "://" in url:
        yield
        return
    path = Path(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store_attrs(
    backbone: Backbone, dataset: Dataset, cfg: ExtractConfig, precision: str = FORWARD_PRECISION
) -> dict[str, Any]:
    """The store's root attributes; `precision`: the frozen forward's, resolved for the device ("auto" is not)."""
    return {
        "backbone": backbone.describe(),
        "preprocessing": preprocessing(backbone.data_config, dataset.resize, cfg.resample),
        "dataset": dataset.describe(),
        "layout": cfg.layout,
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        **({"probes": True} if cfg.probes else {}),  # absent otherwise: stores made before it read the same
        **({"precision": precision} if precision != FORWARD_PRECISION else {}),  # the same for float32
        "versions": package_versions(),
    }


def _check_space(cfg: ExtractConfig, dataset: Dataset, split_names: list[str]) -> None:
    """Refuse, before anything is written, a store the free space at its destination cannot hold."""
    if not cfg.check_space:
        return
    from vqt_cache.formats import size
    from vqt_cache.plan import plan_extract

    plan = plan_extract(dataclasses.replace(cfg, splits=tuple(split_names)), opened=dataset)
    if not plan.fits:
        raise VQTError(
            f"the store needs {size(plan.total_bytes)} more, but {size(plan.free_bytes)} are free at "
            f"{cfg.store_url}; free some space, choose another --out, cache fewer --splits (a test split can be "
            "evaluated live), or pass --no-space-check"
        )


@dataclass(frozen=True)
class _SplitIndex:
    """A split as the dataset lists it now: its images' keys ("<source>#<content digest>"), labels and hash."""

    name: str
    keys: list[str]
    labels: list[int]
    digest: str


def _index_split(dataset: Dataset, name: str) -> _SplitIndex:
    items = dataset.split(name)
    keys = [dataset.image_key(source) for source, _ in items]
    labels = [label for _, label in items]
    return _SplitIndex(name, keys, labels, index_hash(list(zip(keys, labels, strict=True))))


def _check_split(store: Store, dataset: Dataset, index: _SplitIndex) -> None:
    """Refuse, writing nothing, a split the store holds with other images (sources, labels or contents) than the
    dataset lists now, unless only never-written images changed (an unreadable image fixed since)."""
    if not store.has_split(index.name):
        return
    split = store.split(index.name, require_complete=False)
    if split.group.attrs["index_hash"] == index.digest:
        return
    if not store.rekey_split(split, index.keys, index.labels, index.digest, dry_run=True):
        raise VQTError(
            f"split {index.name!r} in {store.url} lists other images than {dataset.name!r} at "
            f"{dataset.root} does now (other files, labels or contents); extract into another --out"
        )


def _prepare_split(store: Store, index: _SplitIndex) -> None:
    """Create a split's metadata (new images join the image table), or record the fixed images of one that
    `_check_split` accepted."""
    if store.has_split(index.name):
        split = store.split(index.name, require_complete=False)
        if split.group.attrs["index_hash"] != index.digest:
            store.rekey_split(split, index.keys, index.labels, index.digest)
        return
    store.create_split(index.name, index.keys, index.labels, index.digest)


def _shard_batches(images: Images, shards: list[int], batch_size: int) -> list[list[int]]:
    """The fixed batches of the given shards: a batch never crosses a shard boundary."""
    batches = []
    for shard in shards:
        start, stop = images.shard_range(shard)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


QUEUED_BYTES = 2**31  # rows waiting to be written, at most (the caller blocks beyond; a batch always passes)


class ShardWriter:
    """Writes shards of the image table in the background, on `writers` threads, while the caller computes the next
    batches: a shard's rows are written (`Images.write_images`), fed in row order to its checksum and, once all of
    that succeeded, the shard is marked complete (`Images.finish_shard`), all on one thread; the next shard goes to
    the next thread. Rows on a GPU are copied into pinned host memory without waiting; the threads wait for that
    copy, the caller does not. At most QUEUED_BYTES of rows wait; a failure is raised by the next call."""

    def __init__(self, images: Images, writers: int = WRITERS) -> None:
        self.images = images
        self._stack = ExitStack()
        self._lanes = [self._stack.enter_context(ThreadPoolExecutor(max_workers=1)) for _ in range(writers)]
        self._shards: dict[int, tuple[ThreadPoolExecutor, Any, list[Future]]] = {}  # lane, checksum, its tasks
        self._queued: deque[tuple[Future, int]] = deque()  # every task not yet collected, with its rows' bytes
        self._bytes = 0
        self._turn = itertools.count()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # lets what was submitted finish: a shard is complete or not, never half marked

    def submit(self, shard: int, start: int, rows: torch.Tensor, scales: torch.Tensor | None) -> None:
        """Write rows start.. of `shard` (and int8 scales) and feed them to its checksum, in the background."""
        copied = None
        if rows.device.type == "cuda":  # into pinned memory (torch does that for a non-blocking copy to the host)
            rows, scales = (t if t is None else t.to("cpu", non_blocking=True) for t in (rows, scales))
            copied = torch.cuda.Event()
            copied.record()

        def write(checksum: Any) -> None:
            if copied is not None:
                copied.synchronize()
            values, scale = rows.numpy(), None if scales is None else scales.numpy()
            for i in range(len(values)):  # each row hashed right after its write, while the CPU's cache holds it
                row, row_scale = values[i : i + 1], None if scale is None else scale[i : i + 1]
                self.images.write_images(start + i, row, row_scale)
                hash_rows(checksum, row, row_scale)

        if shard not in self._shards:
            lane = self._lanes[next(self._turn) % len(self._lanes)]  # in turn, whichever shards a rank owns
            self._shards[shard] = (lane, self.images.row_checksum(), [])
        lane, checksum, tasks = self._shards[shard]
        tasks.append(lane.submit(write, checksum))
        size = rows.nbytes + (0 if scales is None else scales.nbytes)
        self._queue(tasks[-1], size)

    def finish(self, shard: int, final: np.ndarray, valid: np.ndarray, probes: dict | None) -> None:
        """Mark `shard` complete, with its final features, valid flags and probes, once its rows are written and
        hashed; a shard whose writes failed is left incomplete (and the failure raised)."""
        lane, checksum, tasks = self._shards.pop(shard)

        def finish() -> None:
            for task in tasks:  # done already (the same thread ran them): re-raises a failed write
                task.result()
            self.images.finish_shard(shard, final, valid, checksum.digest(), probes)

        self._queue(lane.submit(finish), 0)

    def _queue(self, task: Future, size: int) -> None:
        self._queued.append((task, size))
        self._bytes += size
        while self._queued and (self._queued[0][0].done() or self._bytes > QUEUED_BYTES):
            self._collect()

    def _collect(self) -> None:
        task, size = self._queued.popleft()
        self._bytes -= size
        task.result()  # waits, and re-raises a failure

    def wait(self) -> None:
        """Every shard finished so far is marked complete (a failure is re-raised)."""
        while self._queued:
            self._collect()


def extract_shards(
    backbone: Backbone,
    images: Images,
    dataset: Dataset,
    shards: list[int],
    attrs: dict,
    cfg: ExtractConfig,
    device: torch.device,
    advance: Callable[[int], None],
) -> list[str]:
    """Write the given whole shards of the image table; returns the sources of skipped bad images.

    Image writes and the checksum run in the background (`ShardWriter`) while the next batch computes; a
    shard's completion flag is written only after all of its writes and hashing have finished.
    """
    sources = [images.source(row) for row in range(images.num_rows)]  # a row between blocks is never read
    loader = torch.utils.data.DataLoader(
        ImageSplit(dataset, [(source, 0) for source in sources], attrs["preprocessing"]),
        num_workers=cfg.workers,
        batch_sampler=_shard_batches(images, shards, cfg.batch_size),
    )
    batches = iter(loader)
    dtype = getattr(torch, forward_dtype(cfg.dtype))  # int8: quantized after the forward
    precision = forward_precision(attrs)  # the store's: a resumed store keeps its own
    skipped: list[str] = []
    with ShardWriter(images, cfg.writers) as writer:
        for shard in shards:
            start, stop = images.shard_range(shard)
            finals, valid, probes = [], [], []
            position = start
            while position < stop:
                batch, ok, errors = next(batches)
                bad = [i for i, good in enumerate(ok.tolist()) if not good]
                if bad and cfg.on_bad_image == "fail":
                    raise VQTError(f"{errors[bad[0]]}; fix or remove it, or pass --on-bad-image skip")
                skipped += [sources[position + i] for i in bad]
                batch_probes = {} if cfg.probes else None
                final, layers = backbone.forward_cache(
                    batch.to(device), layout=cfg.layout, dtype=dtype, probes=batch_probes, precision=precision
                )
                if bad:
                    layers[bad] = 0  # a skipped image's row stays zero, and `valid` marks it
                _check_finite(final, layers, position, sources, cfg.dtype)
                if batch_probes is not None:
                    probes.append(_stored_probes(batch_probes, bad, position, sources, cfg.dtype))
                scales = None
                if quantized(cfg.dtype):  # on the device, before the copy: a quarter of the bytes cross
                    layers, scales = quantize(layers, "int8", group_for(layers.shape[-1]))
                    _check_finite_scales(scales, position, sources)
                writer.submit(shard, position, layers, scales)
                finals.append(final.float().cpu().numpy())
                valid.append(ok.numpy().astype(np.uint8))
                position += len(batch)
                if position == stop:  # marked complete in the background, once its rows are written and hashed
                    shard_probes = {k: np.concatenate([p[k] for p in probes]) for k in probes[0]} if probes else None
                    writer.finish(shard, np.concatenate(finals), np.concatenate(valid), shard_probes)
                advance(len(batch))
        writer.wait()
    return skipped


# a store keeps its dtype: features it cannot hold need a new store
FLOAT32_ADVICE = "extract with --dtype float32 into another --out (a store keeps the dtype it was made with)"


def _check_finite(final: torch.Tensor, layers: torch.Tensor, start: int, sources: list[str], dtype: str) -> None:
    """Stop before writing a batch whose features overflow the store's dtype (or are NaN): such a store would read
    as complete, and stage two would refuse it later."""
    bounds = torch.stack([bound.float() for t in (layers, final) for bound in torch.aminmax(t)])  # NaN propagates
    if bool(torch.isfinite(bounds).all()):  # one device sync per batch
        return
    finite = torch.isfinite(layers.flatten(1)).all(dim=1) & torch.isfinite(final).all(dim=1)
    row = start + int((~finite).nonzero()[0])
    hint = FLOAT32_ADVICE if dtype != "float32" else "check the backbone's weights"
    raise VQTError(
        f"the features of image {sources[row]} (row {row}) are not finite in {dtype} (overflow or NaN); "
        f"nothing of that shard was marked complete: {hint}"
    )


def _stored_probes(
    probes: dict[str, torch.Tensor], bad: list[int], start: int, sources: list[str], dtype: str
) -> dict[str, np.ndarray]:
    """A batch's probe arrays as the store keeps them (store.probe_shapes): the patch tokens in the store's dtype
    (int8 with float16 scales), the class tokens and patch mean in float32; zero for a skipped image."""
    stored = {}
    tokens = probes["tokens"].float()
    _check_finite(probes["patch_mean"], tokens.flatten(1), start, sources, dtype)
    if quantized(dtype):
        stored["tokens"], stored["tokens_scale"] = quantize(tokens, "int8", group_for(tokens.shape[-1]))
        _check_finite_scales(stored["tokens_scale"], start, sources)
    else:
        stored["tokens"] = tokens.to(getattr(torch, dtype))
    stored |= {"class_tokens": probes["class_tokens"].float(), "patch_mean": probes["patch_mean"].float()}
    for values in stored.values():
        values[bad] = 0
    return {name: values.cpu().numpy() for name, values in stored.items()}


def _check_finite_scales(scales: torch.Tensor, start: int, sources: list[str]) -> None:
    """int8 stores keep a float16 scale per token and channel group: features beyond float16's range (65504 × 127)
    overflow it. Stop before writing such a batch, as for float16 features."""
    if bool(torch.isfinite(scales).all()):  # one device sync per batch
        return
    row = start + int((~torch.isfinite(scales.flatten(1)).all(dim=1)).nonzero()[0])
    raise VQTError(
        f"the features of image {sources[row]} (row {row}) are too large for int8's float16 scales (beyond "
        f"65504 × 127); nothing of that shard was marked complete: {FLOAT32_ADVICE}"
    )


def extract(cfg: ExtractConfig, progress: Progress | None = None) -> ExtractSummary:
    """Run stage one; resumable, idempotent and torchrun-aware. Returns what this process did."""
    rank, world = _distributed()
    dataset = open_extracted(cfg.dataset, cfg.root, cfg.columns, cfg.val_fraction)
    split_names = list(cfg.splits) if cfg.splits else list(dataset.splits)
    for name in split_names:
        dataset.split(name)  # unknown or empty splits fail before anything is written
    backbone = load_backbone(cfg.backbone, weights=cfg.weights, **cfg.model_kwargs)
    if cfg.probes and not backbone.has_class_token:
        raise VQTError(f"backbone {cfg.backbone!r} has no class token, which --probes stores for linear-multi")
    device = resolve_device(cfg.device)
    backbone.model.to(device)
    attrs = store_attrs(backbone, dataset, cfg, resolve_precision(cfg.precision, device))
    url = cfg.store_url

    if rank == 0:
        weights = {k: v.detach().cpu().numpy() for k, v in backbone.model.state_dict().items()}
        with _creation_lock(url):  # other extract processes on the same store wait here, then find it made
            # every check that can refuse runs before the first write: the dataset's identity (in create_store,
            # before it writes), each split's images, the free space
            indexes = [_index_split(dataset, name) for name in split_names]
            existing = check_resumable(url, attrs)
            if existing is not None:
                for index in indexes:
                    _check_split(existing, dataset, index)
            _check_space(cfg, dataset, split_names)  # reads the store: never while another process adds to it
            store = create_store(url, attrs, weights, shard_size=cfg.shard_size)
            for index in indexes:
                _prepare_split(store, index)
    _barrier(world)
    store = create_store(url, attrs, {}) if rank else store  # opens and checks; rank 0 already has it

    summaries = []
    nothing_to_do = True
    images = store.images
    claimed: set[int] = set()  # shards an earlier split of this run writes (an image two splits share, once)
    for name in split_names:
        split = store.split(name, require_complete=False)
        shards = [s for s in split.incomplete_shards() if s not in claimed]
        claimed.update(shards)
        mine = [s for s in shards if s % world == rank]
        todo = sum(images.shard_range(s)[1] - images.shard_range(s)[0] for s in mine)
        nothing_to_do &= not mine
        done = 0
        skipped: list[str] = []
        started = time.perf_counter()

        def advance(n: int, name=name, todo=todo) -> None:
            nonlocal done
            done += n
            if progress:
                progress(name, done, todo)

        if progress:
            progress(name, 0, todo)
        if mine:
            try:
                skipped = extract_shards(backbone, images, dataset, mine, attrs, cfg, device, advance)
            except OSError as exc:  # a full disk, a lost mount, permissions: the finished shards stay finished
                raise VQTError(
                    f"writing to {url} failed ({exc.strerror or exc}); fix that and re-run the same command to resume"
                ) from exc
        per_image = store.stored_bytes_per_image()  # every array written: layers, final, valid, probes
        summaries.append(
            SplitSummary(name, split.num_samples, todo, skipped, time.perf_counter() - started, todo * per_image)
        )
    _barrier(world)
    return ExtractSummary(url, summaries, nothing_to_do)
