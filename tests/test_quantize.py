"""8-bit features (issue 13, the measurement step): round-trip bounds, and the query path's logits on dequantized
caches against float32, on a backbone with massive-activation channels too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vqt_cache.model import CachedVQT, RunParameters
from vqt_cache.quantize import dequantize, quantize

from conftest import images_for, tiny_backbone


def _features(seed: int = 0) -> torch.Tensor:
    """(tokens, 128) features with two channels 1,000× the rest, and one all-zero group."""
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(seed))
    x[:, [5, 70]] *= 1000
    x[3, 64:] = 0
    return x


def test_int8_error_is_at_most_half_a_step_of_its_group():
    x = _features()
    values, scale = quantize(x, "int8", 64)
    assert values.dtype == torch.int8 and scale.shape == (50, 2) and scale.dtype == torch.float16
    step = scale.float().repeat_interleave(64, dim=1)
    assert ((dequantize(values, scale, 64) - x).abs() <= step / 2 + 1e-6).all()
    assert (dequantize(values, scale, 64)[3, 64:] == 0).all()


def test_float8_error_is_relative_to_each_value():
    x = _features()
    values, scale = quantize(x, "float8", 64)
    step = scale.float().repeat_interleave(64, dim=1)
    bound = torch.maximum(x.abs() / 16, step * 2**-10)  # 3 mantissa bits; subnormals near zero
    assert ((dequantize(values, scale, 64) - x).abs() <= bound + 1e-6).all()


def with_massive_activations(backbone, channels=(3, 17), scale=500.0):
    """Real ViTs carry a few residual channels far larger than the rest: make block 0's MLP write them."""
    with torch.no_grad():
        for c in channels:
            backbone.blocks[0].mlp.fc2.weight[c] *= scale
            backbone.blocks[0].mlp.fc2.bias[c] = 5 * scale
    return backbone


def _layer_major(cache: torch.Tensor, layout: str) -> torch.Tensor:
    return cache.transpose(0, 1).contiguous() if layout == "hidden" else cache.permute(1, 2, 0, 3, 4, 5).contiguous()


# measured on these tiny backbones: int8 at most 7e-3, float8 at most 3.2e-2 (max |Δlogit| / max |logit|)
BOUND = {"int8": 1e-2, "float8": 5e-2}


@pytest.mark.parametrize("massive", [False, True], ids=["plain", "massive-activations"])
@pytest.mark.parametrize("layout", ["kv", "hidden"])
@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_query_path_logits_on_a_dequantized_cache(kind, layout, massive):
    backbone = tiny_backbone("cls")
    if massive:
        with_massive_activations(backbone)
    final, cache = backbone.forward_cache(images_for(backbone, batch=16), layout=layout, dtype=torch.float32)
    group = cache.shape[-1] if layout == "kv" else 16  # kv: one scale per head and token; hidden: D/16 per token
    run = RunParameters("vqt", 4, backbone.depth, backbone.dim, 10, backbone.patch_size, 0.0, seed=1)
    with torch.no_grad():
        run.head.weight.normal_(generator=torch.Generator().manual_seed(2))  # a head that reads every feature
    model = CachedVQT(backbone.blocks, [run], layout).eval()
    with torch.no_grad():
        exact = model(final, _layer_major(cache, layout))[0]
        approx = model(final, _layer_major(dequantize(*quantize(cache, kind, group), group), layout))[0]
    assert (approx - exact).abs().max() <= BOUND[kind] * exact.abs().max()
    assert (approx.argmax(1) == exact.argmax(1)).float().mean() >= 0.9


# -- int8 stores: stage one quantizes on the device, stage two dequantizes as it builds a batch --------------------


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    from vqt_cache.config import ExtractConfig
    from vqt_cache.extraction import extract

    from conftest import TINY_EXTRACT

    root = tmp_path_factory.mktemp("int8")
    out = {}
    for dtype in ("float32", "int8"):
        out[dtype] = str(root / f"{dtype}.zarr")
        extract(
            ExtractConfig(
                **TINY_EXTRACT,
                dataset="digits",
                splits=("train800", "val200"),
                layout="kv",  # the batch test reads per-image maxima in the kv layout
                dtype=dtype,
                out=out[dtype],
                workers=0,
            )
        )
    return out


def test_an_int8_store_verifies_and_is_a_quarter_of_float32(stores):
    from vqt_cache.store import open_store
    from vqt_cache.verify import verify

    result = verify(stores["int8"], recompute=4)
    assert result["faults"] == [] and result["recomputed"] == 8
    int8, fp32 = (open_store(stores[k]) for k in ("int8", "float32"))
    assert int8.bytes_per_image() == fp32.bytes_per_image() // 4 + fp32.bytes_per_image() // 4 // 16 * 2


def test_int8_batches_equal_dequantized_float32_within_half_a_step(stores):
    from vqt_cache.batches import CachedSplit
    from vqt_cache.store import open_store

    int8, fp32 = (CachedSplit(open_store(stores[k]).split("val200"), batch_size=200) for k in ("int8", "float32"))
    [a], [b] = list(int8.batches()), list(fp32.batches())
    row_max = b.cache.abs().amax(dim=(0, 1, 3, 4, 5))  # kv (L, 2, B, H, N, dh): per image
    assert ((a.cache - b.cache).abs().amax(dim=(0, 1, 3, 4, 5)) <= row_max / 254 * 1.01).all()
    streamed = CachedSplit(open_store(stores["int8"]).split("val200"), memory_budget=0, batch_size=200)
    assert torch.equal(next(iter(streamed.batches())).cache, a.cache)  # in memory == streamed, bit for bit


def test_the_store_dequantizes_a_row_as_quantize_does(stores):
    from vqt_cache.store import open_store

    images = open_store(stores["int8"]).images
    for row in (0, images.num_rows - 1):
        values, scales = images.stored_row(row)
        exact = dequantize(torch.from_numpy(values), torch.from_numpy(scales), images.group_size).numpy()
        assert np.array_equal(images.row(row), exact)  # numpy in the store, torch in stage two: the same bits


def test_a_run_evaluates_alike_on_int8_and_float32(stores, tmp_path):
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.evaluation import evaluate
    from vqt_cache.training import train

    [run] = train(
        TrainConfig(store=stores["float32"], runs=(RunSpec("vqt", 2),), epochs=4, warmup_epochs=1, out=str(tmp_path))
    )
    [exact] = evaluate(run.dir, "val200")
    [approx] = evaluate(run.dir, "val200", store_url=stores["int8"])
    assert abs(exact.top1 - approx.top1) <= 0.01


def test_an_altered_scale_is_refused(stores, tmp_path):
    import shutil

    import zarr

    from conftest import error_line, run_cli

    copy = tmp_path / "s.zarr"
    shutil.copytree(stores["int8"], copy)
    scale = zarr.open_group(copy, mode="r+")["images/scale"]
    scale[3] = scale[3] * 2
    line = error_line(
        *run_cli("train", "--store", str(copy), "--out", str(tmp_path / "run"), "--epochs", "2", "--warmup-epochs", "1")
    )
    assert "checksum" in line and not (tmp_path / "run" / "metrics.json").exists()
