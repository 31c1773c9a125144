import pytest
import torch
from safetensors.torch import save_file

from vqt_cache.backbones import BACKBONES, load_backbone, resolve_name
from vqt_cache.errors import VQTError

from conftest import tiny_backbone


def test_short_names_resolve_to_timm_models():
    for short, (timm_name, _) in BACKBONES.items():
        assert resolve_name(short)[0] == timm_name


def test_unknown_name_is_a_clear_error():
    with pytest.raises(VQTError, match="unknown backbone 'vit_nope'"):
        load_backbone("vit_nope", weights="random")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(VQTError, match="does not exist"):
        load_backbone("vit_tiny_patch16_224", weights=tmp_path / "missing.pth")


@pytest.mark.parametrize("name", ["vit_base_patch16_rpn_224", "resnet18"])
def test_unsupported_blocks_are_refused(name):
    tiny = {"depth": 1, "embed_dim": 48, "num_heads": 3} if "vit" in name else {}
    with pytest.raises(VQTError, match="ResPostBlock|VisionTransformer"):
        load_backbone(name, weights="random", **tiny)


# timm families: the ones whose every block is timm's pre-norm Block with standard Attention are accepted, wherever
# timm defines them (vision_transformer, deit); the rest are refused by what they lack, before any weights load
FAMILIES = {
    "vit_base_patch16_224": None,
    "deit_tiny_patch16_224": None,
    "deit3_small_patch16_224": None,
    "deit_tiny_distilled_patch16_224": None,
    "flexivit_small": None,
    "vit_base_patch16_siglip_224": None,
    "vit_betwixt_patch16_reg4_gap_256": None,
    "vit_small_patch16_18x2_224": "ParallelThingsBlock",
    "vit_base_patch16_rpn_224": "ResPostBlock",
    "vit_relpos_base_patch16_224": "is a VisionTransformerRelPos",
    "eva02_tiny_patch14_224": "is a Eva",
    "beit_base_patch16_224": "is a Beit",
    "swin_tiny_patch4_window7_224": "is a SwinTransformer",
    "naflexvit_base_patch16_gap": "is a NaFlexVit",
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_timm_families_are_accepted_or_refused_by_what_they_lack(name):
    from vqt_cache.backbones import geometry

    if FAMILIES[name] is None:
        assert geometry(name)["depth"] >= 1
    else:
        with pytest.raises(VQTError, match=FAMILIES[name]):
            geometry(name)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads_through_timm_overlay(tmp_path, suffix):
    src = tiny_backbone("cls")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    loaded = load_backbone("vit_tiny_patch16_224", weights=path, **src.kwargs)
    assert loaded.fingerprint == src.fingerprint


def test_weights_file_of_another_shape_is_a_clear_error(tmp_path):
    src = tiny_backbone("cls")
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    with pytest.raises(VQTError, match="does not fit"):
        load_backbone("vit_tiny_patch16_224", weights=path, **{**src.kwargs, "embed_dim": 64, "num_heads": 4})


def test_fingerprint_tracks_weights():
    a, b = tiny_backbone("cls", seed=0), tiny_backbone("cls", seed=0)
    assert a.fingerprint == b.fingerprint
    assert tiny_backbone("cls", seed=1).fingerprint != a.fingerprint


def test_backbone_is_frozen_and_described(variant):
    b = tiny_backbone(variant)
    assert not any(p.requires_grad for p in b.model.parameters())
    d = b.describe()
    assert d["depth"] == 3 and d["dim"] == 48 and d["heads"] == 3
    final, hidden = b.forward_cache(torch.zeros(2, 3, *b.model.patch_embed.img_size))
    assert final.shape == (2, 48)
    assert hidden.shape == (2, 3, b.tokens, 48)
    assert b.data_config["input_size"][1:] == tuple(b.model.patch_embed.img_size)


def test_offline_without_cached_weights_is_one_sentence_at_once(tmp_path):
    """HF_HUB_OFFLINE with an empty cache: the missing weights are named before timm tries the hub."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = ["extract", "--backbone", "vit_b16", "--dataset", "digits", "--out", str(tmp_path / "s.zarr")]
    done = subprocess.run(
        [sys.executable, "-m", "vqt_cache", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "not in the local Hugging Face cache" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "name", ["deit_tiny_patch16_224", "deit3_small_patch16_224", "deit_tiny_distilled_patch16_224"]
)
def test_deit_extracts_through_the_cli(tmp_path, name):
    """A DeiT store through `vqt-cache extract`: its f_0 is the model's own pre-logits feature."""
    import numpy as np

    from vqt_cache.datasets import ImageSplit, open_dataset
    from vqt_cache.store import open_store

    from conftest import run_cli

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    args = ["extract", "--backbone", name, "--weights", "random", "--dataset", "digits", "--splits", "val200"]
    args += [f"--model-arg={k}={v}" for k, v in kwargs.items()] + ["--workers", "0", "--out", str(tmp_path / "s.zarr")]
    code, out = run_cli(*args)
    assert code == 0, out
    store = open_store(str(tmp_path / "s.zarr"))
    backbone = load_backbone(name, weights="random", **kwargs)
    dataset = open_dataset("digits")
    images = torch.stack([ImageSplit(dataset, dataset.split("val200")[:4], store.attrs["preprocessing"])[i][0]
                          for i in range(4)])  # fmt: skip
    with torch.no_grad():
        final = backbone.model.forward_head(backbone.model.forward_features(images), pre_logits=True)
    np.testing.assert_allclose(store.split("val200").final()[:4], final.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["hidden", "kv"])
def test_bf16_forward_is_timms_forward_under_autocast_and_near_float32(variant, layout):
    """extract --precision bf16: the frozen forward is timm's own under bfloat16 autocast (its f_0 bit for bit),
    the features captured inside it as in float32; against float32 they differ by what bfloat16 costs (measured on
    every variant: f_0 at most 1.01% in relative norm, the layers 0.70%, and 1.5% of an image's largest value at any
    one feature, which `verify --recompute` allows twice over; bounds 2%, 1.5% and 2.5%)."""
    b = tiny_backbone(variant)
    torch.manual_seed(1)
    images = torch.randn(4, 3, *b.model.patch_embed.img_size)
    final, layers = b.forward_cache(images, layout=layout, precision="bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = b.model.forward_head(b.model.forward_features(images), pre_logits=True)
    assert final.dtype == layers.dtype == torch.float32 and torch.equal(final, own.float())
    final32, layers32 = b.forward_cache(images, layout=layout)
    relative = lambda a, exact: ((a - exact).norm() / exact.norm()).item()  # noqa: E731
    assert 0 < relative(final, final32) < 0.02 and 0 < relative(layers, layers32) < 0.015
    for image, exact in zip(layers, layers32, strict=True):
        assert (image - exact).abs().max() <= 0.025 * max(exact.abs().max(), 1.0)
    with pytest.raises(VQTError, match="unknown precision 'fp8'"):
        b.forward_cache(images, precision="fp8")
