"""Stage two end to end (issue 5): `train` from a real store on disk, grids in one pass, streaming memory.

ViT-B/16 geometry, random weights, CPU. The stores hold synthetic float16 K/V (speed does not depend on the
values) and the real frozen weights, written straight through the store API, so the bench needs no extraction.
- train step: `vqt_cache.train.train` (batch 64, in memory: gather + cast per step included) vs the live steps of
  bench.stage_two, T = 1 and 10, kv and hidden layouts, and streaming (each batch read from disk).
- grid: 20 configurations (lr × wd, T = 1) in one pass vs the same 20 trained one after another.
- memory: peak RSS of a streaming `train` (batch 32) in a fresh process on a store 4× larger than its memory
  budget; the budget covers the frozen weights, resident features and live batches, the +1 GiB the runtime
  (importing this CUDA build of torch alone takes ~0.6 GiB).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.extraction import _synthetic
from bench.stage_two import live_rates, vit_b16
from vqt_cache.datasets import index_hash
from vqt_cache.extract import ExtractConfig, store_attrs
from vqt_cache.store import create_store, hash_rows, row_checksum
from vqt_cache.train import RunSpec, TrainConfig, grid, train

GiB = 2**30


def synthetic_store(path: str, backbone, layout: str, n_train: int, n_eval: int = 16) -> str:
    """A ViT-B/16 store with the real frozen weights and random float16 features (one random image, repeated)."""
    dataset = _synthetic(1)
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


def _rate(store: str, out: str, spec: RunSpec, epochs: int = 3, **kwargs) -> float:
    """images/s of one run's training epochs (data loading included, evaluation excluded)."""
    train(
        TrainConfig(
            store=store,
            runs=(spec,),
            epochs=epochs,
            warmup_epochs=1,
            batch_size=64,
            out=out,
            eval_every=epochs,
            checkpoint_every=epochs,
            **kwargs,
        )
    )
    timing = json.loads(Path(out, "timing.json").read_text())
    return timing["train_images"] / timing["train_seconds"]


def run(quick: bool = False) -> list[dict]:
    backbone, _, _ = vit_b16()
    tmp = tempfile.mkdtemp(prefix="vqt-bench-train-")
    rows = []
    try:
        n = 64 if quick else 128
        stores = {layout: synthetic_store(f"{tmp}/{layout}.zarr", backbone, layout, n) for layout in ("kv", "hidden")}
        for T in (1, 10):
            live = live_rates(T, quick)
            spec = RunSpec("vqt", T, 0.5, 1e-3, 0)
            cases = [("kv", {}), ("hidden", {}), ("kv", {"memory_budget": 0})]
            for layout, extra in cases:
                ips = _rate(stores[layout], f"{tmp}/run-{layout}-{T}-{len(extra)}", spec, **extra)
                mode = "streamed from disk" if extra else "in memory"
                rows.append(
                    {
                        "bench": "train",
                        "T": T,
                        "what": f"train {layout} fp16 store, {mode}",
                        "images_per_s": ips,
                        "x_live_semantics": ips / live["semantics"],
                        "x_live_frozen": ips / live["frozen"],
                    }
                )
        rows.append(_streaming_memory(backbone, tmp, quick))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run_grid(quick: bool = False) -> list[dict]:
    """20 configurations (lr × wd, T = 1) in one pass vs one after another, in memory and streamed from disk."""
    backbone, _, _ = vit_b16()
    tmp = tempfile.mkdtemp(prefix="vqt-bench-grid-")
    try:
        store = synthetic_store(f"{tmp}/kv.zarr", backbone, "kv", 128)
        return [_grid(store, f"{tmp}/{mode}", budget) for mode, budget in (("in memory", None), ("streamed", 0))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _grid(store: str, out: str, memory_budget: int | None) -> dict:
    specs = grid(["vqt"], [1], [1.0, 0.5, 0.25, 0.1, 0.05], [1e-2, 1e-3, 1e-4, 0.0], [100])
    common = dict(
        store=store,
        epochs=2,
        warmup_epochs=1,
        batch_size=64,
        eval_every=2,
        checkpoint_every=2,
        memory_budget=memory_budget,
    )
    start = time.perf_counter()
    train(TrainConfig(runs=specs, out=f"{out}/grid", **common))
    one_pass = time.perf_counter() - start
    start = time.perf_counter()
    for spec in specs:
        train(TrainConfig(runs=(spec,), out=f"{out}/seq/{spec.name}", **common))
    sequential = time.perf_counter() - start
    mode = "in memory" if memory_budget is None else "streamed"
    return {
        "bench": "grid",
        "what": f"20 configs (T=1, 128 images, 2 epochs, {mode}): one pass vs 20 runs",
        "one_pass_s": one_pass,
        "sequential_s": sequential,
        "speedup": sequential / one_pass,
    }


MEASURE = """
import json, sys
from vqt_cache.train import RunSpec, TrainConfig, train
store, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
train(TrainConfig(store=store, runs=(RunSpec("vqt", 1, 0.5, 1e-3, 0),), epochs=1, warmup_epochs=0, batch_size=32,
                  out=out, memory_budget=budget))
timing = json.load(open(out + "/timing.json"))
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
