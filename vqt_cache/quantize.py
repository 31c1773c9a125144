"""8-bit features: one float16 scale per token and group of channels, values in int8 or float8 e4m3.

A feature tensor (..., C) is cut along its last axis into groups of `group` channels; each group of each token
gets its own scale (its absolute maximum over the format's largest value), so a token or a channel group with
large activations ("massive activations" of real ViTs live in a few residual channels) does not cost the others
their precision. For the kv layout the last axis is a head's dh = 64 channels: one scale per (layer, k/v, head,
token). For the hidden layout, D channels make D / group scales per token.

    int8:      q = round(x / s) in [-127, 127],  s = absmax / 127   |x - s·q| <= s/2       (uniform)
    float8:    q = e4m3(x / s),  s = absmax / 448                    |x - s·q| <= |x|/16    (relative, 3 bits)

Scales are stored in float16 and the quantization divides by the rounded scale, so dequantization (q · s, in
float32) is exact about the value that was rounded. Bytes per value: 1 + 2 / group.
"""

from __future__ import annotations

import torch

from vqt_cache.errors import VQTError
from vqt_cache.formats import GROUP

FORMATS = {"int8": (torch.int8, 127.0), "float8": (torch.float8_e4m3fn, 448.0)}


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    channels = x.shape[-1]
    if channels % group:
        raise VQTError(f"{channels} channels do not split into groups of {group}")
    return x.unflatten(-1, (channels // group, group))


def quantize(x: torch.Tensor, kind: str = "int8", group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., C) -> (values (..., C) in 8 bits, scales (..., C // group) float16)."""
    if kind not in FORMATS:
        raise VQTError(f"unknown 8-bit format {kind!r}: use one of {', '.join(FORMATS)}")
    dtype, largest = FORMATS[kind]
    grouped = _groups(x.float(), group)
    low, high = torch.aminmax(grouped, dim=-1)  # one pass; the absolute maximum without an |x| copy
    scale = (torch.maximum(high, low.neg_()) / largest).to(torch.float16)
    divisor = scale.float().masked_fill_(scale == 0, 1.0).unsqueeze(-1)  # an all-zero group stays zero
    scaled = grouped / divisor
    values = scaled.round_().clamp_(-largest, largest).to(dtype) if kind == "int8" else scaled.to(dtype)
    return values.flatten(-2), scale


def dequantize(values: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """(values, scales) -> float32 features (..., C)."""
    return (_groups(values.float(), group) * scale.float().unsqueeze(-1)).flatten(-2)
