"""VQT (the paper): T query tokens per layer read each layer's cached tokens through the frozen blocks; the head
reads f_0 and every layer's query outputs, each group L2-normalised (docs/method.md §3)."""

from __future__ import annotations

import torch

from vqt_cache.heads import assemble_features, feature_dim
from vqt_cache.methods.base import Geometry, Inputs, Method


class VQT(Method):
    name = "vqt"
    label = "VQT"
    size = "T"
    default_sizes = (1,)
    reads = frozenset({"cache"})
    compressible = True
    style = "-"

    def reads_cache(self, size: int) -> bool:
        return size > 0  # T = 0 is the linear probe on f_0, computed without the cache

    def num_queries(self, size: int) -> int:
        return size

    def feature_dim(self, size: int, geometry: Geometry) -> int:
        return feature_dim(geometry.dim, geometry.depth, size)

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return assemble_features(inputs.final, inputs.outputs)


METHOD = VQT()
