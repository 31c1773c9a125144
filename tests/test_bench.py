"""`python -m bench gpu --quick` (issue 24) runs on the CPU: the GPU machine's one-call script is never first run
there. A smoke run: every part reports, nothing is timed or written."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_runs_on_the_cpu_as_a_smoke_run():
    results = (REPO / "bench" / "results.json").read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "gpu", "--quick"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for part in ("plain forward", "extract hidden int8", "train 20-run grid", "evaluate 5 runs live",
                 "sweep of one task", "profiled step"):  # fmt: skip
        assert part in done.stdout, part
    assert (REPO / "bench" / "results.json").read_bytes() == results  # --quick writes no results
