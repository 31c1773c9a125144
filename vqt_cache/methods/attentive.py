"""The attentive probe of V-JEPA (Bardes et al. 2024) as its code releases it: `AttentiveClassifier` in
facebookresearch/jepa, src/models/attentive_pooler.py, with depth 1 and one query.

One learned query token q attends over the final block's patch tokens x through one cross-attention block with the
backbone's number of heads and a 4x MLP, and a linear head reads the query's output:

    q' = q + MHA(W_q q, W_kv LN1(x))        (no output projection: see below)
    z  = q' + fc2(GELU(fc1(LN2(q'))))       logits = W z + b

- The released `CrossAttention` defines an output projection but never applies it, so its attention output goes
  straight into the residual; a later change that applied it was reverted for breaking the evaluations, and V-JEPA 2
  removes the unused layer. This probe has none. The query is not normalised before attending; LN1 normalises the
  tokens only.
- LayerNorms are torch's default (eps 1e-5). q and kv carry biases. The query and every Linear weight of the block are
  drawn from a truncated normal (std 0.02, cut at +-2), biases zero, and fc2's weight is divided by sqrt(2), as the
  released `_rescale_blocks` does for one block. The classifier's head is a plain `nn.Linear` with torch's default
  initialisation (weight and bias uniform in +-1/sqrt(D)).
- Tokens: the store's probe arrays hold a timm ViT's patch tokens after its final norm (`extract --probes`). V-JEPA's
  encoder has no class token; here the class token and any register tokens are left out, so the probe sees what
  V-JEPA's sees: patch tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vqt_cache.errors import VQTError
from vqt_cache.methods.base import Geometry, Inputs, Method

MLP_RATIO = 4
INIT_STD = 0.02  # V-JEPA's init_std: the query and the block's Linear weights


class AttentivePooler(nn.Module):
    """One learned query and one cross-attention block over a sequence of tokens: (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, heads: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)
        with torch.no_grad():
            nn.init.trunc_normal_(self.query, std=INIT_STD, generator=generator)
            for layer in (self.q, self.kv, self.fc1, self.fc2):
                nn.init.trunc_normal_(layer.weight, std=INIT_STD, generator=generator)
                nn.init.zeros_(layer.bias)
            self.fc2.weight.div_(math.sqrt(2.0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        H = self.heads
        q = self.query.expand(B, -1, -1)
        k, v = self.kv(self.norm1(tokens)).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(self.q(q).view(B, 1, H, D // H).transpose(1, 2), k, v)
        q = q + attended.transpose(1, 2).reshape(B, 1, D)
        q = q + self.fc2(F.gelu(self.fc1(self.norm2(q))))
        return q[:, 0]


class Attentive(Method):
    name = "attentive"
    label = "attentive probe"
    reads = frozenset({"probes"})
    version = 2  # 1: with an output projection, LayerNorm eps 1e-6 and VQT's head (vqt-cache before issue 30)
    recipe = "vjepa-probe"
    lr_scale = 0.01  # shared recipe: the grid's base lrs 1 .. 0.05 become 0.01 .. 5e-4 (Adam over a block diverges)
    style = (0, (5, 1, 1, 1))  # dash-dot-dot: beside linear-multi's dash-dot

    def check_geometry(self, size: int, geometry: Geometry) -> None:
        if not geometry.heads or geometry.dim % geometry.heads:
            raise VQTError(f"the attentive probe needs the backbone's heads, and {geometry.heads} do not divide D")

    def probe(self, size: int, geometry: Geometry, generator: torch.Generator) -> nn.Module:
        return AttentivePooler(geometry.dim, geometry.heads, generator)

    def features(self, size: int, probe: AttentivePooler, inputs: Inputs) -> torch.Tensor:
        return probe(inputs.tokens)


METHOD = Attentive()
