"""Stage-two speed: the cached query path vs live VQT steps, forward + backward (issue 3).

ViT-B/16 geometry with random weights, batch 64, CPU, fp32. The cache is held in memory in the layer-major
layout the query path reads. Two live baselines run on the same images:
- "live (authors' semantics)": `LiveVQT`, one forward of the backbone over [tokens; queries] per block with an
  attention mask; autograd records the whole sequence, as in the authors' code.
- "live (frozen stream)": the cheapest possible live step: the backbone forward without autograd, K/V computed
  from it, then the same query path; this is the compute bound of caching (the backbone forward is what the
  cache saves).
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from vqt_cache.backbones import load_backbone
from vqt_cache.model import CachedVQT, LiveVQT, saved_activation_bytes
from vqt_cache.query import kv_from_hidden

BATCH = 64
CLASSES = 100


def images_per_second(step, repeats: int, batch: int = BATCH) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - start)


@functools.cache
def vit_b16():
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    images = torch.randn(BATCH, 3, 224, 224)
    labels = torch.randint(0, CLASSES, (BATCH,))
    return backbone, images, labels


def _layer_major(backbone, images):
    with torch.no_grad():
        final, hidden = backbone.forward_cache(images)
        hidden = hidden.transpose(0, 1).contiguous()  # (L, B, N, D)
        return final, hidden, kv_from_hidden(backbone.blocks, hidden)  # kv: (L, 2, B, H, N, dh)


def _step(logits_fn, labels):
    logits = logits_fn()[0]
    F.cross_entropy(logits, labels[: len(logits)]).backward()


@functools.cache
def live_rates(T: int, quick: bool) -> dict[str, float]:
    """images/s of both live steps at T queries (measured once per process), and the authors' saved bytes."""
    backbone, images, labels = vit_b16()
    vqt = CachedVQT.for_backbone(backbone, T, CLASSES).train()
    live = LiveVQT(backbone, vqt)

    def frozen_stream():
        final, _, cache = _layer_major(backbone, images)
        return vqt(final, cache)

    repeats = 1 if quick else 2
    rates = {
        "semantics": images_per_second(lambda: _step(lambda: live(images), labels), repeats),
        "frozen": images_per_second(lambda: _step(frozen_stream, labels), repeats),
    }
    small = images[:4]
    weights = [*backbone.model.parameters(), *vqt.parameters()]
    rates["semantics_saved"] = saved_activation_bytes(lambda: _step(lambda: live(small), labels), [*weights, small]) / 4
    return rates


def run(quick: bool = False) -> list[dict]:
    backbone, images, labels = vit_b16()
    final, hidden, kv = _layer_major(backbone, images)
    rows = []
    for T in (1, 10):
        live = live_rates(T, quick)
        rows.append(
            {
                "T": T,
                "path": "live (authors' semantics)",
                "images_per_s": live["semantics"],
                "saved_MiB_per_image": live["semantics_saved"] / 2**20,
            }
        )
        rows.append({"T": T, "path": "live (frozen stream)", "images_per_s": live["frozen"]})
        vqt = CachedVQT.for_backbone(backbone, T, CLASSES).train()
        weights = [*backbone.model.parameters(), *vqt.parameters()]
        for layout, cache in (("kv", kv), ("hidden", hidden)):
            vqt.path.layout = layout
            fn = lambda c=cache, m=vqt: _step(lambda: m(final, c), labels)  # noqa: E731
            fn()  # warm-up
            ips = images_per_second(fn, 3 if quick else 8)
            saved = saved_activation_bytes(fn, [*weights, cache, final]) / BATCH
            rows.append(
                {
                    "T": T,
                    "path": f"cached {layout} fp32 (in memory)",
                    "images_per_s": ips,
                    "saved_MiB_per_image": saved / 2**20,
                    "x_live_semantics": ips / live["semantics"],
                    "x_live_frozen": ips / live["frozen"],
                }
            )
    return [{"bench": "stage_two", **r} for r in rows]
