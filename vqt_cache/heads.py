"""Feature assembly and the linear head (docs/method.md §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feature_dim(dim: int, depth: int, num_queries: int) -> int:
    """F = D·(1 + L·T): the final feature plus T query outputs per layer."""
    return dim * (1 + depth * num_queries)


def assemble_features(final: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """concat(f_0/‖f_0‖, f_1/‖f_1‖, ..., f_L/‖f_L‖) with f_l = flatten(O_l) token-major.

    Args:
        final: (B, D) the frozen backbone's final feature f_0.
        outputs: (B, L, T, D) the per-layer query outputs O_l.

    Returns:
        (B, D·(1 + L·T)) features, each of the 1 + L groups of unit L2 norm.
    """
    per_layer = F.normalize(outputs.flatten(2), dim=-1).flatten(1)  # (B, L·T·D)
    return torch.cat([F.normalize(final, dim=-1), per_layer], dim=1)


def token_means(rows: torch.Tensor, layout: str) -> torch.Tensor:
    """Each layer's mean cached token, for the pooled baseline: (n, L, D) float32 from image-major rows.

    The rows are (n, L, 2, H, N, dh) for layout "kv", whose mean token is V_l's (heads concatenated), or
    (n, L, N, D) for "hidden", whose mean token is X̂_l = LN1(Z_{l-1})'s. A layer-major batch gives its rows with
    `cache.movedim(batch_axis, 0)`.
    """
    rows = rows.float()
    if layout == "kv":  # (n, L, H, N, dh) values -> (n, L, H, dh) -> (n, L, H·dh)
        return rows[:, :, 1].mean(dim=3).flatten(2)
    return rows.mean(dim=2)


def pooled_features(final: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Head2Toe-style baseline: f_0 plus each layer's mean cached token (`token_means`), each group
    L2-normalised: (B, D) and (B, L, D) -> (B, D·(1 + L))."""
    return torch.cat([F.normalize(final, dim=-1), F.normalize(means, dim=-1).flatten(1)], dim=1)


HEAD_INITS = ("kaiming_fan_out", "normal", "torch")


def linear_head(
    in_features: int, num_classes: int, generator: torch.Generator | None = None, init: str = "kaiming_fan_out"
) -> nn.Linear:
    """One Linear(F, C), drawn from `generator` as a paper initialises it (`recipe.Optimization.head_init`):
    "kaiming_fan_out": VPT's and VQT's, weight kaiming-normal (fan_out), torch's default uniform(±1/sqrt(F)) bias;
    "normal": DINOv2's linear classifier, weight N(0, 0.01), bias 0;
    "torch": nn.Linear's own (V-JEPA's classifier), weight and bias uniform(±1/sqrt(F))."""
    head = nn.Linear(in_features, num_classes)
    bound = 1 / in_features**0.5
    with torch.no_grad():
        if init == "kaiming_fan_out":
            nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out", generator=generator)
            nn.init.uniform_(head.bias, -bound, bound, generator=generator)
        elif init == "normal":
            nn.init.normal_(head.weight, 0.0, 0.01, generator=generator)
            nn.init.zeros_(head.bias)
        elif init == "torch":
            nn.init.kaiming_uniform_(head.weight, a=5**0.5, generator=generator)  # = uniform(±1/sqrt(F))
            nn.init.uniform_(head.bias, -bound, bound, generator=generator)
        else:
            raise ValueError(f"unknown head initialisation {init!r}: one of {HEAD_INITS}")
    return head
