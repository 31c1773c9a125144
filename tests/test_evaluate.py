"""Evaluation: live (the frozen backbone over a split's images, every run in one pass) equals cached."""

import json

import pytest
import torch

from vqt_cache import evaluation as evaluate_module
from vqt_cache.batches import CachedSplit
from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.evaluation import cached_logits, evaluate, evaluation_path, live_logits, load_runs, read_evaluation
from vqt_cache.extraction import extract
from vqt_cache.training import train

from conftest import TINY_EXTRACT, run_cli

SPECS = (RunSpec("vqt", 2, 0.5, 0.0, 1), RunSpec("linear", 0, 0.5, 0.0, 1), RunSpec("pooled", 0, 0.5, 0.0, 1))


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory) -> tuple[str, list[str]]:
    """A float32 store of train800 and val200, and a vqt, a linear and a pooled run trained on it."""
    root = tmp_path_factory.mktemp("live")
    store = str(root / "s.zarr")
    extract(ExtractConfig(**TINY_EXTRACT, dataset="digits", splits=("train800", "val200"), out=store, dtype="float32"))
    cfg = TrainConfig(store=store, runs=SPECS, epochs=2, warmup_epochs=1, out=str(root / "runs"))
    return store, [r.dir for r in train(cfg)]


@pytest.mark.parametrize(
    ("layout", "resample", "forward"),
    [
        ("kv", "pillow", "float32"),
        ("hidden", "pillow", "float32"),
        ("hidden", "torch", "float32"),
        ("kv", "pillow", "bf16"),
    ],
)
def test_live_logits_equal_cached_logits_for_vqt_linear_and_pooled(tmp_path, layout, resample, forward):
    """Live evaluation preprocesses and runs the frozen forward as the store records (either resampler, a bf16
    forward), so it equals the cache."""
    store = str(tmp_path / "s.zarr")
    common = dict(dataset="digits", dtype="float32", layout=layout, workers=0, resample=resample, precision=forward)
    extract(ExtractConfig(**TINY_EXTRACT, **common, splits=("train800", "val200"), out=store))
    cfg = TrainConfig(
        store=store, runs=SPECS, epochs=2, warmup_epochs=1, out=str(tmp_path / "runs"), precision="float32"
    )
    dirs = [r.dir for r in train(cfg)]
    _, st, backbone, model = load_runs(dirs)
    cached, labels = cached_logits(model, CachedSplit(st.split("val200"), batch_size=64))
    live, live_labels = live_logits(model, backbone, st, "val200", dirs, None, 64, torch.device("cpu"), 0, None)
    assert torch.equal(labels, live_labels)
    for method, a, b in zip(("vqt", "linear", "pooled"), cached, live, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=method)
        assert torch.equal(a.argmax(1), b.argmax(1)), method


def test_a_split_the_store_does_not_hold_is_evaluated_live_into_every_run_folder(float32_runs, tmp_path):
    store, dirs = float32_runs
    cached = evaluate(dirs, "val200")
    assert not any(r.live for r in cached)
    live = evaluate(dirs, "val200", live=True)
    for a, b in zip(cached, live, strict=True):
        assert b.live and b.images == 200 and b.top1 == a.top1 and b.mean_class == a.mean_class
        assert read_evaluation(b.dir, "val200") == b.record()
    results = evaluate(dirs, "test")  # not in the store: live
    assert all(r.live and r.images == 797 for r in results)
    assert all(not evaluation_path(d, "test", partial=True).exists() for d in dirs)
    code, out = run_cli("evaluate", *dirs[:2], "--split", "test", "--json")
    assert code == 0 and [r["top1"] for r in json.loads(out)] == [r.top1 for r in results[:2]]


def test_an_interrupted_live_evaluation_resumes_where_it_stopped(float32_runs, monkeypatch):
    _, dirs = float32_runs
    reference = evaluate(dirs, "test")
    for d in dirs:
        evaluation_path(d, "test").unlink()
    monkeypatch.setattr(evaluate_module, "SAVE_EVERY_S", 0.0)
    seen = []

    def stop_after_three_batches(_label, done, _total):
        seen.append(done)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(dirs, "test", batch_size=64, workers=0, progress=stop_after_three_batches)
    assert all(
        evaluation_path(d, "test", partial=True).exists() and not evaluation_path(d, "test").exists() for d in dirs
    )
    resumed_from = []
    results = evaluate(dirs, "test", batch_size=64, workers=0, progress=lambda _l, done, _t: resumed_from.append(done))
    assert resumed_from[0] == 128  # the logits of the first two batches were saved; the third is done again
    assert [r.top1 for r in results] == [r.top1 for r in reference]
    assert all(not evaluation_path(d, "test", partial=True).exists() for d in dirs)


def test_a_missing_store_or_split_is_one_sentence(float32_runs, tmp_path):
    _, dirs = float32_runs
    code, out = run_cli("evaluate", dirs[0], "--split", "test", "--store", str(tmp_path / "nowhere.zarr"))
    assert code == 2 and "no store" in out
    code, out = run_cli("evaluate", dirs[0], "--split", "nosuch")
    assert code == 2 and "no split 'nosuch'" in out and "Traceback" not in out
