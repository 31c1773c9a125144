"""plan's time estimate is honest: within 30% of what the sweep it plans then takes, on this machine.

A timing test, so it runs alone (`make test-timing`, which CI runs), not among the parallel fast tests."""

import time

import pytest

from vqt_cache.config import ExtractConfig
from vqt_cache.estimate import estimate_pipeline
from vqt_cache.extraction import extract
from vqt_cache.plan import plan_pipeline
from vqt_cache.sweep import load_pipeline, run_sweep

from conftest import TINY_EXTRACT

pytestmark = pytest.mark.timing

PIPELINE = """
name = "timed"
runs_root = "{runs}"
baselines = ["linear", "pooled"]
compress = true
[protocol]
select_train = "train800"
select_eval = "val200"
final_train = "train800val200"
final_eval = "test"
final_seeds = [1, 2, 3]
epochs = 12
warmup_epochs = 2
batch_size = 64
[[datasets]]
name = "digits"
queries = [4]
store = "{store}"
"""


def test_plans_estimate_is_within_30_percent_of_the_sweep(tmp_path):
    store = str(tmp_path / "digits.zarr")
    model = {**TINY_EXTRACT, "model_kwargs": {**TINY_EXTRACT["model_kwargs"], "depth": 4}}
    extract(ExtractConfig(**model, dataset="digits", splits=("train800", "val200", "train800val200"), out=store))
    path = tmp_path / "timed.toml"
    path.write_text(PIPELINE.format(runs=tmp_path / "runs", store=store))
    p = load_pipeline(path)
    _, [estimate] = estimate_pipeline(p, plan_pipeline(p))
    started = time.perf_counter()
    run_sweep(p)
    took = time.perf_counter() - started
    print(f"plan estimated {estimate.total:.1f} s, the sweep took {took:.1f} s", estimate.as_dict())
    assert 0.7 * took <= estimate.total <= 1.3 * took, (estimate.as_dict(), took)
