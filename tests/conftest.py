"""Shared fixtures: tiny random-init timm ViTs covering every block variant the query path must support."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vqt_cache.backbones import Backbone, load_backbone, weights_fingerprint
from vqt_cache.datasets import register_dataset


def pytest_addoption(parser):
    parser.addoption(
        "--update-docs",
        action="store_true",
        help="rewrite docs/troubleshooting.md's bad-input table from the messages the cases print",
    )


_TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)

# variant -> (timm name, kwargs): each one exercises a different part of the frozen block or the final feature.
VARIANTS: dict[str, tuple[str, dict]] = {
    "cls": ("vit_tiny_patch16_224", {}),
    "gap_fc_norm": ("vit_tiny_patch16_224", {"global_pool": "avg"}),  # MAE style: fc_norm of the mean token
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "patch_size": 7}),  # DINOv2-reg
    "qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "layer_scale": ("vit_tiny_patch16_224", {"init_values": 0.5}),
    "no_qkv_bias": ("vit_tiny_patch16_224", {"qkv_bias": False}),
    "pre_norm": ("vit_base_patch16_clip_224", {}),  # CLIP: norm_pre before the blocks
    "quick_gelu": ("vit_base_patch16_clip_quickgelu_224", {}),
    "deit": ("deit_tiny_patch16_224", {}),  # timm.models.deit
    "deit3": ("deit3_small_patch16_224", {}),  # DeiT-III: no position embedding on the class token, layer scale
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),  # a distillation token; f_0 averages both heads'
}


def tiny_backbone(variant: str, seed: int = 0, device: torch.device | str = "cpu") -> Backbone:
    """A tiny random-init backbone whose every parameter is perturbed, so no LN/bias/scale is a no-op."""
    name, kwargs = VARIANTS[variant]
    torch.manual_seed(seed)
    backbone = load_backbone(name, weights="random", **{**_TINY, **kwargs})
    with torch.no_grad():
        for p in backbone.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    backbone = dataclasses.replace(backbone, fingerprint=weights_fingerprint(backbone.model))
    backbone.model.to(device)
    return backbone


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """cpu always; cuda with `pytest -m gpu` on a machine that has one (fp32 matmuls, no TF32)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.param)


def images_for(backbone: Backbone, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = backbone.model.patch_embed.img_size
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    return images.to(next(backbone.model.parameters()).device)


# The tiny backbone that extraction tests run (random weights are seeded, so every run gets the same model).
TINY_EXTRACT = dict(
    backbone="vit_tiny_patch16_224",
    weights="random",
    model_kwargs=dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3),
)


def small_digits(root=None):
    """The digits in splits a tenth of the usual size, named for what they are: train 80, val 20, trainval (their
    union, 100) and test 60. For tests of mechanics (sweeps, reports) that need several trainings, not accuracy."""
    from vqt_cache.datasets import digits

    full = digits()
    train, val, test = full.splits["train800"][:80], full.splits["val200"][:20], full.splits["test"][:60]
    splits = {"train": train, "val": val, "trainval": train + val, "test": test}
    return dataclasses.replace(full, name="digits-small", splits=splits)


register_dataset("digits-small", small_digits)

# the protocol's splits for a digits-small store
SMALL_PROTOCOL = """select_train = "train"
select_eval = "val"
final_train = "trainval"
"""


# A two-epoch pipeline over a digits store: STORE and RUNS are replaced by the store and the runs root. It tests
# mechanics on the tiny store's two splits: the final runs are "tested" on train800, since a pipeline never reports
# on the split it selects on.
GOOD_PIPELINE = """
baselines = ["linear", "pooled"]
runs_root = "RUNS"
[protocol]
select_train = "train800"
select_eval = "val200"
final_train = "train800"
final_eval = "train800"
final_seeds = [1]
epochs = 2
warmup_epochs = 1
[grid]
lr = [0.5]
wd = [0.0]
[[datasets]]
name = "digits"
queries = [1]
store = "STORE"
"""


def run_cli(*args: str) -> tuple[int, str]:
    """Run `vqt-cache ARGS` in this process; returns (exit code, printed text)."""
    import io
    import sys
    from contextlib import redirect_stderr, redirect_stdout

    from vqt_cache import cli

    buffer = io.StringIO()
    argv, sys.argv = sys.argv, ["vqt-cache", *args]
    code = 0
    try:
        with redirect_stdout(buffer), redirect_stderr(buffer):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, buffer.getvalue()


def error_line(code: int, out: str) -> str:
    """The one `error:` line of a refused command, after checking exit code 2 and no traceback."""
    assert code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


def make_imagefolder(root, per_class: int = 5, classes=("cat", "dog", "owl"), splits=("train", "test"), size=20):
    """A small torchvision-style image folder of random PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> str:
    """digits train800/val200 through the tiny random ViT, kv float16 (session-wide, read-only for tests)."""
    from vqt_cache.config import ExtractConfig
    from vqt_cache.extraction import extract

    out = str(tmp_path_factory.mktemp("store") / "digits.zarr")
    kind = dict(layout="kv", dtype="float16")  # pinned: tests alter its kv chunks
    extract(ExtractConfig(**TINY_EXTRACT, **kind, dataset="digits", splits=("train800", "val200"), out=out, workers=0))
    return out


def tiny_extract_args(splits: str | None, *options: str, dataset: str = "digits") -> list[str]:
    """`vqt-cache extract` arguments for a dataset (all splits when None) through the tiny backbone, no decoding
    workers, plus options."""
    model_args = [f"--model-arg={k}={v}" for k, v in TINY_EXTRACT["model_kwargs"].items()]
    chosen = ["--splits", splits] if splits else []
    return [
        "extract",
        "--layout",  # pinned (options may override): tests read and alter kv chunks
        "kv",
        "--dtype",
        "float16",
        "--backbone",
        TINY_EXTRACT["backbone"],
        "--weights",
        "random",
        "--dataset",
        dataset,
        *chosen,
        "--workers",
        "0",
        *model_args,
        *options,
    ]
