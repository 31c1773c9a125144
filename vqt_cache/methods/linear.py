"""The linear probe: a linear head on the backbone's final feature f_0, L2-normalised as VQT's f_0 group is."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqt_cache.methods.base import Inputs, Method


class Linear(Method):
    name = "linear"
    label = "linear probe"
    style = "--"

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return F.normalize(inputs.final, dim=-1)


METHOD = Linear()
