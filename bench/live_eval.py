"""Live evaluation against a plain forward (issue 13): the same test images, the same loader, ViT-B/16.

A store of a small image folder's training split is extracted (random ViT-B/16 weights), the final runs of one
protocol cell are trained briefly (5 VQT seeds at T, and 5 seeds each of the linear and pooled baselines: what a
sweep evaluates on one test set), then `evaluate` runs them all live on the uncached test split, one forward of
the backbone for all 15 runs. The plain forward is timm's own forward of the same model over the same decoded
batches. Both include image decoding (2 workers) and run in this process, one after the other.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.datasets import ImageSplit, open_dataset
from vqt_cache.evaluation import evaluate
from vqt_cache.extraction import extract
from vqt_cache.training import NO_EVAL, train

SEEDS = (42, 44, 82, 100, 800)
BATCH = 32


def _image_folder(root: Path, train: int, test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def _plain_rate(root: Path, workers: int) -> float:
    backbone = load_backbone("vit_b16", weights="random")
    dataset = open_dataset("imagefolder", root)
    from vqt_cache.datasets import preprocessing

    prep = preprocessing(backbone.data_config, dataset.resize)
    loader = torch.utils.data.DataLoader(
        ImageSplit(dataset, dataset.split("test"), prep), batch_size=BATCH, num_workers=workers
    )
    start, n = time.perf_counter(), 0
    with torch.no_grad():
        for images, _, _ in loader:
            backbone.model.forward_head(backbone.model.forward_features(images), pre_logits=True)
            n += len(images)
    return n / (time.perf_counter() - start)


def run(quick: bool = False) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="vqt-bench-live-"))
    rows = []
    try:
        test = 64 if quick else 192
        _image_folder(tmp / "imgs", 16, test)
        store = str(tmp / "s.zarr")
        cfg = ExtractConfig(
            backbone="vit_b16", weights="random", dataset="imagefolder", root=str(tmp / "imgs"), splits=("train",)
        )
        extract(ExtractConfig(**{**cfg.__dict__, "out": store}))
        plain = _plain_rate(tmp / "imgs", 2)
        for T in (1, 10):
            specs = [RunSpec("vqt", T, 0.5, 0.0, s) for s in SEEDS]
            specs += [RunSpec(m, 0, 0.5, 0.0, s) for m in ("linear", "pooled") for s in SEEDS]
            out = tmp / f"runs-T{T}"
            results = train(
                TrainConfig(
                    store=store,
                    runs=tuple(specs),
                    train_split="train",
                    eval_split=NO_EVAL,
                    epochs=1,
                    warmup_epochs=0,
                    out=str(out),
                )
            )
            start = time.perf_counter()
            evaluate([r.dir for r in results], "test", batch_size=BATCH, device="cpu", workers=2)
            live = test / (time.perf_counter() - start)
            again = _plain_rate(tmp / "imgs", 2)  # the plain forward again, right after: the two bracket it
            rows.append(
                {
                    "bench": "live_eval",
                    "what": f"evaluate 15 runs live (5 × VQT T={T}, 5 × linear, 5 × pooled), ViT-B/16, CPU",
                    "images_per_s": live,
                    "plain_forward_images_per_s": (plain + again) / 2,
                    "x_plain_forward": live / ((plain + again) / 2),
                }
            )
            plain = again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
