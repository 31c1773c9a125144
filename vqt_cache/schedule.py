"""The optimizers and schedules of the papers' recipes (`recipe.Optimization`; docs/method.md §5 and §9), and
everything random drawn from (seed, epoch) so that a resumed run replays an uninterrupted one.

VQT's: Adam with coupled L2 decay on the weights and none on the biases, a learning rate scaled by batch/256 and
stepped per epoch (linear warm-up, then cosine); compression uses it too. DINOv2's linear protocol: SGD with
momentum 0.9, the lr scaled by batch/256 and annealed by a cosine every step, the schedule advanced after each
update. V-JEPA's probe: AdamW, a per-step cosine on the lr and on the weight decay (to 1e-6), both advanced before
each update, gradients clipped to norm 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vqt_cache.recipe import VQT_RECIPE, Optimization

# a recipe's optimizer: its torch class and the options beside the parameter groups
OPTIMIZERS = {
    "adam": (torch.optim.Adam, {}),  # VQT's: L2 coupled, as torch.optim.Adam(weight_decay=wd)
    "sgd": (torch.optim.SGD, {"momentum": 0.9}),  # DINOv2's linear protocol
    "adamw": (torch.optim.AdamW, {}),  # V-JEPA's probe: decay decoupled
}


def optimizer(
    recipe: Optimization, decayed: list[torch.Tensor], undecayed: list[torch.Tensor], wd: float
) -> torch.optim.Optimizer:
    """The recipe's optimizer, weight decay `wd` on `decayed` and none on `undecayed` (biases and norms); its
    learning rate (and V-JEPA's weight decay) are set before each step by `set_rates`. Its step is torch's fused
    kernel on a GPU (one launch per parameter group instead of one per operation and tensor), and the multi-tensor
    (foreach) one on the CPU: bitwise the reference implementation's results, a quarter less time per step of a
    20-run grid (Adam)."""
    kind, options = OPTIMIZERS[recipe.optimizer]
    groups = [{"params": decayed, "weight_decay": wd}, {"params": undecayed, "weight_decay": 0.0}]
    cuda = decayed[0].is_cuda
    return kind(groups, lr=0.0, fused=cuda or None, foreach=not cuda or None, **options)


def adam(decayed: list[torch.Tensor], undecayed: list[torch.Tensor], wd: float) -> torch.optim.Adam:
    """VQT's optimizer (compression's too): Adam with coupled L2 weight decay `wd` on `decayed` and none on
    `undecayed` (the head's bias); its learning rate is set each epoch by `set_epoch_lr`."""
    return optimizer(VQT_RECIPE, decayed, undecayed, wd)


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """Linear warm-up then cosine: e/W for e < W, else 0.5·(1 + cos(π(e−W)/(E−W))); e and E in epochs or steps."""
    if epoch < warmup:
        return epoch / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def rates(
    recipe: Optimization,
    base_lr: float,
    wd: float,
    batch_size: int,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int,
) -> tuple[float, float]:
    """The learning rate and weight decay of the update at (`epoch`, `step` within it), as the recipe schedules
    them: per epoch or per step, warm-up (the pass's `warmup_epochs`) or none, the schedules advanced before the
    update or after it, and a cosine weight decay where the recipe has one."""
    lr = base_lr * batch_size / 256 if recipe.scale_lr else base_lr
    warmup = warmup_epochs if recipe.warmup else 0
    if recipe.per_step:
        t, total = epoch * steps_per_epoch + step + recipe.step_first, epochs * steps_per_epoch
        warmup *= steps_per_epoch
    else:
        t, total = epoch, epochs
    if recipe.final_wd is not None:  # V-JEPA's CosineWDSchedule: over all steps, held at final_wd
        cosine = recipe.final_wd + (wd - recipe.final_wd) * 0.5 * (1 + math.cos(math.pi * t / total))
        wd = max(recipe.final_wd, cosine) if recipe.final_wd <= wd else min(recipe.final_wd, cosine)
    return lr * lr_factor(t, total, warmup), wd


def set_rates(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Every group's learning rate, and the decayed group's (the first) weight decay."""
    set_epoch_lr(optimizer, lr)
    optimizer.param_groups[0]["weight_decay"] = wd


def epoch_lr(base_lr: float, batch_size: int, epoch: int, epochs: int, warmup: int) -> float:
    """The learning rate of `epoch`: base_lr · batch_size / 256, times the warm-up/cosine factor."""
    return base_lr * batch_size / 256 * lr_factor(epoch, epochs, warmup)


def set_epoch_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def derived_seed(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_order(seed: int, epoch: int, items: np.ndarray | int) -> np.ndarray:
    """The epoch's order of `items` (an array, or range(items)): a permutation fixed by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(items)
