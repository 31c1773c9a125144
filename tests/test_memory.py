"""Autograd records only the query tokens: saved activations per image stay tiny at ViT-B/16 geometry."""

import pytest
import torch
import torch.nn.functional as F

from vqt_cache.backbones import load_backbone
from vqt_cache.model import CachedVQT, saved_activation_bytes
from vqt_cache.query import kv_from_hidden


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return load_backbone("vit_b16", weights="random")


@pytest.mark.parametrize("layout", ["kv", "hidden"])
def test_saved_activations_per_image_at_t1(vit_b16, layout):
    images = torch.randn(2, 3, 224, 224)
    final, hidden = vit_b16.forward_cache(images)
    hidden = hidden.transpose(0, 1).contiguous()
    cache = kv_from_hidden(vit_b16.blocks, hidden) if layout == "kv" else hidden
    vqt = CachedVQT.for_backbone(vit_b16, 1, 100, layout=layout).train()
    weights = [*vit_b16.model.parameters(), *vqt.parameters()]

    def step():
        F.cross_entropy(vqt(final, cache)[0], torch.tensor([1, 2])).backward()

    per_image = saved_activation_bytes(step, [*weights, cache, final]) / 2
    # one image token row of one layer alone is 197·768·4 B = 0.58 MiB: nothing of the token stream is saved
    assert per_image <= 0.5 * 2**20
    grad = vqt.runs[0].queries.prompts.grad
    assert grad is not None and grad.abs().sum() > 0
