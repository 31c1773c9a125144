"""Head2Toe-style pooled features: f_0 and each layer's mean cached token, each group L2-normalised."""

from __future__ import annotations

import torch

from vqt_cache.heads import pooled_features
from vqt_cache.methods.base import Geometry, Inputs, Method


class Pooled(Method):
    name = "pooled"
    label = "pooled (Head2Toe-style)"
    reads = frozenset({"means"})
    live_predict = False  # its means come from the cache's layout; `predict` runs the queries' hooks only
    style = ":"

    def feature_dim(self, size: int, geometry: Geometry) -> int:
        return geometry.dim * (1 + geometry.depth)

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return pooled_features(inputs.final, inputs.means)


METHOD = Pooled()
