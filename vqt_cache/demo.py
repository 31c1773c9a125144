"""`vqt-cache demo`: the whole pipeline on scikit-learn's bundled digits, with no download at all.

No pretrained checkpoint can be downloaded here, so the demo makes one: a tiny timm ViT trained for digit
*parity* (two classes). Its final feature is specialised to parity, while its intermediate layers still hold what
tells the ten digits apart, which is the situation VQT is built for: the demo then freezes it, extracts the
digits once, and transfers to the 10-class task with a linear probe, the pooled-intermediate baseline and VQT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqt_cache import recipe
from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.datasets import ImageSplit, digits, preprocessing
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import evaluate
from vqt_cache.extraction import extract
from vqt_cache.files import save_tensors
from vqt_cache.run_folder import read_timing
from vqt_cache.store import found_at
from vqt_cache.training import grid, train

BACKBONE = "vit_tiny_patch16_224"
MODEL = {"img_size": 32, "patch_size": 4, "depth": 6, "embed_dim": 96, "num_heads": 3}
LRS = [1.0, 0.25, 0.05]  # of VQT's grid, at weight decay 0; a method with a recipe of its own searches its paper's
SEED = 42


def pretrain_parity(path: Path, epochs: int = 15, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Train the tiny ViT end to end on the parity of train800's digits and save it as a weights file."""
    torch.manual_seed(0)
    backbone = load_backbone(BACKBONE, weights="random", **MODEL)
    model = backbone.model
    model.reset_classifier(2)
    model.train().requires_grad_(True)
    data = digits()
    items = data.split("train800")
    split = ImageSplit(data, items, preprocessing(backbone.data_config, data.resize))
    images = torch.stack([split[i][0] for i in range(len(items))])
    parity = torch.tensor([label % 2 for _, label in items])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(items) + 63) // 64)
    for epoch in range(epochs):
        order = torch.randperm(len(items))
        for i in range(0, len(items), 64):
            batch = order[i : i + 64]
            loss = F.cross_entropy(model(images[batch]), parity[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if progress:
                progress("pretrain tiny ViT on parity", epoch * ((len(items) + 63) // 64) + i // 64 + 1, steps)
    model.reset_classifier(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, model.state_dict())  # whole or absent: a killed pretraining leaves no weights file
    return path


def extract_config(weights: Path, out: str, splits: tuple[str, ...], **options: Any) -> ExtractConfig:
    """The demo's stage one: the parity-pretrained tiny ViT over the digits, into `out`."""
    return ExtractConfig(
        backbone=BACKBONE,
        dataset="digits",
        weights=str(weights),
        model_kwargs=MODEL,
        splits=splits,
        out=out,
        workers=0,
        probes=True,  # every method of the demo's table reads this one store
        **options,
    )


def run_demo(
    root: str | Path = "data",
    epochs: int = recipe.DEMO_EPOCHS,
    recipe_choice: str = recipe.RECIPE,
    progress=None,
    say: Callable[[str], Any] = print,
) -> list[dict]:
    """Pretrain (once), extract (once), train every method with a small lr grid (`recipe_choice` "own": each method
    with its paper's recipe and grid, VQT's cut to `LRS`; "shared": VQT's for all), select on val, test the best."""
    if epochs < 2:  # one warm-up epoch, then the cosine
        raise VQTError(f"the demo needs --epochs >= 2, got {epochs}")
    root = Path(root)
    weights = root / "demo" / "tiny_vit_parity.safetensors"
    store = str(root / "cache" / "digits" / "tiny_vit_parity.zarr")
    found_at(store)  # refuses a foreign path before a minute of pretraining, not after
    if not weights.exists():
        say(f"making the demo backbone: a tiny ViT trained on digit parity -> {weights}")
        pretrain_parity(weights, progress=progress)
    say(f"stage one: extracting digits once into {store}")
    extract(extract_config(weights, store, ("train800", "val200", "train800val200", "test")), progress=progress)
    say("stage two: training from the cache alone (lr grid per method, selected on val200)")
    parent = root / "runs" / "digits" / "demo"
    groups = [("linear", [0]), ("pooled", [0]), ("linear-multi", [0]), ("attentive", [0]), ("vqt", [1]), ("vqt", [4])]
    rows = []
    for method, queries in groups:
        optimization = recipe.optimization(method, recipe_choice)
        own = optimization is not recipe.VQT_RECIPE
        lrs, wds = (list(optimization.lrs), list(optimization.wds)) if own else (LRS, [0.0])
        specs = grid([method], queries, lrs, wds, [SEED], [recipe_choice])
        results = train(
            TrainConfig(
                store=store,
                runs=specs,
                epochs=epochs,
                warmup_epochs=max(epochs // 10, 1),
                out=str(parent / specs[0].name if len(specs) == 1 else parent),  # one run: --out is its folder
                eval_every=epochs,
            ),
            progress=progress,
        )
        converged = [r for r in results if not r.diverged]
        if not converged:
            raise VQTError(f"every {method} run of the demo diverged; try more --epochs")
        best = max(converged, key=lambda r: (r.final["top1"], -_lr(r.name, specs)))
        timing = read_timing(best.dir)
        rows.append(
            {
                "method": method,
                "T": next(s.queries for s in specs if s.name == best.name),  # linear-multi: n, selected on val
                "run": best.name,
                "recipe": optimization.name,
                "configs": len(specs),
                "val": best.final["top1"],
                "test": evaluate(best.dir, "test")[0].top1,
                "seconds": timing["train_seconds"],
                "images_per_s": timing["train_images"] / max(timing["train_seconds"], 1e-9),
            }
        )
    return rows


def _lr(name: str, specs: tuple[RunSpec, ...]) -> float:
    return next(s.lr for s in specs if s.name == name)
