"""What a stage-two command costs beyond its work (issue 32): `train`, `evaluate` and `predict` in fresh processes,
beside `python -c "import torch"` in the same run. The goal: <= 1 s beyond `import torch` on this CPU.

The store: ViT-B/16 (random weights, hidden int8, the default) over the digits' val200, extracted once. `train`'s
fixed cost is its wall time minus its epochs minus `import torch`, the epochs' time taken from the difference
between a 1-epoch and a 3-epoch run (an epoch here includes its evaluation); stage two's imports alone (timm's
among them) stand beside it. `evaluate` (the run on val200, cached) and `predict` (one image) count whole, their
work included. Each figure is the median of 3 runs.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPEATS = 3


def _seconds(args: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def measure(tmp: Path, quick: bool = False, env: dict | None = None, vqt: list[str] | None = None) -> dict[str, float]:
    """Seconds of `import torch`, train's fixed cost, evaluate and predict, running `vqt` (default: this package's
    `python -m vqt_cache`)."""
    vqt = vqt or [sys.executable, "-m", "vqt_cache"]
    store = tmp / "store.zarr"
    if not (store / "zarr.json").exists():
        model = (
            ["--backbone", "vit_tiny_patch16_224", "--model-arg", "img_size=32"] if quick else ["--backbone", "vit_b16"]
        )
        _seconds([*vqt, "extract", *model, "--weights", "random", "--dataset", "digits", "--splits", "val200",
                  "--out", str(store)], env)  # fmt: skip
    repeats = 1 if quick else REPEATS
    median = lambda args: statistics.median(_seconds(args, env) for _ in range(repeats))  # noqa: E731

    def train(epochs: int) -> float:
        def once() -> float:
            shutil.rmtree(tmp / f"run{epochs}", ignore_errors=True)
            return _seconds([*vqt, "train", "--store", str(store), "--train-split", "val200", "--eval-split",
                             "val200", "--queries", "1", "--batch-size", "16", "--epochs", str(epochs),
                             "--warmup-epochs", "0", "--out", str(tmp / f"run{epochs}")], env)  # fmt: skip

        return statistics.median(once() for _ in range(repeats))

    torch_s = median([sys.executable, "-c", "import torch"])
    imports = median([sys.executable, "-c", "import vqt_cache.training"])  # stage two's imports: timm among them
    one, three = train(1), train(3)
    epoch = (three - one) / 2
    image = tmp / "digit.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    evaluate = median([*vqt, "evaluate", str(tmp / "run1"), "--split", "val200"])
    predict = median([*vqt, "predict", str(tmp / "run1"), str(image)])
    return {"torch": torch_s, "imports": imports, "epoch": epoch, "train": one - epoch, "evaluate": evaluate,
            "predict": predict}  # fmt: skip


def run(quick: bool = False) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="vqt-bench-startup-"))
    try:
        found = measure(tmp, quick, {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    torch_s = found["torch"]
    rows = [{"bench": "startup", "what": 'python -c "import torch"', "wall_s": torch_s}]
    for name, what in (
        ("imports", "python -c \"import vqt_cache.training\" (stage two's imports, timm's among them)"),
        ("train", "vqt-cache train, outside its epochs"),
        ("evaluate", "vqt-cache evaluate, one run on val200 (cached)"),
        ("predict", "vqt-cache predict, one image"),
    ):
        rows.append({"bench": "startup", "what": what, "wall_s": found[name], "beyond_torch_s": found[name] - torch_s})
    return rows
