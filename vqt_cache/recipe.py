"""Stage two's choices and defaults, each defined once: the run, the recipe, the paper's grid and protocol.

Torch-free, so the CLI shows these values in `--help` without importing torch. `TrainConfig`, `RunSpec`, the
pipeline schema (`sweep.Protocol`, `sweep.Grid`) and the CLI's options all take their defaults from here, and
their values are checked by the functions below, whichever of them they came through. The numbers are the paper's
(docs/method.md §5). The store's choices (layouts, dtypes, codecs, precisions) are in `vqt_cache/formats.py`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vqt_cache import methods
from vqt_cache.errors import VQTError

BASELINES = ("linear", "pooled")  # a pipeline's default: what every store can serve beside VQT (vqt_cache/methods/)

# one run (a RunSpec)
METHOD = "vqt"
QUERIES = 1
LINEAR_MULTI_BLOCKS = (1, 4)  # linear-multi's n: the last blocks whose class tokens it reads (DINOv2's two)
LR = 0.5  # base learning rate; the optimizer uses lr · batch_size / 256
WD = 1e-3
SEED = 42
MAX_SEED = 2**63

# which optimization a run follows: "own" (its method's paper's, `Optimization` below) or "shared" (VQT's, for
# every method: a controlled comparison)
RECIPE = "own"
RECIPE_CHOICES = ("own", "shared")

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


@dataclass(frozen=True)
class Optimization:
    """How a method's paper trains its head (and probe) over frozen features: everything but the length and the
    batch size, which the runs of one pass over the cache share (docs/method.md §9 says what that changes)."""

    name: str
    source: str  # where the numbers come from
    optimizer: str  # "adam": torch Adam, L2 coupled (VQT); "sgd": momentum 0.9 (DINOv2); "adamw": decoupled (V-JEPA)
    lrs: tuple[float, ...]  # the paper's grid of base learning rates
    wds: tuple[float, ...]  # and of weight decays
    lr: float  # a single run's default
    wd: float
    scale_lr: bool  # the optimizer's lr is the base lr · batch_size / 256
    warmup: bool  # the pass's warmup_epochs apply (linear warm-up); False: none
    per_step: bool  # the schedules are stepped every step (else once per epoch)
    step_first: bool  # they advance before each update (V-JEPA's), not after it (DINOv2's)
    final_wd: float | None  # weight decay follows a cosine from wd to this; None: constant
    clip: float | None  # the norm of a run's gradient is clipped to this
    head_init: str  # "kaiming_fan_out" (VPT, VQT), "normal" (N(0, 0.01), bias 0: DINOv2), "torch" (nn.Linear's)

    def record(self) -> dict:
        """What a run's config.json records of it: everything that shapes a run (not the grid it was picked from)."""
        return {k: v for k, v in asdict(self).items() if k not in ("lrs", "wds", "lr", "wd")}


VQT_RECIPE = Optimization(
    name="vqt",
    source="VQT (Tu et al., CVPR 2023) §4 and its code, after VPT; docs/method.md §5",
    optimizer="adam",
    lrs=GRID_LRS,
    wds=GRID_WDS,
    lr=LR,
    wd=WD,
    scale_lr=True,
    warmup=True,
    per_step=False,
    step_first=False,
    final_wd=None,
    clip=None,
    head_init="kaiming_fan_out",
)
DINOV2_LINEAR = Optimization(
    name="dinov2-linear",
    source="facebookresearch/dinov2 dinov2/eval/linear.py",
    optimizer="sgd",
    lrs=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1),
    wds=(0.0,),
    lr=1e-3,  # the middle of its grid
    wd=0.0,
    scale_lr=True,
    warmup=False,
    per_step=True,
    step_first=False,
    final_wd=None,
    clip=None,
    head_init="normal",
)
VJEPA_PROBE = Optimization(
    name="vjepa-probe",
    source="facebookresearch/jepa evals/image_classification_frozen/eval.py, configs/evals/vitl16_in1k.yaml",
    optimizer="adamw",
    lrs=(1e-3,),  # V-JEPA trains one configuration
    wds=(1e-3,),
    lr=1e-3,
    wd=1e-3,
    scale_lr=False,
    warmup=False,  # warmup: 0. in its configs
    per_step=True,
    step_first=True,
    final_wd=1e-6,  # init_opt's default: eval.py passes no final_wd
    clip=1.0,
    head_init="torch",
)
OPTIMIZATIONS = {o.name: o for o in (VQT_RECIPE, DINOV2_LINEAR, VJEPA_PROBE)}


def optimization(method: str, choice: str) -> Optimization:
    """The optimization a run of `method` follows under the recipe `choice` ("own" or "shared")."""
    if choice not in RECIPE_CHOICES:
        raise VQTError(f"unknown recipe {choice!r}: use own (each method its paper's) or shared (VQT's for all)")
    return OPTIMIZATIONS[methods.get(method).recipe] if choice == "own" else VQT_RECIPE


# compression (docs/method.md §6): the group-lasso weight and the fraction of features kept
LASSO = 1e-4
KEEP = 0.7

# where things are, relative to the working directory
DEVICE = "auto"
DEMO_EPOCHS = 50  # `vqt-cache demo`: the digits converge well before (docs/benchmarks.md)
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
