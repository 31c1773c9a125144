"""Stage one and stage two on a CUDA device agree with the CPU (run with `pytest -m gpu` where there is one).

The exactness tests of test_query.py also run on CUDA through the `device` fixture.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.extraction import extract
from vqt_cache.store import open_store
from vqt_cache.training import train

from conftest import TINY_EXTRACT

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("layout", ["kv", "hidden"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_extraction_on_cuda_matches_cpu(tmp_path, layout, dtype):
    stores = {}
    for device in ("cpu", "cuda"):
        out = str(tmp_path / f"{device}.zarr")
        common = dict(dataset="digits", splits=("val200",), workers=0, layout=layout, dtype=dtype)
        extract(ExtractConfig(**TINY_EXTRACT, **common, out=out, device=device))  # pinned async copies on CUDA
        stores[device] = open_store(out).split("val200")
    cuda, cpu = (np.stack([stores[d].row(i) for i in range(200)]) for d in ("cuda", "cpu"))
    step = np.abs(cpu).max() / 127 if dtype == "int8" else 0  # a value may round to the next int8 step
    np.testing.assert_allclose(cuda, cpu, atol=1e-5 + step, rtol=0)
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
                precision="float32",
            )
        )
        metrics = json.loads(Path(out, "metrics.json").read_text())
        curves[device] = [(e["train_loss"], e["eval_top1"]) for e in metrics["epochs"]]
    for (loss_cpu, top1_cpu), (loss_cuda, top1_cuda) in zip(curves["cpu"], curves["cuda"], strict=True):
        assert abs(loss_cpu - loss_cuda) < 1e-3
        assert abs(top1_cpu - top1_cuda) <= 0.01  # at most 2 of 200 eval images flip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_on_cuda_held_and_streamed_equal_the_cpu(tiny_store, dtype):
    """Held on the GPU in the stored dtype and widened there, or staged pinned and copied on a side stream."""
    from vqt_cache.batches import CachedSplit

    split = open_store(tiny_store).split("val200")
    order = np.arange(199, -1, -1)
    held, streamed, cpu = (
        CachedSplit(split, budget, 64, device, dtype=dtype).batches(order)
        for budget, device in ((None, "cuda"), (0, "cuda"), (None, "cpu"))
    )
    for a, b, c in zip(held, streamed, cpu, strict=True):
        assert a.cache.is_cuda and b.cache.is_cuda
        assert torch.equal(a.cache, b.cache) and torch.equal(a.cache.cpu(), c.cache)
        assert torch.equal(a.labels.cpu(), c.labels) and torch.equal(a.final.cpu(), c.final)


def test_bf16_training_on_cuda_learns_like_float32(tiny_store, tmp_path):
    top1 = {}
    for precision in ("float32", "bf16"):
        cfg = TrainConfig(
            store=tiny_store,
            runs=(RunSpec("vqt", 2, 0.5, 1e-3, 0),),
            epochs=4,
            warmup_epochs=1,
            out=str(tmp_path / precision),
            device="cuda",
            precision=precision,
        )
        top1[precision] = train(cfg)[0].final["top1"]
    assert abs(top1["float32"] - top1["bf16"]) <= 0.03
