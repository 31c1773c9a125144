"""Shared fixtures: tiny random-init timm ViTs covering every block variant the query path must support."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vqt_cache.backbones import Backbone, load_backbone, weights_fingerprint

_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)

# variant -> (timm name, kwargs): each one exercises a different part of the frozen block or the final feature.
VARIANTS: dict[str, tuple[str, dict]] = {
    "cls": ("vit_tiny_patch16_224", {}),
    "gap_fc_norm": ("vit_tiny_patch16_224", {"global_pool": "avg"}),  # MAE style: fc_norm of the mean token
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "patch_size": 7}),  # DINOv2-reg
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "layer_scale": ("vit_tiny_patch16_224", {"init_values": 0.5}),
    "no_qkv_bias": ("vit_tiny_patch16_224", {"qkv_bias": False}),
    "pre_norm": ("vit_base_patch16_clip_224", {}),  # CLIP: norm_pre before the blocks
    "quick_gelu": ("vit_base_patch16_clip_quickgelu_224", {}),
}


def tiny_backbone(variant: str, seed: int = 0) -> Backbone:
    """A tiny random-init backbone whose every parameter is perturbed, so no LN/bias/scale is a no-op."""
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    backbone = load_backbone(name, weights="random", **{**_TINY, **kwargs})
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return dataclasses.replace(backbone, fingerprint=weights_fingerprint(backbone.model))


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


def images_for(backbone: Backbone, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = backbone.model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
