"""The linear probes on the backbone's final feature f_0: `linear`, the plain probe that VPT and DINOv2 report (a
linear head on f_0 as the backbone gives it), and `linear-norm`, the head on f_0 / ||f_0||, which is VQT's f_0
feature group alone (the VQT head with T = 0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqt_cache.methods.base import Inputs, Method


class Linear(Method):
    name = "linear"
    label = "linear probe"
    version = 2  # 1: f_0 L2-normalised (now `linear-norm`; before issue 30)
    recipe = "dinov2-linear"  # DINOv2's classifier with n = 1 and no average pool is this probe
    style = "--"

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return inputs.final


class LinearNorm(Linear):
    name = "linear-norm"
    label = "linear probe on f_0/|f_0|"
    version = 1
    recipe = "vqt"  # VQT with T = 0
    style = (0, (1, 1))  # dotted densely: beside linear's dashes

    def features(self, size: int, probe: None, inputs: Inputs) -> torch.Tensor:
        return F.normalize(inputs.final, dim=-1)


METHOD = Linear()
NORMALISED = LinearNorm()
