"""bf16 against float32 in stage two (issue 14): demo accuracy over 5 seeds, and the logits' deviation.

The demo's frozen backbone (a tiny ViT pretrained on digit parity, made by `vqt-cache demo` or here) extracts the
digits once into a real store with the default layout and dtype (hidden int8); VQT T=4 then trains from it
through `train` with the demo's recipe (50 epochs, lr 0.25, wd 0) and 5 seeds, once per precision, and is tested
on `test`. The logit deviation is that of each float32-trained run evaluated in bf16 (the same parameters).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from vqt_cache.batches import CachedSplit
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.demo import extract_config, pretrain_parity
from vqt_cache.evaluation import cached_logits, evaluate, load_runs
from vqt_cache.extraction import extract
from vqt_cache.training import train

SEEDS = (42, 44, 82, 100, 800)
PRECISIONS = ("float32", "bf16")


def run(quick: bool = False) -> list[dict]:
    seeds = SEEDS[:2] if quick else SEEDS
    epochs = 10 if quick else 50
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path("data/demo/tiny_vit_parity.safetensors")
        if not weights.exists():
            weights = pretrain_parity(Path(tmp) / "parity.safetensors")
        store = str(Path(tmp) / "digits.zarr")
        extract(extract_config(weights, store, ("train800", "test")))
        specs = tuple(RunSpec("vqt", 4, 0.25, 0.0, seed) for seed in seeds)
        dirs: dict[str, list[str]] = {}
        for precision in PRECISIONS:
            recipe = dict(epochs=epochs, warmup_epochs=max(epochs // 10, 1), eval_split="test", eval_every=epochs)
            out = str(Path(tmp) / f"runs-{precision}")
            results = train(TrainConfig(store=store, runs=specs, out=out, precision=precision, **recipe))
            dirs[precision] = [r.dir for r in results]
        deviation = 0.0
        for precision in PRECISIONS:
            _, st, _, model = load_runs(dirs["float32"], precision=precision)
            logits = cached_logits(model, CachedSplit(st.split("test"), **model.reads()))[0]
            if precision == "float32":
                exact = logits
            else:
                deviation = max(((a - e).norm() / e.norm()).item() for a, e in zip(logits, exact, strict=True))
        for precision in PRECISIONS:
            top1 = 100 * np.array([evaluate(d, "test")[0].top1 for d in dirs[precision]])
            rows.append(
                {
                    "bench": "precision",
                    "what": f"digits demo, hidden int8, {precision}: VQT T=4, {len(seeds)} seeds, {epochs} epochs",
                    "test top-1 mean": float(top1.mean()),
                    "test top-1 std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
                    "logit rel err": deviation if precision == "bf16" else 0.0,
                }
            )
    return rows
