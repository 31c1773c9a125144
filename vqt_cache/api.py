"""The Python API: what the command line does, as functions with keyword arguments and typed results.

`import vqt_cache as vqt` gives the names of `vqt_cache.__all__` from here, lazily: the package itself imports no
torch. Each function calls the same library code as its command, so a notebook and the CLI produce the same stores
and run folders:

    summary = vqt.extract(backbone="vit_b16", dataset="digits", weights="random", splits=["train800", "val200"])
    runs = vqt.train(store=summary.store, queries=[1, 10], lr=[0.5, 0.25], epochs=20)
    [result] = vqt.evaluate(runs[0].dir, split="test")

`extract`, `train` and `evaluate` show progress bars in a terminal or a notebook (`progress=True`, the default;
nothing where output is not interactive, as under pytest), or call `progress(description, done, total)` if it is a
function, or show nothing with `progress=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqt_cache import recipe
from vqt_cache.backbones import BACKBONES
from vqt_cache.config import ExtractConfig, TrainConfig
from vqt_cache.datasets import Dataset, register_dataset
from vqt_cache.datasets import list_datasets as list_datasets  # re-exported
from vqt_cache.errors import VQTError as VQTError  # re-exported
from vqt_cache.evaluation import Evaluation, LoadedRun
from vqt_cache.evaluation import evaluate as _evaluate
from vqt_cache.evaluation import load_run as _load_run
from vqt_cache.extraction import ExtractSummary
from vqt_cache.extraction import extract as _extract
from vqt_cache.prediction import Prediction
from vqt_cache.prediction import predict as _predict
from vqt_cache.progress import Update, console, shown
from vqt_cache.store import Store, dequantized, open_store
from vqt_cache.training import TrainedRun, grid
from vqt_cache.training import train as _train


@dataclass(frozen=True, kw_only=True)
class SplitTensors:
    """A store split as tensors, in split order: features float32 (int8 dequantized), f_0, labels, valid flags."""

    features: torch.Tensor  # (n, L, N, D) hidden or (n, L, 2, H, N, dh) kv
    final: torch.Tensor  # (n, D)
    labels: torch.Tensor  # (n,)
    valid: torch.Tensor = field(repr=False)  # (n,) bool: False where extraction skipped an unreadable image


@contextmanager
def _shown(progress: Update | bool, unit: str) -> Iterator[Update | None]:
    """The callback work reports to: a rich display (True: only where output is interactive), the caller's, or none."""
    if callable(progress):
        yield progress
    elif progress:
        with shown(unit, console(stderr=True), plain=False) as update:
            yield update
    else:
        yield None


def _listed(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def extract(
    *,
    backbone: str,
    dataset: str | Dataset,
    root: str | Path | None = None,
    splits: Sequence[str] | None = None,
    out: str | None = None,
    weights: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
    progress: Update | bool = True,
    **options: Any,
) -> ExtractSummary:
    """Stage one: run the frozen backbone once over `dataset` and write (or resume) a store.

    dataset: a name (`list_datasets()`) or your own `Dataset`, which is registered under its name (live
    evaluation reopens it by that name in this process). options: any other field of `ExtractConfig`
    (vqt_cache/config.py, where each is described once), e.g. layout="kv", dtype="float16", probes=True.
    """
    if isinstance(dataset, Dataset):
        own = dataset
        register_dataset(own.name, lambda _root: own)
        dataset = own.name
    cfg = ExtractConfig(
        backbone=backbone,
        dataset=dataset,
        root=None if root is None else str(root),
        splits=None if splits is None else tuple(splits),
        out=out,
        weights=None if weights is None else str(weights),
        model_kwargs=dict(model_kwargs or {}),
        **options,
    )
    with _shown(progress, "img") as update:
        return _extract(cfg, progress=update)


def train(
    *,
    store: str,
    queries: int | Sequence[int] = recipe.QUERIES,
    method: str | Sequence[str] = recipe.METHOD,
    lr: float | Sequence[float] | None = None,
    wd: float | Sequence[float] | None = None,
    seed: int | Sequence[int] = recipe.SEED,
    recipe: str | Sequence[str] = recipe.RECIPE,
    blocks: int | Sequence[int] = recipe.LINEAR_MULTI_BLOCKS,
    progress: Update | bool = True,
    **options: Any,
) -> list[TrainedRun]:
    """Stage two: every combination of the given lists (the fields of `RunSpec`), one pass over the cache per seed.

    options: any other field of `TrainConfig` (vqt_cache/config.py, where each is described once), e.g.
    epochs=20, eval_split="none", memory_budget=2**30 (bytes).
    """
    runs = grid(
        _listed(method), _listed(queries), _listed(lr), _listed(wd), _listed(seed), _listed(recipe), _listed(blocks)
    )
    cfg = TrainConfig(store=store, runs=runs, **options)
    with _shown(progress, "step") as update:
        return _train(cfg, progress=update)


def evaluate(
    runs: str | Path | Sequence[str | Path],
    *,
    split: str = recipe.FINAL_EVAL,
    progress: Update | bool = True,
    **options: Any,
) -> list[Evaluation]:
    """Accuracy of finished runs (of one store) on `split`: from the cache when the store holds it, else live.

    options: store_url, root, memory_budget, batch_size, device, workers, live, precision.
    """
    with _shown(progress, "img") as update:
        return _evaluate(runs, split, progress=update, **options)


def predict(
    run: str | Path,
    images: Sequence[str | Path],
    *,
    store: str | None = None,
    batch_size: int | None = None,
    device: str = recipe.DEVICE,
) -> list[Prediction]:
    """Classify image files with a finished run: the frozen backbone and the trained queries, live."""
    options = {} if batch_size is None else {"batch_size": batch_size}
    return _predict(run, list(images), store, device=device, **options)


def load_run(run: str | Path, *, store: str | None = None) -> LoadedRun:
    """A finished run folder -> its config, store, frozen backbone and trained model (`store`: if it moved)."""
    return _load_run(run, store)


def read_split(store: str | Store, split: str) -> SplitTensors:
    """A whole split of a store as tensors, each shard checked against its checksum first. Mind the size: a
    ViT-B/16 image is 7 MB in float32."""
    opened = open_store(store) if isinstance(store, str) else store
    part = opened.split(split)
    features, scales = part.load()
    if scales is not None:
        features = dequantized(features, scales, opened.images.group_size)
    return SplitTensors(
        features=torch.from_numpy(features.astype(np.float32, copy=False)),
        final=torch.from_numpy(np.asarray(part.final(), dtype=np.float32)),
        labels=torch.from_numpy(part.labels().astype(np.int64)),
        valid=torch.from_numpy(part.valid()),
    )


def list_backbones() -> dict[str, str]:
    """The short backbone names and the timm models they stand for (any other timm ViT name works as is)."""
    return {short: timm_name for short, (timm_name, _) in BACKBONES.items()}
