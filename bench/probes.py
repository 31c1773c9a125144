"""What the attentive and linear-multi probes cost in a store, and why it stores them instead of deriving them
(docs/method.md §9): bytes per ViT-B/16 image of `extract --probes`, and the error of linear-multi's class tokens
derived from a hidden cache (LN1 of block l+1 is an affine map of the final norm of the same residual Z_l) against
the stored ones, from a float32 and from an int8 cache.

ViT-B/16 geometry with random weights (perturbed, so no norm is the identity) on random images: the error is a
property of the arithmetic and the quantization, not of what the weights learned.
"""

from __future__ import annotations

import torch

from vqt_cache.backbones import geometry, load_backbone
from vqt_cache.formats import GROUP
from vqt_cache.plan import per_image_bytes
from vqt_cache.quantize import dequantize, quantize
from vqt_cache.store import probe_bytes


def derived_class_tokens(backbone, hidden: torch.Tensor) -> torch.Tensor:
    """norm_f(Z_l)[cls] for l = 1..L-1 from the cached LN1_{l+1}(Z_l) (B, L, N, D): (B, L-1, D)."""
    norm, out = backbone.model.norm, []
    for layer in range(1, backbone.depth):
        ln = backbone.model.blocks[layer].norm1
        out.append((hidden[:, layer, 0] - ln.bias) / ln.weight * norm.weight + norm.bias)
    return torch.stack(out, dim=1)


def run(quick: bool = False) -> list[dict]:
    shape = geometry("vit_b16")
    rows = []
    for dtype in ("int8", "float16", "float32"):
        extra = probe_bytes(shape, dtype)
        rows.append(
            {
                "bench": "probes",
                "what": f"ViT-B/16 probe arrays per image, {dtype}",
                "kB": extra / 1e3,
                "vs hidden %": 100 * extra / per_image_bytes("vit_b16", {}, "hidden", dtype),
                "vs kv %": 100 * extra / per_image_bytes("vit_b16", {}, "kv", dtype),
            }
        )
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images = torch.randn(2 if quick else 8, 3, 224, 224)
    probes: dict[str, torch.Tensor] = {}
    _, hidden = backbone.forward_cache(images, layout="hidden", probes=probes)
    stored = probes["class_tokens"][:, :-1]
    with torch.no_grad():
        for dtype, cache in (("float32", hidden), ("int8", dequantize(*quantize(hidden, "int8", GROUP), GROUP))):
            error = (derived_class_tokens(backbone, cache) - stored).abs()
            rows.append(
                {
                    "bench": "probes",
                    "what": f"class tokens derived from a hidden {dtype} cache vs stored",
                    "max abs": error.max().item(),
                    "mean abs": error.mean().item(),
                    "token rms": stored.pow(2).mean().sqrt().item(),
                }
            )
    return rows
