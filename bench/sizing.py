"""What the paper's protocols cost on disk (issue 13): ViT-B/16, from the real split sizes of VTAB-1k and FGVC.

Before (format 2): every split of a dataset cached at full width, test sets included, and train800val200 stored
again beside train800 and val200, kv float16. After (format 3): each image once per store, the test set evaluated
live, so a VTAB-1k task caches train800 + val200 (train800val200 costs nothing) and an FGVC task train + val.
Both are computed by `vqt_cache.plan` from the releases' published split sizes (the same figures `vqt-cache plan`
prints for a pipeline whose datasets are not on disk), for every layout and dtype.
"""

from __future__ import annotations

from pathlib import Path

from vqt_cache.backbones import geometry
from vqt_cache.plan import per_image_bytes, plan_pipeline
from vqt_cache.sweep import load_pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
KINDS = [(layout, dtype) for layout in ("kv", "hidden") for dtype in ("float32", "float16", "int8")]
# other backbones at the default (hidden int8), with their default input size and the arguments users pass
BACKBONES = [
    ("vit_s16", {}),
    ("vit_l16", {}),
    ("vit_b14_dinov2", {}),
    ("vit_b14_dinov2", {"img_size": 224}),
    ("vit_b14_dinov2_reg", {"img_size": 224}),
]


def run(quick: bool = False) -> list[dict]:
    rows = []
    for layout, dtype in KINDS:
        rows.append(
            {
                "bench": "sizing",
                "what": f"ViT-B/16 bytes per image, {layout} {dtype}",
                "MB": per_image_bytes("vit_b16", {}, layout, dtype) / 1e6,
            }
        )
    for backbone, kwargs in BACKBONES:
        arguments = "".join(f" {k}={v}" for k, v in kwargs.items())
        rows.append(
            {
                "bench": "sizing_backbones",
                "what": f"{backbone}{arguments}",
                "tokens": geometry(backbone, **kwargs)["tokens"],
                "MB": per_image_bytes(backbone, kwargs, "hidden", "int8") / 1e6,
            }
        )
    for name in ("vtab1k", "fgvc"):
        pipeline = load_pipeline(PIPELINES / f"{name}.toml")
        every = plan_pipeline(pipeline, "kv", "float16")
        images_before = sum(s.images for p in every for s in p.splits)  # every split apart, test included
        before = images_before * every[0].bytes_per_image
        rows.append({"bench": "sizing", "what": f"{name} before: every split, kv float16", "GB": before / 1e9})
        for layout, dtype in KINDS:
            plans = plan_pipeline(pipeline, layout, dtype)
            after = sum(p.total_bytes for p in plans)
            images = sum(s.new_images for p in plans for s in p.splits)
            rows.append(
                {
                    "bench": "sizing",
                    "what": f"{name} after: {images} training images once, {layout} {dtype}",
                    "GB": after / 1e9,
                    "x_smaller": before / after,
                }
            )
    return rows
