"""The pooled baseline: f_0 and each layer's mean value vector, each group L2-normalised.

Per layer l it reads V̄_l, the mean over the N tokens of the attention's value vectors (heads concatenated): a kv
store holds the values; a hidden store holds the LN1 inputs X̂_l, whose mean the block's own qkv projection turns
into the same V̄_l (the projection is affine; `model.value_means`). One feature whatever the layout (equal to
float32 rounding, a test).

How it differs from Head2Toe (Evci et al. 2022), which it resembles: Head2Toe pools many intermediate activations
of every block (several poolings each, to a fixed size), concatenates them and selects features with a group-lasso
before a linear probe; here each layer contributes one mean value vector, nothing is selected (`compress` offers
group-lasso selection separately), and the groups are L2-normalised as VQT's features are.
"""

from __future__ import annotations

import torch

from vqt_cache.heads import pooled_features
from vqt_cache.methods.base import Geometry, Inputs, Method


class Pooled(Method):
    name = "pooled"
    label = "pooled (mean values per layer)"
    reads = frozenset({"means"})
    version = 2  # 1: the mean cached token, which differed between a kv and a hidden store (before issue 30)
    live_predict = False  # its means come from the cache's layout; `LiveVQT` runs the queries' hooks only
    style = ":"

    def feature_dim(self, size: int, geometry: Geometry) -> int:
        return geometry.dim * (1 + geometry.depth)

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return pooled_features(inputs.final, inputs.means)


METHOD = Pooled()
