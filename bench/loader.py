"""Stage one's image loading per CPU core (issue 32): decoding a JPEG file and preprocessing it for ViT-B/16, as
extraction's data-loader workers do it (`ImageSplit`), one process on one thread, at the sizes of VTAB-1k's
images (32×32 as CIFAR's and SVHN's, 64×64 as EuroSAT's; VTAB's resize is a squash to 224×224) and of the FGVC
datasets' (about 500×375 as CUB's, 1024×768 as the larger NABirds photos; timm's resize to 248 and centre crop).

Two resamplers, the same decode (Pillow's): Pillow's (timm's eval transform, the default) and torch's on the
decoded 8-bit pixels (`extract --resample torch`). A GPU host needs img/s per core × its workers above its GPU's.
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
from vqt_cache.datasets import Dataset, ImageSplit, preprocessing

SIZES = {  # (width, height), the resize the datasets of that size get
    "VTAB-1k 32×32 (CIFAR, SVHN)": ((32, 32), "squash"),
    "VTAB-1k 64×64 (EuroSAT)": ((64, 64), "squash"),
    "FGVC 500×375 (CUB)": ((500, 375), "timm"),
    "FGVC 1024×768 (NABirds)": ((1024, 768), "timm"),
}
RESAMPLERS = {"pillow": "Pillow resamples (default)", "torch": "torch resamples (--resample torch)"}


def _images(folder: Path, size: tuple[int, int], n: int) -> list[str]:
    """n photo-like JPEG files (smooth gradients plus noise, quality 90) of the size."""
    rng = np.random.default_rng(0)
    w, h = size
    base = np.stack(np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), -1)
    paths = []
    for i in range(n):
        pixels = np.concatenate([base, base[..., :1]], -1) + rng.normal(0, 20, (h, w, 3))
        path = folder / f"{w}x{h}-{i}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path.name)
    return paths


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, as one data-loader worker
    data_config = load_backbone("vit_b16", weights="random").data_config
    tmp = Path(tempfile.mkdtemp(prefix="vqt-bench-loader-"))
    rows = []
    try:
        for what, (size, resize) in SIZES.items():
            n = 16 if quick else 200
            dataset = Dataset("bench", tmp, ["0"], {"train": [(p, 0) for p in _images(tmp, size, n)]}, resize=resize)
            for resample, how in RESAMPLERS.items():
                split = ImageSplit(dataset, dataset.split("train"), preprocessing(data_config, resize, resample))
                for i in range(min(n, 8)):  # warm-up
                    split[i]
                start = time.perf_counter()
                for i in range(n):
                    split[i]
                rows.append(
                    {"bench": "loader", "what": f"{what}, {how}", "img_s_per_core": n / (time.perf_counter() - start)}
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(threads)
    return rows
