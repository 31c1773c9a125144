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
