"""DINOv2's linear protocol: a linear head on the class tokens of the last n blocks and the mean of the last
block's patch tokens, each through the backbone's final norm, concatenated in that order (as dinov2's
`create_linear_input` builds them from `get_intermediate_layers(x, n, return_class_token=True)`; no further
normalisation). The sizes are n = 1 and 4, both trained in a grid, as DINOv2 selects between them on validation.

It reads the store's probe arrays (`extract --probes`): every block's class token and the patch mean, float32 in
every store dtype, so these features are the backbone's own to float32 rounding. Deriving the class tokens from the
cached LN1 inputs instead (LN1 of block l+1 and the final norm normalise the same residual Z_l, so one is an
affine map of the other) would serve hidden stores only, carry the cache's int8 error, and still lack the patch
mean, which no block's input holds: docs/method.md §9 gives the errors of both ways.
"""

from __future__ import annotations

import torch

from vqt_cache.errors import VQTError
from vqt_cache.methods.base import Geometry, Inputs, Method
from vqt_cache.recipe import LINEAR_MULTI_BLOCKS


class LinearMulti(Method):
    name = "linear-multi"
    recipe = "dinov2-linear"
    label = "linear-multi (DINOv2)"
    size = "n"
    default_sizes = LINEAR_MULTI_BLOCKS
    reads = frozenset({"probes"})
    style = "-."

    def check_size(self, size: int) -> int:
        if size < 1:
            raise VQTError(f"linear-multi reads the class tokens of the last n >= 1 blocks, got n={size}")
        return size

    def check_geometry(self, size: int, geometry: Geometry) -> None:
        if size > geometry.depth:
            raise VQTError(
                f"linear-multi n={size} needs {size} blocks, but the backbone has {geometry.depth}: choose n <= "
                f"{geometry.depth} with --blocks (default {','.join(map(str, self.default_sizes))}; in a pipeline, "
                "blocks = [...] in its [[datasets]] table)"
            )

    def feature_dim(self, size: int, geometry: Geometry) -> int:
        return geometry.dim * (size + 1)

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return torch.cat([inputs.class_tokens[:, -size:].flatten(1), inputs.patch_mean], dim=1)


METHOD = LinearMulti()
