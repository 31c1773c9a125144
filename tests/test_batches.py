"""Stage-two batches: stored dtype until the batch, widened exactly, baselines reading only what they need."""

import numpy as np
import pytest
import torch

from vqt_cache.batches import CachedSplit, widen
from vqt_cache.heads import token_means
from vqt_cache.quantize import dequantize, quantize
from vqt_cache.store import open_store


def test_widening_int8_into_float32_is_exact_and_into_bf16_within_its_rounding():
    x = torch.randn(3, 5, 7, 128) * torch.logspace(-3, 2, 128)
    values, scales = quantize(x, "int8", 64)
    exact = dequantize(values, scales, 64)
    assert torch.equal(widen(values, scales.float(), 64, torch.empty(x.shape)), exact)
    bf16 = widen(values, scales.float(), 64, torch.empty(x.shape, dtype=torch.bfloat16)).float()
    assert ((bf16 - exact).abs() <= exact.abs() * 2**-7).all()  # two roundings of 2^-9: scale and product


def batches(split, **kwargs):
    """Batches in reverse order (a batch's buffers are reused two batches later: compare them as they come)."""
    return CachedSplit(split, batch_size=64, **kwargs).batches(np.arange(199, -1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_held_in_the_stored_dtype_and_streamed_alike(tiny_store, dtype):
    split = open_store(tiny_store).split("val200")
    held = CachedSplit(split, batch_size=64, dtype=dtype)
    assert held.in_memory and held._values.dtype == torch.float16  # the tiny store holds float16
    exact = torch.from_numpy(np.stack([split.row(i) for i in range(199, -1, -1)])).to(dtype)  # image-major
    pairs = zip(batches(split, dtype=dtype), batches(split, dtype=dtype, memory_budget=0), strict=True)
    for k, (a, b) in enumerate(pairs):
        assert a.cache.dtype == dtype and torch.equal(a.cache, b.cache)
        assert torch.equal(a.cache.movedim(2, 0), exact[64 * k : 64 * (k + 1)])
        assert torch.equal(a.final, b.final) and torch.equal(a.labels, b.labels)


def test_baselines_read_f0_and_the_means_only(tiny_store):
    split = open_store(tiny_store).split("val200")
    pooled = CachedSplit(split, batch_size=64, cache=False, means=True)
    assert pooled.resident_bytes < len(pooled) * pooled.row_bytes / 10  # the features are not kept
    for a, b in zip(batches(split), pooled.batches(np.arange(199, -1, -1)), strict=True):
        assert b.cache is None and torch.equal(a.final, b.final)
        torch.testing.assert_close(b.means, token_means(a.cache.movedim(2, 0), "kv"), rtol=1e-6, atol=1e-6)
    linear = next(iter(CachedSplit(split, cache=False).batches()))
    assert linear.cache is None and linear.means is None and linear.final.shape == (128, 48)  # the tiny ViT: D = 48


def test_a_damaged_shard_is_refused_even_when_only_f0_is_read(tiny_store, tmp_path):
    import shutil

    from vqt_cache.errors import VQTError

    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    row = int(open_store(str(copy)).split("val200").rows()[5])
    chunk = copy / "images" / "kv" / "c" / str(row) / "0" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-8] + b"\1" * 8)
    with pytest.raises(VQTError, match="checksum|cannot be read"):
        CachedSplit(open_store(str(copy)).split("val200"), cache=False)
