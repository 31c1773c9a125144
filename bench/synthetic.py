"""The benchmarks' synthetic data, in one place: images, empty stores to extract into, and stores of random
features with the real frozen weights (speed does not depend on the values)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from vqt_cache.config import ExtractConfig
from vqt_cache.datasets import Dataset, index_hash
from vqt_cache.extraction import store_attrs
from vqt_cache.store import create_store, hash_rows, row_checksum


def synthetic_dataset(n: int) -> Dataset:
    """n random 256×256 RGB images in one split, "train", labelled 0-9 in turn (seeded)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, 256, 256, 3), dtype=np.uint8)
    items = [(f"synthetic:{i}", i % 10) for i in range(n)]
    return Dataset(
        "synthetic",
        None,
        [str(c) for c in range(10)],
        {"train": items},
        loader=lambda s: Image.fromarray(pixels[int(s.split(":")[1])]),
    )


def new_store(path: str, backbone, dataset: Dataset, cfg: ExtractConfig, with_weights: bool = False):
    """An empty store at `path` for the dataset's "train" split, as `extract` creates it: (its attrs, the split)."""
    attrs = store_attrs(backbone, dataset, cfg)
    weights = {k: v.numpy() for k, v in backbone.model.state_dict().items()} if with_weights else {}
    store = create_store(path, attrs, weights, shard_size=cfg.shard_size)
    items = dataset.split("train")
    keys = [dataset.image_key(source) for source, _ in items]
    split = store.create_split("train", keys, [label for _, label in items], index_hash(items))
    return attrs, split


def synthetic_store(path: str, backbone, layout: str, n_train: int, n_eval: int = 16) -> str:
    """A ViT-B/16 store with the real frozen weights and random float16 features (one random image, repeated)."""
    dataset = synthetic_dataset(1)
    attrs = store_attrs(
        backbone, dataset, ExtractConfig(backbone="vit_b16", dataset="synthetic", layout=layout, dtype="float16")
    )
    weights = {k: v.numpy() for k, v in backbone.model.state_dict().items()}
    store = create_store(path, attrs, weights)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("val", n_eval)):
        items = [(f"synthetic:{name}:{i}", i % 10) for i in range(n)]
        keys = [f"{source}#random" for source, _ in items]
        split = store.create_split(name, keys, [c for _, c in items], index_hash(items))
        block = rng.standard_normal((16, *split.row_shape), dtype=np.float32).astype(np.float16)
        images = split.images
        for shard in split.shards():
            lo, hi = images.shard_range(shard)
            rows = np.concatenate([block] * math.ceil((hi - lo) / len(block)))[: hi - lo]
            images.write_images(lo, rows)
            digest = row_checksum()
            hash_rows(digest, rows)
            final = rng.standard_normal((hi - lo, backbone.dim), dtype=np.float32)
            images.finish_shard(shard, final, np.ones(hi - lo, dtype=np.uint8), digest.digest())
    return path
