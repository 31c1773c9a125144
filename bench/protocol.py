"""One VTAB-1k task's whole protocol at ViT-B/16 geometry, through `vqt-cache` as a user runs it (issue 14).

Stage one: `vqt-cache extract` of ViT-B/16 (random weights) over the digits' train800, val200 and train800val200
(1,000 images, stored once; the same split sizes as a VTAB-1k task). Stage two: `vqt-cache sweep` of a pipeline with
VQT T = 1 and the paper's protocol: the 20-point grid (5 lrs × 4 wds) on train800 in one pass, evaluated on val200;
the selected configuration on train800val200 with 5 seeds; the test split (797 images, not cached) evaluated live
afterwards, one backbone forward for all 5 runs. Wall times per precision (float32, bf16), each sweep in a fresh
process. The paper's schedule is 100 epochs; `--quick` runs 5, and PROTOCOL_EPOCHS overrides (per-epoch cost is
constant once flush-to-zero is on, bench.training shows it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.training import cli

PIPELINE = """
name = "protocol-{precision}"
description = "one VTAB-1k-sized task, VQT T=1, the paper's protocol"
backbone = "vit_b16"
runs_root = "{root}"
baselines = []

[protocol]
epochs = {epochs}
warmup_epochs = {warmup}
precision = "{precision}"

[[datasets]]
name = "digits"
store = "{store}"
queries = [1]
"""


def run(quick: bool = False) -> list[dict]:
    epochs = int(os.environ.get("PROTOCOL_EPOCHS", 5 if quick else 100))
    tmp = tempfile.mkdtemp(prefix="vqt-bench-protocol-")
    rows = []
    try:
        store = f"{tmp}/digits.zarr"
        start = time.perf_counter()
        cli("extract", "--backbone", "vit_b16", "--weights", "random", "--dataset", "digits",
            "--splits", "train800,val200,train800val200", "--workers", "0", "--out", store)  # fmt: skip
        extraction = time.perf_counter() - start
        rows.append({"bench": "protocol", "what": "extract 1,000 images (hidden int8)", "wall_s": extraction})
        walls = {}
        for precision in ("float32", "bf16"):
            pipeline = Path(tmp, f"{precision}.toml")
            text = PIPELINE.format(
                precision=precision, root=f"{tmp}/runs", epochs=epochs, warmup=max(epochs // 10, 1), store=store
            )
            pipeline.write_text(text)
            start = time.perf_counter()
            cli("sweep", str(pipeline))
            walls[precision] = time.perf_counter() - start
            rows.append(
                {
                    "bench": "protocol",
                    "what": f"sweep: 20-grid on 800 + 5 seeds on 1,000 + live test, {epochs} epochs, {precision}",
                    "wall_s": walls[precision],
                    "x_float32": walls["float32"] / walls[precision],
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
