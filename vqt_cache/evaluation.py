"""Using finished runs: load them from their folders, and measure them (`vqt-cache evaluate`) on a split, from the
cache or live from the images. Training measures its runs each epoch with the same `accuracy` and `cached_logits`.

A split the store holds is read from the cache. Any other split of the store's dataset (a test set that was never
cached) is evaluated live: the store's frozen backbone (rebuilt from the store's own weights) runs once over the
split's images, its keys/values (or LN1 inputs) go straight from that forward into the query path, and the queries
of every given run share that one pass, concatenated, exactly as in training. The linear probe reads f_0 and the
pooled baseline the per-layer means of the same forward. Live features are float32, whatever the store's dtype.

Results go into each run folder (eval/<split>.json, written whole). A live evaluation saves every run's logits so
far (eval/<split>.partial.pt) every SAVE_EVERY_S seconds; a re-run resumes after them, and deletes them once the
results are written. Image code is imported only for a live evaluation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqt_cache.backbones import Backbone, backbone_from_weights, resolve_device
from vqt_cache.batches import CachedSplit
from vqt_cache.errors import VQTError
from vqt_cache.files import (
    DamagedFile,
    load_tensors,
    load_torch,
    read_json,
    save_torch,
    write_json,
)
from vqt_cache.formats import WORKERS
from vqt_cache.model import CachedVQT, RunParameters, live_features
from vqt_cache.query import flush_subnormals, resolve_precision
from vqt_cache.recipe import DEVICE, FINAL_EVAL
from vqt_cache.run_folder import (
    COMPRESSED,
    RunConfig,
    compressed_folder,
    compression_record,
    load_finished,
    load_model,
    recorded_checksums,
)
from vqt_cache.store import Store, open_store

SAVE_EVERY_S = 60.0
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """A run's accuracy on one split; its `record()` is what <run>/eval/<split>.json holds."""

    dir: str
    split: str
    top1: float
    mean_class: float
    images: int
    live: bool  # computed by running the backbone on the images (the split was not cached, or live=True)
    store: str  # the store's URL
    run: dict[str, Any]  # the run's configuration (method, queries, lr, wd, seed)
    precision: str  # the query path's precision this evaluation ran in (float32 or bf16)
    compressed: dict[str, float] | None = None  # the compressed head's accuracy, where the run has one

    def record(self) -> dict[str, Any]:
        """The result as written into the run folder (and printed by `evaluate --json`, with the folder)."""
        record = {
            "run": self.run,
            "split": self.split,
            "live": self.live,
            "images": self.images,
            "store": self.store,
            "top1": self.top1,
            "mean_class": self.mean_class,
            "precision": self.precision,
        }
        return record if self.compressed is None else {**record, "compressed": self.compressed}


@dataclass(frozen=True, kw_only=True)
class LoadedRun:
    """A finished run folder, ready to use: its config, store, frozen backbone and trained model."""

    config: RunConfig  # config.json, as the records it was written from
    store: Store
    backbone: Backbone
    model: CachedVQT


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (over the classes present)."""
    correct = (logits.argmax(dim=1) == labels).double()
    per_class = [correct[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
    return {"top1": correct.mean().item(), "mean_class": float(np.mean(per_class))}


CompressedHead = tuple[torch.Tensor, torch.nn.Linear]  # a compressed run's kept feature indices and its head


def _extra_heads(compressed: list[CompressedHead | None] | None, device: torch.device) -> list[tuple]:
    """(run index, kept features, head) on `device` for each run that has a compressed head."""
    return [(i, c[0].to(device), c[1].to(device)) for i, c in enumerate(compressed or []) if c]


def _outputs(model: CachedVQT, features: list[torch.Tensor], extra: list[tuple]) -> list[torch.Tensor]:
    """Each run's logits from its features, then each compressed head's from the same features."""
    outputs = [run.head(f) for run, f in zip(model.runs, features, strict=True)]
    return outputs + [head(features[i][:, kept]) for i, kept, head in extra]


def cached_logits(
    model: CachedVQT, data: CachedSplit, compressed: list[CompressedHead | None] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every run's logits over a whole cached split (in store order, on the CPU), and the labels; then, for each run
    with a `compressed` (kept features, head), that head's logits, from the same features."""
    extra = _extra_heads(compressed, data.device)
    logits: list[list[torch.Tensor]] = [[] for _ in range(len(model.runs) + len(extra))]
    labels = []
    with torch.no_grad():
        for batch in data.batches():
            features = model.features(batch.final, batch.cache, None, batch.means, batch.probes)
            for i, out in enumerate(_outputs(model, features, extra)):
                logits[i].append(out.float().cpu())
            labels.append(batch.labels.cpu())
    return [torch.cat(lg) for lg in logits], torch.cat(labels)


def _trained_run(folder: Path) -> tuple[RunConfig, RunParameters]:
    """A finished run folder -> (its config, its trained Run)."""
    config, metrics = load_finished(folder)
    run = RunParameters.from_record(config.model, config.recipe.dropout)
    run.load_tensors(load_model(folder, config.model, metrics))
    return config, run


def load_runs(
    run_dirs: list[str | Path], store_url: str | None = None, precision: str | None = None
) -> tuple[list[dict], Store, Backbone, CachedVQT]:
    """Finished run folders of one store -> (their configs, the store, the frozen backbone, one model that
    serves every run in one pass of the query path).

    precision: the query path's ("float32", "bf16", "auto"); default: the one the runs trained with (float32 if
    they differ).
    """
    if not run_dirs:
        raise VQTError("no run folders given")
    configs, runs = zip(*(_trained_run(Path(d)) for d in run_dirs), strict=True)
    url = store_url or configs[0].store.url
    store = open_store(url)
    for folder, config in zip(run_dirs, configs, strict=True):
        if store_url is None and config.store.url != url:
            raise VQTError(
                f"run {folder} was trained on store {config.store.url}, not {url}: evaluate the runs of one "
                "store at a time"
            )
        if store.attrs["backbone"]["fingerprint"] != config.store.fingerprint:
            raise VQTError(f"run {folder} was trained on another store (backbone fingerprint differs from {store.url})")
    backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    for folder, run in zip(run_dirs, runs, strict=True):
        if (backbone.depth, backbone.dim) != (run.queries.prompts.shape[0], run.queries.prompts.shape[2]):
            raise DamagedFile(Path(folder) / "config.json", "its model does not fit the store's backbone")
    if precision is None:
        recorded = {c.recipe.precision for c in configs}
        precision = recorded.pop() if len(recorded) == 1 else "float32"
    precision = resolve_precision(precision, resolve_device("auto"))
    return list(configs), store, backbone, CachedVQT(backbone.blocks, list(runs), store.layout, precision).eval()


def load_run(run_dir: str | Path, store_url: str | None = None) -> LoadedRun:
    """A finished run folder -> its config, its store, the frozen backbone and the trained single-run model."""
    [config], store, backbone, model = load_runs([run_dir], store_url)
    return LoadedRun(config=config, store=store, backbone=backbone, model=model)


def evaluation_path(run_dir: str | Path, split: str, partial: bool = False) -> Path:
    """Where a run folder keeps its result on `split` (or, during a live evaluation, the logits so far)."""
    name = split.replace("/", "-")
    return Path(run_dir) / "eval" / (f"{name}.partial.pt" if partial else f"{name}.json")


def read_evaluation(run_dir: str | Path, split: str) -> dict[str, Any] | None:
    """A run's recorded result on `split`, or None if it was never evaluated there."""
    path = evaluation_path(run_dir, split)
    return read_json(path) if path.is_file() else None


def evaluate(
    run_dirs: list[str | Path] | str | Path,
    split: str = FINAL_EVAL,
    store_url: str | None = None,
    root: str | None = None,
    memory_budget: int | None = None,
    batch_size: int | None = None,
    device: str = DEVICE,
    workers: int = WORKERS,
    progress: Progress | None = None,
    live: bool | None = None,
    precision: str | None = None,
) -> list[Evaluation]:
    """Top-1 and mean per-class accuracy of every run on `split`; each result is also written into its run folder.

    live: None evaluates from the cache when the store holds the split and live otherwise; True always live.
    root: overrides the dataset root recorded in the store (live only).
    precision: the query path's (float32, bf16, auto); default: the one the runs trained with.
    """
    flush_subnormals()
    dirs = [run_dirs] if isinstance(run_dirs, str | Path) else list(run_dirs)
    target = resolve_device(device)
    configs, store, backbone, model = load_runs(dirs, store_url, precision and resolve_precision(precision, target))
    batch_size = batch_size or configs[0].recipe.batch_size
    num_classes = store.attrs["dataset"]["num_classes"]
    live = live or not store.has_split(split)
    compressed: list[dict | None] = [None] * len(dirs)
    heads = [compressed_head(d) for d in dirs]  # a compressed run's head is evaluated in the same pass
    if live:
        logits, labels = live_logits(
            model, backbone, store, split, dirs, root, batch_size, target, workers, progress, heads
        )
    else:
        data = CachedSplit(store.split(split), memory_budget, batch_size, target, num_classes, **model.reads())
        logits, labels = cached_logits(model.to(target), data, heads)
    owners = [*map(str, dirs), *(f"{d}/{COMPRESSED}" for d, head in zip(dirs, heads, strict=True) if head)]
    for owner, outputs in zip(owners, logits, strict=True):  # a NaN logit has no argmax: never an accuracy
        if not bool(outputs.isfinite().all()):
            raise VQTError(f"run {owner} gives non-finite logits on split {split!r}; no accuracy is reported for it")
    logits, packed = logits[: len(dirs)], logits[len(dirs) :]
    for i, packed_logits in zip([i for i, h in enumerate(heads) if h], packed, strict=True):
        compressed[i] = accuracy(packed_logits, labels, num_classes)
    results = []
    for folder, config, run_logits, packed_result in zip(dirs, configs, logits, compressed, strict=True):
        result = Evaluation(
            dir=str(folder),
            split=split,
            live=live,
            images=len(labels),
            store=store.url,
            run=dataclasses.asdict(config.run),
            precision=model.path.precision,
            compressed=packed_result,
            **accuracy(run_logits, labels, num_classes),
        )
        _save(evaluation_path(folder, split), result.record())
        evaluation_path(folder, split, partial=True).unlink(missing_ok=True)  # ours: the logits of a resumed run
        results.append(result)
    return results


def compressed_head(run_dir: str | Path) -> CompressedHead | None:
    """A compressed run's (kept feature indices, head) from <run>/compressed/, or None if it was not compressed."""
    record, out = compression_record(run_dir), compressed_folder(run_dir)
    if not record.is_file():
        return None
    report = read_json(record)
    try:
        k, F = int(report["features_kept"]), int(report["features_before"])
        C = int(report["head_params_after"]) // (k + 1)
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedFile(record, f"missing or wrong entry {exc}") from exc
    shapes = {"head.weight": (C, k), "head.bias": (C,), "feature_index": (k,)}
    checksums = recorded_checksums(report, record, ("model.safetensors",))
    path = out / "model.safetensors"
    tensors = load_tensors(path, shapes, True, checksums["model.safetensors"], f"{COMPRESSED}/{record.name}")
    return compressed_linear(path, tensors, F)


def compressed_linear(path: Path, tensors: dict[str, torch.Tensor], features: int) -> CompressedHead:
    """The (kept feature indices, head) of a compressed head's tensors (feature_index, head.weight, head.bias) from
    the file `path`, checked to fit each other and a run of `features` features."""
    kept, weight, bias = tensors["feature_index"], tensors["head.weight"], tensors["head.bias"]
    k = len(kept)
    fits = kept.dtype == torch.int64 and tuple(weight.shape) == (len(bias), k)
    if not fits or k and not 0 <= kept.min() <= kept.max() < features:
        raise DamagedFile(path, "its compressed head does not fit its kept features")
    head = torch.nn.Linear(k, len(bias))
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return kept, head.eval()


def _save(path: Path, value: Any) -> None:
    """Write a result (JSON) or partial logits (torch) whole, into the run folder's eval/ (made on first use)."""
    path.parent.mkdir(exist_ok=True)
    if path.suffix == ".json":
        write_json(path, value)
    else:
        save_torch(path, value)


def _resume_point(
    dirs: list[str | Path], split: str, items_hash: str, owners: list[int]
) -> tuple[int, list[torch.Tensor]]:
    """Images every output has logits for already, and those logits: each run's, then each compressed head's
    (owners[j]: the run of compressed head j). 0 unless every run has a partial file of this very split."""
    runs, heads = [], []
    for i, folder in enumerate(dirs):
        path = evaluation_path(folder, split, partial=True)
        if not path.is_file():
            return 0, []
        state = load_torch(path)
        if state.get("items") != items_hash or not isinstance(state.get("logits"), torch.Tensor):
            return 0, []
        if i in owners and not isinstance(state.get("compressed"), torch.Tensor):
            return 0, []
        runs.append(state["logits"])
        if i in owners:
            heads.append(state["compressed"])
    saved = runs + heads
    done = min(len(s) for s in saved)
    return done, [s[:done] for s in saved]


def live_logits(
    model: CachedVQT,
    backbone: Backbone,
    store: Store,
    split: str,
    dirs: list[str | Path],
    root: str | None,
    batch_size: int,
    device: torch.device,
    workers: int,
    progress: Progress | None,
    compressed: list[CompressedHead | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every run's logits (on the CPU) and the labels over a split of the store's dataset, from one frozen forward
    per batch of images; then, for each run with a `compressed` (kept features, head), that head's logits."""
    extra = _extra_heads(compressed, device)
    from vqt_cache.datasets import ImageSplit, index_hash, reopen_dataset

    attrs = store.attrs
    recorded = attrs["dataset"]
    dataset = reopen_dataset(recorded, root)
    items = dataset.split(split)
    labels = torch.tensor([label for _, label in items])
    if ((labels < 0) | (labels >= recorded["num_classes"])).any():
        raise VQTError(f"split {split!r} has labels outside the {recorded['num_classes']} classes of the store")
    items_hash = index_hash(items)
    owners = [i for i, _, _ in extra]
    done, logits = _resume_point(dirs, split, items_hash, owners)
    logits = [[saved] for saved in logits] or [[] for _ in range(len(model.runs) + len(extra))]
    loader = torch.utils.data.DataLoader(
        ImageSplit(dataset, items[done:], attrs["preprocessing"]), batch_size=batch_size, num_workers=workers
    )
    backbone.model.to(device)
    model.to(device).eval()
    label = f"evaluate {split} live ({len(model.runs)} run{'s' if len(model.runs) > 1 else ''})"
    if progress:
        progress(label, done, len(items))
    saved_at = time.monotonic()
    with torch.no_grad():
        for images, ok, errors in loader:
            if not ok.all():
                raise VQTError(f"{errors[int(np.argmin(ok.numpy()))]}; fix or remove it, then re-run to resume")
            features = live_features(model, backbone, images.to(device), store.forward_precision)
            for i, out in enumerate(_outputs(model, features, extra)):
                logits[i].append(out.float().cpu())
            done += len(images)
            if progress:
                progress(label, done, len(items))
            if time.monotonic() - saved_at > SAVE_EVERY_S and done < len(items):
                for i, folder in enumerate(dirs):
                    state = {"items": items_hash, "logits": torch.cat(logits[i])}
                    if i in owners:
                        state["compressed"] = torch.cat(logits[len(dirs) + owners.index(i)])
                    _save(evaluation_path(folder, split, partial=True), state)
                saved_at = time.monotonic()
    return [torch.cat(run_logits) for run_logits in logits], labels
