"""Group-lasso feature selection for a trained VQT run (docs/method.md §6): keep fewer features, same queries.

1. With the run's queries frozen, train a fresh head with loss CE + λ·Σ_j ‖W[:, j]‖₂ (group lasso over input
   features) at half the run's learning rate, same schedule.
2. Rank features by that head's column norms, keep the top int(keep·F), train another fresh head on them.
Frozen queries make the features fixed, so they are computed once (eval mode) and the heads train on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqt_cache import recipe, schedule
from vqt_cache.batches import CachedSplit
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import accuracy, load_run
from vqt_cache.files import describe_entries, folder_entries, save_tensors, write_json
from vqt_cache.heads import linear_head
from vqt_cache.query import flush_subnormals
from vqt_cache.run_folder import RecipeRecord, claimed, compressed_folder, compression_record

OUTPUTS = ("model.safetensors", "metrics.json")  # what compress writes into <run>/compressed/


def _features(model, data: CachedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with torch.no_grad():
        for batch in data.batches():
            feats.append(model.features(batch.final, batch.cache, None, batch.means, batch.probes)[0])
            labels.append(batch.labels)
    return torch.cat(feats), torch.cat(labels)


def train_head(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    recipe: RecipeRecord,
    lr: float,
    wd: float,
    seed: int,
    lasso: float = 0.0,
) -> torch.nn.Linear:
    """A fresh linear head on fixed features with the run's recipe (Adam, warm-up + cosine per epoch)."""
    head = linear_head(x.shape[1], num_classes, torch.Generator().manual_seed(seed))
    optimizer = schedule.adam([head.weight], [head.bias], wd)
    epochs, warmup, batch = recipe.epochs, recipe.warmup_epochs, recipe.batch_size
    for epoch in range(epochs):
        schedule.set_epoch_lr(optimizer, schedule.epoch_lr(lr, batch, epoch, epochs, warmup))
        order = torch.from_numpy(schedule.epoch_order(seed, epoch, len(x)))
        for i in range(0, len(x), batch):
            rows = order[i : i + batch]
            loss = F.cross_entropy(head(x[rows]), y[rows])
            if lasso:
                loss = loss + lasso * head.weight.norm(dim=0).sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return head.eval()


def compress(
    run_dir: str | Path,
    keep: float = recipe.KEEP,
    lasso: float = recipe.LASSO,
    splits: tuple[str, ...] | None = None,
    memory_budget: int | None = None,
    store_url: str | None = None,
) -> dict[str, Any]:
    """Compress a finished VQT run into <run_dir>/compressed/; returns what it reports (`store_url`: if it moved)."""
    if not 0 < keep <= 1:
        raise VQTError(f"--keep must be in (0, 1], got {keep}")
    if not (math.isfinite(lasso) and lasso >= 0):
        raise VQTError(f"--lasso must be a finite number >= 0, got {lasso}")
    flush_subnormals()
    loaded = load_run(run_dir, store_url)
    config, store, model = loaded.config, loaded.store, loaded.model
    method = model.runs[0].method
    if not method.compressible:
        raise VQTError(f"compress applies to VQT runs, not {method.name!r}")
    out = compressed_folder(run_dir)
    if any(name not in OUTPUTS and not name.startswith(".") for name in folder_entries(out)):
        raise VQTError(f"{out} holds {describe_entries(out)}, more than compress writes; move them away first")
    spec, recipe, C = config.run, config.recipe, config.model.num_classes
    train_split = store.split(config.splits.train)
    train_x, train_y = _features(model, CachedSplit(train_split, memory_budget, num_classes=C, **model.reads()))
    lr = 0.5 * spec.lr
    seed = schedule.derived_seed(spec.seed, 10_000)  # its own stream, not the run's
    lasso_head = train_head(train_x, train_y, C, recipe, lr, spec.wd, seed, lasso)
    F_all = train_x.shape[1]
    k = int(keep * F_all)
    if k < 1:
        raise VQTError(f"--keep {keep} keeps none of the run's {F_all} features")
    if not all(torch.isfinite(p).all() for p in lasso_head.parameters()):
        raise VQTError("the group-lasso head diverged (non-finite weights); lower --lasso")
    kept = torch.argsort(lasso_head.weight.detach().norm(dim=0), descending=True)[:k].sort().values
    head = train_head(train_x[:, kept], train_y, C, recipe, lr, spec.wd, seed + 1)
    if not all(torch.isfinite(p).all() for p in head.parameters()):
        raise VQTError("the compressed head diverged (non-finite weights); nothing was written")
    eval_splits = splits or tuple(dict.fromkeys(s for s in (config.splits.eval, "test") if s in store.split_names()))
    accuracies = {}
    for name in eval_splits:
        x, y = _features(model, CachedSplit(store.split(name), memory_budget, num_classes=C, **model.reads()))
        with torch.no_grad():
            accuracies[name] = {
                "before": accuracy(model.runs[0].head(x), y, C),
                "after": accuracy(head(x[:, kept]), y, C),
            }
    report = {
        "keep": keep,
        "lasso": lasso,
        "features_before": F_all,
        "features_kept": k,
        "head_params_before": C * F_all + C,
        "head_params_after": C * k + C,
        "accuracy": accuracies,
    }
    tensors = {
        "queries": model.runs[0].queries.prompts.detach().contiguous(),
        "head.weight": head.weight.detach(),
        "head.bias": head.bias.detach(),
        "feature_index": kept.to(torch.int64),
    }
    with claimed(run_dir, config):  # the run folder's lock: concurrent compressions write one pair at a time
        out.mkdir(exist_ok=True)
        record = compression_record(run_dir)
        record.unlink(missing_ok=True)  # an earlier compression's record must not describe this model
        checksum = save_tensors(out / "model.safetensors", tensors)
        write_json(record, {**report, "checksums": {"model.safetensors": checksum}})  # last: marks it done
    return {**report, "folder": str(out)}
