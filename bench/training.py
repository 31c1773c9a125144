"""Stage two end to end: `vqt-cache train` over the paper's schedule, grids in one pass, streaming memory.

- train (issue 14): a real ViT-B/16 store (random weights; the digits' val200 extracted through `vqt-cache extract`
  with the default layout and dtype, hidden int8), then `vqt-cache train` in a fresh process per case, T = 1 and
  10, float32 and bf16, batch 64, the paper's schedule (100 epochs, 10 of warm-up; 20 with --quick). Reported:
  images/s over all epochs, over epochs 1-10 and over the last 10 (a stall once the queries have trained shows
  as a drop), and the ratio to the live VQT training step of bench.stage_two.
- grid: 20 configurations (lr × wd, T = 1) in one pass vs the same 20 trained one after another (synthetic
  float16 K/V with the real frozen weights, written straight through the store API: speed does not depend on
  the values).
- memory: peak RSS of a streaming `train` (batch 32) in a fresh process on a store 4× larger than its memory
  budget; the budget covers the frozen weights, resident features and live batches, the +1 GiB the runtime
  (importing this CUDA build of torch alone takes ~0.6 GiB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time

from bench.stage_two import live_rates, vit_b16
from bench.synthetic import synthetic_store
from vqt_cache.run_folder import read_timing

GiB = 2**30


def cli(*args: str) -> None:
    """`vqt-cache ARGS` in a fresh process, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "vqt_cache", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"vqt-cache {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def real_store(path: str) -> str:
    """The digits' val200 (200 images) through ViT-B/16 with random weights, default layout and dtype."""
    cli("extract", "--backbone", "vit_b16", "--weights", "random", "--dataset", "digits", "--splits", "val200",
        "--workers", "0", "--out", path)  # fmt: skip
    return path


def schedule_rates(store: str, out: str, T: int, precision: str, epochs: int) -> dict[str, float]:
    """images/s of `vqt-cache train` over the whole schedule, its first 10 and its last 10 epochs."""
    cli(
        *f"train --store {store} --train-split val200 --eval-split none --queries {T} --epochs {epochs}".split(),
        *f"--warmup-epochs {epochs // 10} --batch-size 64 --precision {precision} --out {out}".split(),
        *f"--checkpoint-every {epochs}".split(),
    )
    timing = read_timing(out)
    seconds = [timing["epoch_seconds"][str(e)] for e in range(1, epochs + 1)]
    per_epoch = timing["train_images"] / epochs
    return {
        "all": per_epoch * epochs / sum(seconds),
        "first_10": per_epoch * 10 / sum(seconds[:10]),
        "last_10": per_epoch * 10 / sum(seconds[-10:]),
    }


def run(quick: bool = False) -> list[dict]:
    tmp = tempfile.mkdtemp(prefix="vqt-bench-train-")
    epochs = 20 if quick else 100
    rows = []
    try:
        store = real_store(f"{tmp}/vit_b16.zarr")
        for T in (1, 10):
            live = live_rates(T, quick)["semantics"]
            rates = {p: schedule_rates(store, f"{tmp}/T{T}-{p}", T, p, epochs) for p in ("float32", "bf16")}
            for precision, rate in rates.items():
                rows.append(
                    {
                        "bench": "train",
                        "T": T,
                        "what": f"vqt-cache train, real store (hidden int8), {epochs} epochs, {precision}",
                        "images_per_s": rate["all"],
                        "epochs_1_10": rate["first_10"],
                        "last_10_epochs": rate["last_10"],
                        "x_live_semantics": rate["all"] / live,
                        "x_float32": rate["all"] / rates["float32"]["all"],
                    }
                )
        rows.append(_streaming_memory(vit_b16()[0], tmp, quick))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


LRS, WDS = ("1", "0.5", "0.25", "0.1", "0.05"), ("0.01", "0.001", "0.0001", "0")  # the paper's 20-point grid


def run_grid(quick: bool = False) -> list[dict]:
    """The 20-point grid (T = 1, seed 100) on the real store through `vqt-cache train`: one call with the lists
    (one pass) in float32 and bf16, vs 20 calls one after another in float32 (process start-up included: that is
    what a user running them one by one pays)."""
    tmp = tempfile.mkdtemp(prefix="vqt-bench-grid-")
    epochs = 4 if quick else 10
    try:
        store = real_store(f"{tmp}/vit_b16.zarr")
        common = f"train --store {store} --train-split val200 --eval-split none --queries 1 --seed 100".split()
        common += f"--epochs {epochs} --warmup-epochs 1 --batch-size 64 --checkpoint-every {epochs}".split()
        one_pass = {}
        for precision in ("float32", "bf16"):
            start = time.perf_counter()
            cli(
                *common,
                "--precision",
                precision,
                "--lr",
                ",".join(LRS),
                "--wd",
                ",".join(WDS),
                "--out",
                f"{tmp}/{precision}",
            )
            one_pass[precision] = time.perf_counter() - start
        start = time.perf_counter()
        for lr in LRS:
            for wd in WDS:
                cli(*common, "--precision", "float32", "--lr", lr, "--wd", wd, "--out", f"{tmp}/seq/{lr}-{wd}")
        sequential = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = f"20 configs (T=1, real store, 200 images, {epochs} epochs)"
    return [
        {
            "bench": "grid",
            "what": f"{what}: one pass float32 vs 20 runs",
            "one_pass_s": one_pass["float32"],
            "sequential_s": sequential,
            "speedup": sequential / one_pass["float32"],
        },
        {
            "bench": "grid",
            "what": f"{what}: one pass bf16 vs float32",
            "one_pass_s": one_pass["bf16"],
            "speedup": one_pass["float32"] / one_pass["bf16"],
        },
    ]


MEASURE = """
import json, sys
from vqt_cache.run_folder import read_timing
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.training import train
store, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
train(TrainConfig(store=store, runs=(RunSpec("vqt", 1, 0.5, 1e-3, 0),), epochs=1, warmup_epochs=0, batch_size=32,
                  out=out, memory_budget=budget))
timing = read_timing(out)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork/exec from the (larger) parent process
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_rss": peak, **timing}))
"""


def _streaming_memory(backbone, tmp: str, quick: bool) -> dict:
    budget = 2 * GiB
    per_image = 12 * 2 * 197 * 768 * 2  # kv float16
    n = int(4 * budget / per_image) + 1
    store = synthetic_store(f"{tmp}/big.zarr", backbone, "kv", n)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, store, f"{tmp}/big-run", str(budget)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "bench": "memory",
        "what": f"streaming train, store {n * per_image / GiB:.1f} GiB, budget {budget / GiB:.0f} GiB",
        "peak_rss_GiB": result["peak_rss"] / GiB,
        "limit_GiB": budget / GiB + 1,
        "in_memory": result["in_memory"],
        "images_per_s": result["train_images"] / result["train_seconds"],
    }
