"""Stage two's choices and defaults, each defined once: the run, the recipe, the paper's grid and protocol.

Torch-free, so the CLI shows these values in `--help` without importing torch. `TrainConfig`, `RunSpec`, the
pipeline schema (`sweep.Protocol`, `sweep.Grid`) and the CLI's options all take their defaults from here, and
their values are checked by the functions below, whichever of them they came through. The numbers are the paper's
(docs/method.md §5). The store's choices (layouts, dtypes, codecs, precisions) are in `vqt_cache/formats.py`.
"""

from __future__ import annotations

import math

from vqt_cache import methods
from vqt_cache.errors import VQTError

BASELINES = ("linear", "pooled")  # a pipeline's default: what every store can serve beside VQT (vqt_cache/methods/)

# one run (a RunSpec)
METHOD = "vqt"
QUERIES = 1
LR = 0.5  # base learning rate; the optimizer uses lr · batch_size / 256
WD = 1e-3
SEED = 42
MAX_SEED = 2**63

# the recipe the runs of one training pass share (recorded in each run's config.json)
EPOCHS = 100
WARMUP_EPOCHS = 10
BATCH_SIZE = 128
DROPOUT = 0.1
EVAL_EVERY = 1
CHECKPOINT_EVERY = 10

# the splits `train` reads when none is named: the first of each list that the store holds. The eval splits are
# validation splits only: a store without one (extract --val-fraction carves one) is refused, never evaluated on test
TRAIN_SPLITS = ("train800", "train")
EVAL_SPLITS = ("val200", "val")

# the paper's grid and selection protocol (a pipeline's [grid] and [protocol])
GRID_LRS = (1.0, 0.5, 0.25, 0.1, 0.05)
GRID_WDS = (1e-2, 1e-3, 1e-4, 0.0)
SELECT_TRAIN = "train800"
SELECT_EVAL = "val200"
SELECT_SEED = 100
FINAL_TRAIN = "train800val200"
FINAL_EVAL = "test"
FINAL_SEEDS = (42, 44, 82, 100, 800)

# compression (docs/method.md §6): the group-lasso weight and the fraction of features kept
LASSO = 1e-4
KEEP = 0.7

# where things are, relative to the working directory
DEVICE = "auto"
BACKBONE = "vit_b16"  # the paper's main backbone (vqt_cache/backbones.py names it)
CACHE_ROOT = "data/cache"
RUNS_ROOT = "data/runs"
SWEEPS_ROOT = "data/runs/sweeps"


def check_run(method: str, queries: int, lr: float, wd: float, seed: int) -> None:
    """One run's configuration, or one `VQTError` sentence saying what is wrong with it."""
    methods.check_name(method)
    if queries < 0:
        raise VQTError(f"the number of queries T must be >= 0, got {queries}")
    if not (math.isfinite(lr) and lr > 0 and math.isfinite(wd) and wd >= 0):
        raise VQTError(f"learning rate must be > 0 and weight decay >= 0, both finite, got lr={lr}, wd={wd}")
    if not 0 <= seed < MAX_SEED:
        raise VQTError(f"a seed must be in 0..2**63-1, got {seed}")


def check_recipe(epochs: int, warmup_epochs: int, batch_size: int, dropout: float) -> None:
    """The shared recipe, or one `VQTError` sentence saying what is wrong with it."""
    if epochs < 1 or not 0 <= warmup_epochs < epochs:
        raise VQTError(f"need epochs >= 1 and 0 <= warmup < epochs, got {epochs} and {warmup_epochs}")
    if batch_size < 1:
        raise VQTError(f"batch size must be >= 1, got {batch_size}")
    if not 0 <= dropout < 1:
        raise VQTError(f"dropout must be in [0, 1), got {dropout}")
