"""`vqt-cache plan`: what a store will hold and cost, before anything is written.

For one extract command line, or for every dataset of a pipeline (whose training and validation splits are cached
and whose test split is evaluated live unless its store holds it already): images per split, cached or evaluated
live, the images each cached split adds to the store (an image is stored once, however many splits list it),
bytes per image for the layout and dtype, the total still to write, and the free space where the store goes.
Sizes come from the dataset on disk, or, when it is not there yet, from its official release's published split
sizes. `extract` runs the same plan and refuses to start a store that cannot fit.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vqt_cache.backbones import geometry
from vqt_cache.config import ExtractConfig
from vqt_cache.datasets import Dataset, open_dataset, open_extracted, published_sizes
from vqt_cache.errors import VQTError
from vqt_cache.formats import DEFAULT_DTYPE, DEFAULT_LAYOUT
from vqt_cache.store import Store, found_at, key_source, open_store, stored_bytes


@dataclass
class SplitPlan:
    name: str
    images: int | None  # None: unknown (a live split of a dataset that cannot be opened here)
    cached: bool  # False: evaluated live, never stored
    new_images: int  # images this split adds to the store (0 when live, stored already, or listed by another split)


@dataclass
class DatasetPlan:
    dataset: str
    store: str
    layout: str
    dtype: str
    bytes_per_image: int  # the layers, uncompressed (int8: with scales), plus the final feature
    splits: list[SplitPlan]
    free_bytes: int | None  # None: unknown (object storage)
    sizes_from: str  # "disk", "published sizes" or "store" (its dataset could not be opened; the store's own)

    @property
    def total_bytes(self) -> int:
        return sum(s.new_images for s in self.splits) * self.bytes_per_image

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.total_bytes <= self.free_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


def free_space(url: str) -> int | None:
    """Free bytes on the file system a local store goes to (its nearest existing folder); None for URLs."""
    if "://" in url and not url.startswith("file://"):
        return None
    path = Path(url.removeprefix("file://")).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def per_image_bytes(backbone: str, model_kwargs: dict, layout: str, dtype: str, probes: bool = False) -> int:
    """Stored bytes per image: its layers, final feature (float32) and valid flag, and (--probes) its probe arrays."""
    return stored_bytes(geometry(backbone, **model_kwargs), layout, dtype, probes)


def _stored_sources(url: str) -> tuple[set[str], set[str]]:
    """Sources of the images a store at `url` holds written already, and its splits (empty when nothing is there)."""
    if found_at(url) != "store":
        return set(), set()
    store = open_store(url)
    images = store.images
    done = images.done()
    keys = images.keys
    written = {key_source(key) for row, key in enumerate(keys) if key and done[row // images.shard_size]}
    return written, set(store.split_names())


def _split_plans(
    open_: Callable[[], Dataset], name: str, cached: list[str] | None, url: str
) -> tuple[list[SplitPlan], str]:
    """Every split of the dataset (`open_` opens it): the cached ones (`cached`, in its order; None: all) with the
    images they add, the others live. A dataset not on disk is planned from its release's published sizes."""
    stored, have = _stored_sources(url)
    try:
        dataset = open_()
    except VQTError:
        known = published_sizes(name)
        if known is None or cached is None:
            raise
        return _published_plans(name, known, cached, have), "published sizes"
    cached = list(dataset.splits) if cached is None else cached
    for split in cached:
        dataset.split(split)  # an unknown or empty split: one sentence
    plans, seen = [], set(stored)
    for split in cached:
        sources = [source for source, _ in dataset.split(split)]
        new = set(sources) - seen
        seen |= new
        plans.append(SplitPlan(split, len(sources), True, len(new)))
    plans += [SplitPlan(s, len(items), False, 0) for s, items in dataset.splits.items() if s not in cached]
    return plans, "disk"


def _published_plans(name: str, known: tuple, cached: list[str], have: set[str]) -> list[SplitPlan]:
    """The plans from a release's published sizes; `have`: the splits the store holds already."""
    sizes, unions = known
    unknown = [s for s in cached if s not in sizes]
    if unknown:
        raise VQTError(f"dataset {name!r} has no split {unknown[0]!r} (it has {', '.join(sizes)})")
    plans, seen = [], set(have)
    for split in cached:
        parts = unions.get(split, (split,))
        new = sum(sizes[p] for p in parts if p not in seen) if split not in seen else 0
        seen |= {split, *parts}
        plans.append(SplitPlan(split, sizes[split], True, new))
    return plans + [SplitPlan(s, n, False, 0) for s, n in sizes.items() if s not in cached]


def plan_extract(cfg: ExtractConfig, opened: Dataset | None = None) -> DatasetPlan:
    """The plan of one extract command (`opened`: its dataset, when the caller has it open already)."""
    url = cfg.store_url
    open_ = (
        (lambda: opened)
        if opened is not None
        else lambda: open_extracted(cfg.dataset, cfg.root, cfg.columns, cfg.val_fraction)
    )
    plans, sizes_from = _split_plans(open_, cfg.dataset, None if cfg.splits is None else list(cfg.splits), url)
    per_image = per_image_bytes(cfg.backbone, cfg.model_kwargs, cfg.layout, cfg.dtype, cfg.probes)
    return DatasetPlan(cfg.dataset, url, cfg.layout, cfg.dtype, per_image, plans, free_space(url), sizes_from)


def plan_pipeline(
    pipeline: Any, layout: str = DEFAULT_LAYOUT, dtype: str = DEFAULT_DTYPE, probes: bool = False
) -> list[DatasetPlan]:
    """Per dataset of a pipeline: its training and validation splits cached, its test split live (unless its
    store holds it already). An existing store keeps its own layout, dtype and probe arrays."""
    proto = pipeline.protocol
    training = [proto.select_train, proto.select_eval, proto.final_train]
    plans = []
    for entry in pipeline.datasets:
        url = pipeline.store_for(entry)
        root, kind, has_probes, cached = None, (layout, dtype), probes, list(dict.fromkeys(training))
        store = open_store(url) if found_at(url) == "store" else None
        if store is not None:
            root, kind = store.attrs["dataset"]["root"], (store.attrs["layout"], store.attrs["dtype"])
            has_probes = bool(store.attrs.get("probes"))
            if store.has_split(proto.final_eval):
                cached.append(proto.final_eval)
        try:
            splits, sizes_from = _split_plans(partial(open_dataset, entry.name, root), entry.name, cached, url)
        except VQTError:
            if store is None:
                raise
            splits, sizes_from = _store_plans(store, cached), "store"  # as the sweep, which needs only the store
            if not store.has_split(proto.final_eval):  # evaluated live from a dataset this process cannot open
                splits.append(SplitPlan(proto.final_eval, None, False, 0))
        # an existing store's own geometry (its backbone may be any size, whatever the pipeline's backbone name)
        if store is not None:
            per_image = store.stored_bytes_per_image()
        else:
            try:
                per_image = per_image_bytes(pipeline.backbone, {}, *kind, has_probes)
            except VQTError as exc:  # a name only its store's path uses (the demo's): nothing to size it from
                raise VQTError(
                    f"dataset {entry.name}: its store {url} does not exist yet, and the pipeline's backbone "
                    f"{pipeline.backbone!r} is no model plan can size ({exc}); extract the store first"
                ) from exc
        plans.append(DatasetPlan(entry.name, url, *kind, per_image, splits, free_space(url), sizes_from))
    return plans


def _store_plans(store: Store, cached: list[str]) -> list[SplitPlan]:
    """The plan of a store whose dataset cannot be opened here (one registered by the process that extracted it):
    its own splits, with the images its unfinished shards still need; the splits the protocol caches must be
    among them."""
    missing = [name for name in cached if not store.has_split(name)]
    if missing:
        raise VQTError(
            f"store {store.url} has no split {missing[0]!r}, and its dataset cannot be opened here to plan it"
        )
    images, done = store.images, store.images.done()
    plans, seen = [], set()
    for name in store.split_names():
        split = store.split(name, require_complete=False)
        rows = {int(r) for r in split.rows() if not done[r // images.shard_size]} - seen
        seen |= rows
        plans.append(SplitPlan(name, split.num_samples, True, len(rows)))
    return plans
