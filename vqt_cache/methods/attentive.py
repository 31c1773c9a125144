"""The attentive probe (as in V-JEPA, AIM and CAPI): one learned query token attends, through one pre-norm
cross-attention block with the backbone's number of heads and a 4x MLP, over the final block's patch tokens
(through the final norm); a linear head reads the query's output.

The block is V-JEPA's `CrossAttentionBlock` (src/models/attentive_pooler.py): q = q + proj(attn(W_q q,
W_kv LN(x))); q = q + MLP(LN(q)); LayerNorm eps 1e-6, q/kv biases, the query drawn from a truncated normal (std
0.02), every Linear weight too (biases zero), the two output projections divided by sqrt(2), as its
`_rescale_blocks` does for one block. It reads the store's probe arrays (`extract --probes`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqt_cache.errors import VQTError
from vqt_cache.methods.base import Geometry, Inputs, Method

MLP_RATIO = 4
INIT_STD = 0.02
EPS = 1e-6


class AttentivePooler(nn.Module):
    """One learned query and one cross-attention block over a sequence of tokens: (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, heads: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=INIT_STD, generator=generator)
            for layer in (self.q, self.kv, self.proj, self.fc1, self.fc2):
                nn.init.trunc_normal_(layer.weight, std=INIT_STD, generator=generator)
                nn.init.zeros_(layer.bias)
            for layer in (self.proj, self.fc2):
                layer.weight.div_(math.sqrt(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        H = self.heads
        q = self.query.expand(B, -1, -1)
        x = self.norm1(tokens)
        k, v = self.kv(x).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(self.q(q).view(B, 1, H, D // H).transpose(1, 2), k, v)
        q = q + self.proj(attended.transpose(1, 2).reshape(B, 1, D))
        q = q + self.fc2(F.gelu(self.fc1(self.norm2(q))))
        return q[:, 0]


class Attentive(Method):
    name = "attentive"
    label = "attentive probe"
    reads = frozenset({"probes"})
    lr_scale = 0.01  # the grid's base lrs 1 .. 0.05 become 0.01 .. 5e-4, around V-JEPA's probe lr (Adam over a block)
    style = (0, (5, 1, 1, 1))  # dash-dot-dot: beside linear-multi's dash-dot

    def check_geometry(self, size: int, geometry: Geometry) -> None:
        if not geometry.heads or geometry.dim % geometry.heads:
            raise VQTError(f"the attentive probe needs the backbone's heads, and {geometry.heads} do not divide D")

    def probe(self, size: int, geometry: Geometry, generator: torch.Generator) -> nn.Module:
        return AttentivePooler(geometry.dim, geometry.heads, generator)

    def features(self, size: int, probe: AttentivePooler, inputs: Inputs) -> torch.Tensor:
        return probe(inputs.tokens)


METHOD = Attentive()
