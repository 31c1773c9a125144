"""8-bit features against float32 (issue 13): bytes per image, feature and logit errors, demo accuracy over 5 seeds.

The demo's frozen backbone (a tiny ViT pretrained on digit parity, made by `vqt-cache demo` or here) extracts the
digits once per dtype into real stores through `extract`; VQT T=4 then trains from each store through `train` with
the demo's recipe (50 epochs, lr 0.25, wd 0) and 5 seeds, and is tested on `test`. Errors are measured on the
stored features of the test split and on the logits of the float32-trained runs evaluated on each store.
Bytes per image are for ViT-B/16 geometry (L=12, N=197, D=768, H=12).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from vqt_cache.batches import CachedSplit
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.demo import extract_config, pretrain_parity
from vqt_cache.evaluation import cached_logits, evaluate, load_run
from vqt_cache.extraction import extract
from vqt_cache.formats import bytes_per_value, group_for
from vqt_cache.store import open_store
from vqt_cache.training import train

DTYPES = ("float32", "float16", "int8")
SEEDS = (42, 44, 82, 100, 800)


def vit_b16_bytes() -> list[dict]:
    L, N, D, H = 12, 197, 768, 12
    rows = []
    for layout, values, channels in (("kv", L * 2 * N * D, D // H), ("hidden", L * N * D, D)):
        for dtype in DTYPES:
            rows.append(
                {
                    "bench": "quantization",
                    "what": f"ViT-B/16 bytes per image, {layout} {dtype}",
                    "MB": values * bytes_per_value(dtype, group_for(channels)) / 1e6,
                }
            )
    return rows


def _errors(stores: dict[str, str]) -> dict[str, tuple[float, float]]:
    """Per dtype: (max, mean) relative error of the test split's features against float32."""
    exact = next(iter(CachedSplit(open_store(stores["float32"]).split("test"), batch_size=2000).batches())).cache
    out = {}
    for dtype, url in stores.items():
        approx = next(iter(CachedSplit(open_store(url).split("test"), batch_size=2000).batches())).cache
        error = (approx - exact).abs()
        out[dtype] = ((error.max() / exact.abs().max()).item(), (error.mean() / exact.abs().mean()).item())
    return out


def run(quick: bool = False) -> list[dict]:
    rows = vit_b16_bytes()
    seeds = SEEDS[:2] if quick else SEEDS
    epochs = 10 if quick else 50
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path("data/demo/tiny_vit_parity.safetensors")
        if not weights.exists():
            weights = pretrain_parity(Path(tmp) / "parity.safetensors")
        for layout in ("kv", "hidden"):
            stores = {}
            for dtype in DTYPES:
                stores[dtype] = str(Path(tmp) / f"{layout}-{dtype}.zarr")
                extract(extract_config(weights, stores[dtype], ("train800", "test"), layout=layout, dtype=dtype))
            errors = _errors(stores)
            accuracy: dict[str, list[float]] = {}
            logit_error: dict[str, float] = {d: 0.0 for d in DTYPES}
            for dtype in DTYPES:
                specs = tuple(RunSpec("vqt", 4, 0.25, 0.0, seed) for seed in seeds)
                out = str(Path(tmp) / f"runs-{layout}-{dtype}")
                results = train(
                    TrainConfig(
                        store=stores[dtype],
                        runs=specs,
                        epochs=epochs,
                        warmup_epochs=max(epochs // 10, 1),
                        eval_split="test",
                        eval_every=epochs,
                        out=out,
                        precision="float32",  # the stores' errors alone (bench/precision.py measures bf16)
                    )
                )
                accuracy[dtype] = [evaluate(r.dir, "test")[0].top1 for r in results]
                if dtype == "float32":
                    for result in results:  # the float32 runs' logits on every store
                        model = load_run(result.dir).model
                        exact = cached_logits(model, CachedSplit(open_store(stores["float32"]).split("test")))[0][0]
                        for other in DTYPES:
                            split = CachedSplit(open_store(stores[other]).split("test"))
                            approx = cached_logits(model, split)[0][0]
                            relative = ((approx - exact).abs().max() / exact.abs().max()).item()
                            logit_error[other] = max(logit_error[other], relative)
            for dtype in DTYPES:
                top1 = 100 * np.array(accuracy[dtype])
                rows.append(
                    {
                        "bench": "quantization",
                        "what": f"digits demo, {layout} {dtype}: VQT T=4, {len(seeds)} seeds, {epochs} epochs",
                        "test top-1 mean": float(top1.mean()),
                        "test top-1 std": float(top1.std(ddof=1)) if len(top1) > 1 else 0.0,
                        "feature max rel err": errors[dtype][0],
                        "feature mean rel err": errors[dtype][1],
                        "logit max rel err": logit_error[dtype],
                    }
                )
    return rows
