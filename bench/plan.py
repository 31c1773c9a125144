"""`vqt-cache plan`'s time estimate beside the sweep it plans: the demo pipeline (pipelines/demo.toml), on the demo's
store (made by `vqt-cache demo` into a temporary root when `data/` has none), each command in a fresh process.

The sweep runs into a temporary runs_root, so nothing of `data/runs` is reused or touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.training import cli

DEMO = Path(__file__).resolve().parents[1] / "pipelines" / "demo.toml"
STORE = Path("data/cache/digits/tiny_vit_parity.zarr")


def _plan(pipeline: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "vqt_cache", "plan", str(pipeline), "--json"], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"vqt-cache plan failed:\n{done.stderr[-2000:]}")
    return sum(entry["seconds"]["total"] for entry in json.loads(done.stdout))


def run(quick: bool = False) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="vqt-bench-plan-"))
    try:
        store = STORE.resolve() if (STORE / "zarr.json").exists() else None
        if store is None:
            cli("demo", "--root", str(tmp / "data"), "--epochs", "2")  # the demo's store (and a two-epoch table)
            store = tmp / "data" / STORE.relative_to("data")
        text = DEMO.read_text().replace("queries = [4]", f'queries = [4]\nstore = "{store}"')
        text = text.replace('backbone = "tiny_vit_parity"', f'backbone = "tiny_vit_parity"\nruns_root = "{tmp}/runs"')
        if quick:
            text = text.replace("epochs = 30", "epochs = 3").replace("warmup_epochs = 3", "warmup_epochs = 1")
        pipeline = tmp / "demo.toml"
        pipeline.write_text(text)
        estimate = _plan(pipeline)
        start = time.perf_counter()
        cli("sweep", str(pipeline))
        took = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        {"bench": "plan", "what": "pipelines/demo.toml: plan's estimate", "wall_s": estimate},
        {"bench": "plan", "what": "pipelines/demo.toml: the sweep", "wall_s": took, "estimate/taken": estimate / took},
    ]
