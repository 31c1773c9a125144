"""The live path on raw image files gives the cached path's answers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqt_cache.batches import CachedSplit
from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.evaluation import load_run
from vqt_cache.extraction import extract
from vqt_cache.prediction import predict
from vqt_cache.training import train

from conftest import TINY_EXTRACT, make_imagefolder, run_cli


@pytest.mark.parametrize("forward", ["float32", "bf16"])
def test_predict_equals_cached_path(tmp_path, forward):
    """predict runs the store's preprocessing and frozen forward (a bf16 one too), then the run's cached path."""
    root = make_imagefolder(tmp_path / "imgs", per_class=4, classes=("a", "b", "c"), splits=("train", "test"))
    store = str(tmp_path / "s.zarr")
    common = dict(dataset="imagefolder", root=str(root), out=store, dtype="float32", workers=0, precision=forward)
    extract(ExtractConfig(**TINY_EXTRACT, **common))
    [run] = train(
        TrainConfig(
            store=store,
            runs=(RunSpec("vqt", 2, 0.5, 0, 0),),
            train_split="train",
            eval_split="test",
            epochs=3,
            warmup_epochs=1,
            out=str(tmp_path / "run"),
            precision="float32",  # the live path is float32: the cached one must be too, to agree to 1e-4
        )
    )
    loaded = load_run(run.dir)
    st, model = loaded.store, loaded.model
    data = CachedSplit(st.split("test"))
    batch = next(data.batches())
    with torch.no_grad():
        cached = model(batch.final, batch.cache)[0]
    files = [str(root / source) for source in st.split("test").sources]
    live = predict(run.dir, files)
    np.testing.assert_allclose([r.logits for r in live], cached.numpy(), atol=1e-4, rtol=0)
    assert [r.label for r in live] == cached.argmax(1).tolist()
    code, out = run_cli("predict", run.dir, *files[:2], "--json")
    assert code == 0 and [r["class"] for r in json.loads(out)] == [r.class_name for r in live[:2]]
    # one exported file predicts exactly what the run does, with the store gone
    code, out = run_cli("export", run.dir)
    exported = tmp_path / "run" / "run.safetensors"  # inside the run folder, named after it
    assert code == 0 and exported.is_file(), out
    shutil.move(store, tmp_path / "gone.zarr")
    from_file = predict(exported, files)
    assert [r.logits for r in from_file] == [r.logits for r in live]
    assert [r.class_name for r in from_file] == [r.class_name for r in live]
    code, out = run_cli("predict", str(exported), files[0], "--json")
    assert code == 0 and json.loads(out)[0]["label"] == live[0].label
    # export replaces only its own file
    (tmp_path / "mine.safetensors").write_bytes(b"my file")
    mine = str(tmp_path / "mine.safetensors")
    code, out = run_cli("export", run.dir, "--store", str(tmp_path / "gone.zarr"), "--out", mine)
    assert code == 2 and "not a vqt-cache export" in out and Path(mine).read_bytes() == b"my file"


def test_predict_names_an_unreadable_image(tmp_path, tiny_store):
    [run] = train(
        TrainConfig(
            store=tiny_store,
            runs=(RunSpec("linear", 0, 0.5, 0, 0),),
            epochs=2,
            warmup_epochs=1,
            out=str(tmp_path / "run"),
        )
    )
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    code, out = run_cli("predict", run.dir, str(bad))
    assert code == 2 and "Traceback" not in out and "bad.png" in out
