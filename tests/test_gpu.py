"""Stage one and stage two on a CUDA device agree with the CPU (run with `pytest -m gpu` where there is one).

The exactness tests of test_query.py also run on CUDA through the `device` fixture.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqt_cache.extract import ExtractConfig, extract
from vqt_cache.store import open_store
from vqt_cache.train import RunSpec, TrainConfig, train

from conftest import TINY_EXTRACT

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("layout", ["kv", "hidden"])
def test_extraction_on_cuda_matches_cpu(tmp_path, layout):
    stores = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.zarr")
        common = dict(dataset="digits", splits=("val200",), workers=0, layout=layout, dtype="float32")
        extract(ExtractConfig(**TINY_EXTRACT, **common, out=out, device=device))
        stores[device] = open_store(out).split("val200")
    np.testing.assert_allclose(stores["cuda"].load()[0], stores["cpu"].load()[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(stores["cuda"].final(), stores["cpu"].final(), atol=1e-5, rtol=0)


def test_training_on_cuda_matches_cpu(tiny_store, tmp_path):
    """Without dropout: its masks come from each device's own random generator, so they differ across devices."""
    curves = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        train(
            TrainConfig(
                store=tiny_store,
                runs=(RunSpec("vqt", 2, 0.5, 1e-3, 0),),
                epochs=3,
                warmup_epochs=1,
                batch_size=64,
                dropout=0.0,
                out=str(out),
                device=device,
            )
        )
        metrics = json.loads(Path(out, "metrics.json").read_text())
        curves[device] = [(e["train_loss"], e["eval_top1"]) for e in metrics["epochs"]]
    for (loss_cpu, top1_cpu), (loss_cuda, top1_cuda) in zip(curves["cpu"], curves["cuda"], strict=True):
        assert abs(loss_cpu - loss_cuda) < 1e-3
        assert abs(top1_cpu - top1_cuda) <= 0.01  # at most 2 of 200 eval images flip
