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

import time

import torch
import torch.nn.functional as F

from bench.memory import saved_activation_bytes
from vqt_cache.backbones import load_backbone
from vqt_cache.model import CachedVQT, LiveVQT
from vqt_cache.query import kv_from_hidden

BATCH = 64
CLASSES = 100


def _images_per_second(step, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return BATCH * repeats / (time.perf_counter() - start)


def _layer_major(backbone, images):
    with torch.no_grad():
        final, hidden = backbone.forward_cache(images)
        hidden = hidden.transpose(0, 1).contiguous()  # (L, B, N, D)
        return final, hidden, kv_from_hidden(backbone.blocks, hidden)  # kv: (L, 2, B, H, N, dh)


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    images = torch.randn(BATCH, 3, 224, 224)
    labels = torch.randint(0, CLASSES, (BATCH,))
    final, hidden, kv = _layer_major(backbone, images)
    caches = {"kv": kv, "hidden": hidden}

    rows = []
    for T in (1, 10):
        vqt = CachedVQT.for_backbone(backbone, T, CLASSES).train()
        live = LiveVQT(backbone, vqt)
        weights = [*backbone.model.parameters(), *vqt.parameters()]

        def step(logits_fn):
            logits = logits_fn()[0]
            F.cross_entropy(logits, labels[: len(logits)]).backward()

        def cached(cache, layout, vqt=vqt):
            vqt.path.layout = layout
            return vqt(final, cache)

        def live_frozen_stream(vqt=vqt):
            f, _, c = _layer_major(backbone, images)
            vqt.path.layout = "kv"
            return vqt(f, c)

        live_sem = _images_per_second(lambda live=live: step(lambda: live(images)), 1 if quick else 2)
        live_fast = _images_per_second(lambda: step(live_frozen_stream), 1 if quick else 2)
        small = images[:4]
        saved = saved_activation_bytes(lambda live=live, x=small: step(lambda: live(x)), [*weights, small]) / 4
        rows.append(
            {
                "T": T,
                "path": "live (authors' semantics)",
                "images_per_s": live_sem,
                "saved_MiB_per_image": saved / 2**20,
            }
        )
        rows.append({"T": T, "path": "live (frozen stream)", "images_per_s": live_fast})
        for layout, cache in caches.items():
            fn = lambda c=cache, lay=layout: step(lambda: cached(c, lay))  # noqa: E731
            fn()  # warm-up
            ips = _images_per_second(fn, 3 if quick else 8)
            saved = saved_activation_bytes(fn, [*weights, cache, final]) / BATCH
            rows.append(
                {
                    "T": T,
                    "path": f"cached {layout} fp32",
                    "images_per_s": ips,
                    "saved_MiB_per_image": saved / 2**20,
                    "x_live_semantics": ips / live_sem,
                    "x_live_frozen": ips / live_fast,
                }
            )
    return [{"bench": "stage_two", **r} for r in rows]
