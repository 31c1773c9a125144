"""What each command takes, declared once: one dataclass per command (or option group), torch-free.

A field is an option: its name, type, default, help and validation are written here and nowhere else. The
command line builds its options from these fields (`cli._options`), the Python API passes its keyword arguments
straight into them, the pipeline schema (`sweep.Protocol`) inherits `Recipe`, and `plan` takes every option of
`ExtractConfig`. A field's `Cli` says how the command line writes it when that differs from the field itself
(`--model-arg KEY=VALUE` for `model_kwargs`, `--no-space-check` for `check_space`, comma lists for a grid); a field
without one is not a command-line option (`runs`, `extra`). Adding an option is one field here, and the code that
uses it.

The values (the paper's recipe, the store's formats) are in `recipe.py` and `formats.py`.
"""

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vqt_cache import dataset_catalog, methods, recipe
from vqt_cache.errors import VQTError
from vqt_cache.formats import (
    CODECS,
    DEFAULT_CODEC,
    DEFAULT_DTYPE,
    DEFAULT_LAYOUT,
    DEFAULT_PRECISION,
    DEFAULT_QUERY_PATH,
    DEFAULT_RESAMPLE,
    DTYPES,
    EXTRACT_BATCH_SIZE,
    FORWARD_PRECISION,
    HF_COLUMNS,
    LAYOUTS,
    ON_BAD_IMAGE,
    PRECISIONS,
    QUERY_PATHS,
    RESAMPLERS,
    SHARD_SIZE,
    WORKERS,
    WRITERS,
)

FIELD_DEFAULT = object()  # a `Cli.cli_default` that is the field's own default


@dataclass(frozen=True)
class Cli:
    """How the command line writes a field, where that is not the field as it is."""

    help: str
    name: str | None = None  # the option's name, where it is not the field's (model_arg for model_kwargs)
    type: Any = None  # the type the command line reads, where it is not the field's
    cli_default: Any = FIELD_DEFAULT  # the command line's default, where it is not the field's
    parse: Callable[[Any], Any] | None = None  # the command line's value -> the field's value
    flag: bool = False  # a switch that takes no value (--probes)


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **cli: Any) -> Any:
    """A field that is a command-line option, described by `Cli(**cli)`."""
    return field(default=default, default_factory=factory, metadata={"cli": Cli(**cli)})


def options(cls: type) -> list[tuple[dataclasses.Field, Cli]]:
    """The fields of a config class that are command-line options, in declaration order, with their `Cli`."""
    return [(f, f.metadata["cli"]) for f in dataclasses.fields(cls) if "cli" in f.metadata]


# --- how the command line writes values ---


def comma_list(kind: type, what: str) -> Callable[[str], list]:
    """'0.5,0.25' -> [0.5, 0.25] (or ints, or names), with one clear sentence on anything else."""

    def parse(text: str) -> list:
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as exc:
            noun = "integers" if kind is int else "numbers"
            raise VQTError(f"{what} takes comma-separated {noun}, got {text!r}") from exc

    return parse


def model_kwargs(pairs: list[str] | None) -> dict[str, Any]:
    """['img_size=384', 'class_token=false'] -> {'img_size': 384, 'class_token': False} (JSON values, else text)."""
    kwargs = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VQTError(f"--model-arg takes KEY=VALUE, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def _split_names(text: str | None) -> tuple[str, ...] | None:
    return tuple(text.split(",")) if text else None


def _gib(value: float | None) -> float | None:
    return None if value is None else value * 2**30  # TrainConfig checks it and keeps whole bytes


# --- stage one ---


@dataclass(frozen=True)
class ExtractConfig:
    """`vqt-cache extract` (and `plan`, which sizes the store these options make); validated on construction."""

    backbone: str = option(help="short name (vit_b16, vit_b16_mae, ...) or any timm ViT name")
    dataset: str = option(help=f"{dataset_catalog.names()}, or a registered name")
    root: str | None = option(None, help="dataset folder (default data/downloads/<dataset>)")
    splits: tuple[str, ...] | None = option(
        None, help="comma-separated splits (default: all)", type=str | None, parse=_split_names
    )
    layout: str = option(DEFAULT_LAYOUT, help="hidden (LN1 outputs) or kv (keys+values, twice the bytes)")
    dtype: str = option(DEFAULT_DTYPE, help="float16, float32 or int8 (a float16 scale per token and 64 channels)")
    codec: str = option(DEFAULT_CODEC, help="none, zstd or blosc")
    batch_size: int = option(EXTRACT_BATCH_SIZE, help="images per forward")
    shard_size: int = option(SHARD_SIZE, help="images per logical shard (unit of resume)")
    device: str = option(recipe.DEVICE, help="auto, cpu, cuda, cuda:1, ...")
    out: str | None = option(None, help="store path or URL (default <cache-root>/<dataset>/<backbone>[-...].zarr)")
    cache_root: str = option(recipe.CACHE_ROOT, help="root of the default store paths")
    weights: str | None = option(None, help="weights FILE, 'random', or none for the timm cache")
    model_kwargs: dict[str, Any] = option(
        factory=dict,
        help="timm model argument KEY=VALUE (repeatable)",
        name="model_arg",
        type=list[str] | None,
        cli_default=None,
        parse=model_kwargs,
    )
    on_bad_image: str = option(ON_BAD_IMAGE[0], help="fail or skip (skipped images are recorded)")
    workers: int = option(WORKERS, help="image decoding processes")
    resample: str = option(
        DEFAULT_RESAMPLE,
        help="pillow (timm's eval transform) or torch: resample the decoded pixels with torch, faster per core, "
        "each pixel within one level of Pillow's (recorded in the store)",
    )
    precision: str = option(
        FORWARD_PRECISION,
        help="the frozen forward: float32 (bit-identical to timm's), bf16 (bfloat16 autocast, several times faster "
        "on a GPU; recorded in the store), auto (bf16 where bf16 matmuls are fast)",
    )
    writers: int = option(WRITERS, help="threads writing and hashing shards (a GPU host: about its cores / 2)")
    check_space: bool = option(
        True,
        help="start even when `vqt-cache plan` says the store cannot fit",
        name="no_space_check",
        flag=True,
        cli_default=False,
        parse=lambda unchecked: not unchecked,
    )
    val_fraction: float | None = option(
        None,
        help="for a dataset without a validation split: carve this share of train into val (seeded, stratified; "
        "train becomes the rest, trainval the whole)",
    )
    image_column: str = option(HF_COLUMNS["image"], help="--dataset hf: the image column")
    label_column: str = option(HF_COLUMNS["label"], help="--dataset hf: the label column")
    probes: bool = option(
        False,
        flag=True,
        help="also store what the attentive and linear-multi probes read: the final block's patch tokens, every "
        "block's class token, the patch mean (ViT-B/16 int8: +0.19 MB per image, +10%)",
    )

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.layout, LAYOUTS, "layout"),
            (self.dtype, DTYPES, "dtype"),
            (self.codec, CODECS, "codec"),
            (self.on_bad_image, ON_BAD_IMAGE, "on-bad-image"),
            (self.resample, RESAMPLERS, "resample"),
            (self.precision, ("auto", *PRECISIONS), "precision"),
        ):
            if value not in allowed:
                raise VQTError(f"unknown {what} {value!r}: use one of {', '.join(allowed)}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise VQTError("batch size and shard size must be at least 1")
        if self.workers < 0:
            raise VQTError("workers must be >= 0")
        if self.writers < 1:
            raise VQTError("writers must be at least 1")

    @property
    def columns(self) -> dict[str, str]:
        """The image and label columns of a Hugging Face dataset."""
        return {"image": self.image_column, "label": self.label_column}

    @property
    def store_url(self) -> str:
        """Where the store goes: --out, else its default path (store.default_store_path)."""
        from vqt_cache.store import default_store_path  # zarr: only when a path is needed

        return self.out or default_store_path(
            self.cache_root, self.dataset, self.backbone, self.weights, self.model_kwargs, self.root
        )


def listed(default: float | None, kind: type, flag: str, help: str) -> Any:
    """A run field that the command line takes as a comma list of `kind` (each combination is a run); a default of
    None (the run's recipe decides) is a list of one None."""
    shown = None if default is None else str(default) if kind is int else f"{default:g}"
    parse = comma_list(kind, flag)
    return option(
        default,
        help=help,
        type=str | None,
        cli_default=shown,
        parse=lambda text: [None] if text is None else parse(text),
    )


# --- stage two ---


@dataclass(frozen=True)
class RunSpec:
    """One configuration: what a run folder trains. On the command line and in the API each field takes a list,
    and every combination of the lists is trained (`training.grid`). The learning rate and weight decay default to
    the run's recipe's (`recipe.Optimization`); a method whose own recipe is VQT's is "own" under either choice."""

    method: str = option(
        recipe.METHOD, help=f"{methods.describe()}; a list", type=str, parse=comma_list(str, "--method")
    )
    queries: int = listed(recipe.QUERIES, int, "--queries", "T, or a list: 1,10")
    lr: float | None = listed(None, float, "--lr", "base learning rate(s) (default: the recipe's; VQT's 0.5)")
    wd: float | None = listed(None, float, "--wd", "weight decay(s) (default: the recipe's; VQT's 0.001)")
    seed: int = listed(recipe.SEED, int, "--seed", "seed(s); runs of one seed share a pass")
    recipe: str = option(
        recipe.RECIPE,
        help="own (each method its paper's optimizer, schedule and head initialisation) or shared (VQT's for every "
        "method); a list",
        type=str,
        parse=comma_list(str, "--recipe"),
    )

    def __post_init__(self) -> None:
        optimization = recipe.optimization(self.method, self.recipe)
        if methods.get(self.method).recipe == recipe.VQT_RECIPE.name:  # own = shared here: one run, one name
            object.__setattr__(self, "recipe", "own")
        object.__setattr__(self, "lr", optimization.lr if self.lr is None else self.lr)
        object.__setattr__(self, "wd", optimization.wd if self.wd is None else self.wd)
        recipe.check_run(self.method, self.queries, self.lr, self.wd, self.seed)
        object.__setattr__(self, "queries", methods.get(self.method).check_size(self.queries))  # 0 without sizes

    @property
    def optimization(self) -> "recipe.Optimization":  # quoted: the field above shadows the module here
        """How this run is optimized: its method's paper's recipe, or VQT's under the shared recipe."""
        return recipe.optimization(self.method, self.recipe)

    @property
    def name(self) -> str:
        shared = "-shared" if self.recipe == "shared" else ""  # only where the method's own recipe is another
        return f"{methods.get(self.method).run_name(self.queries)}-lr{self.lr:g}-wd{self.wd:g}-seed{self.seed}{shared}"


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The schedule the runs of one training pass share: `train`'s options, and a pipeline's [protocol] keys."""

    epochs: int = option(recipe.EPOCHS, help="epochs")
    warmup_epochs: int = option(recipe.WARMUP_EPOCHS, help="linear warm-up epochs before the cosine")
    batch_size: int = option(recipe.BATCH_SIZE, help="images per step")
    dropout: float = option(recipe.DROPOUT, help="query dropout")
    precision: str = option(
        DEFAULT_PRECISION, help="query-path arithmetic: float32, bf16 (bfloat16 matmuls), auto (bf16 where fast)"
    )


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """`vqt-cache train`: the store, the runs, and the recipe they share. Validated on construction, where the
    precision "auto" becomes float32 or bf16 for the device."""

    store: str = option(
        help="store path or URL (default: the only store under --cache-root)", type=str | None, cli_default=None
    )
    runs: tuple[RunSpec, ...] = field(default_factory=lambda: (RunSpec(),))  # made on use: a method imports torch
    train_split: str | None = option(None, help="default train800, else train")
    eval_split: str | None = option(None, help="default val200, else val (never test); none: no evaluation")
    out: str | None = option(None, help="run folder (one run) or parent folder (several)")
    memory_budget: int | float | None = option(  # bytes; default half the RAM
        None, help="GiB of cached features held in memory", type=float | None, parse=_gib
    )
    device: str = option(recipe.DEVICE, help="auto, cpu, cuda, cuda:1, ...")
    query_path: str = option(  # how the layers run (query.QueryPath): a speed choice, not recorded
        DEFAULT_QUERY_PATH,
        help="eager (layer by layer), batched (all layers per kernel), auto (batched on a GPU)",
    )
    eval_every: int = option(recipe.EVAL_EVERY, help="evaluate every N epochs (and at the end)")
    checkpoint_every: int = option(recipe.CHECKPOINT_EVERY, help="checkpoint every N epochs, for resume")
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, not interpreted (e.g. the sweep's name)

    def __post_init__(self) -> None:
        from vqt_cache.backbones import resolve_device  # torch: only when a pass is configured
        from vqt_cache.query import resolve_precision

        if not self.runs:
            raise VQTError("nothing to train: no run configurations given")
        recipe.check_recipe(self.epochs, self.warmup_epochs, self.batch_size, self.dropout)
        if self.memory_budget is not None:
            if not (math.isfinite(self.memory_budget) and self.memory_budget >= 0):
                raise VQTError(
                    f"the memory budget must be >= 0 GiB (a finite number), got {self.memory_budget / 2**30:g}"
                )
            object.__setattr__(self, "memory_budget", int(self.memory_budget))  # bytes, from a float of GiB too
        if self.query_path not in QUERY_PATHS:
            raise VQTError(f"unknown query path {self.query_path!r}: use one of {', '.join(QUERY_PATHS)}")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise VQTError("--eval-every and --checkpoint-every must be >= 1")
        if len({r.name for r in self.runs}) != len(self.runs):
            raise VQTError("the same configuration is listed twice")
        object.__setattr__(self, "precision", resolve_precision(self.precision, resolve_device(self.device)))

    def recipe(self) -> dict[str, Any]:
        """The shared hyper-parameters, as recorded in every run's config.json."""
        return {k: getattr(self, k) for k in RECIPE_KEYS}


# recorded in each run's config.json: the recipe, and how often it was evaluated
RECIPE_KEYS = ("epochs", "warmup_epochs", "batch_size", "dropout", "eval_every", "precision")


# --- the other commands' options (info takes none); their arguments (run folders, images, a pipeline) stay the
# command's own ---


def _moved_store() -> Any:
    return option(None, help="the store, if it moved since training")


def _device() -> Any:
    return option(recipe.DEVICE, help="auto, cpu, cuda, cuda:1, ...")


@dataclass(frozen=True)
class EvaluateOptions:
    """`vqt-cache evaluate` (the API's `evaluate` takes the same names)."""

    split: str = option(recipe.FINAL_EVAL, help="split to evaluate on: cached if the store holds it, else live")
    store: str | None = _moved_store()
    root: str | None = option(None, help="dataset folder, if it moved since extraction (live)")
    live: bool = option(False, flag=True, help="run the backbone even when the split is cached")
    batch_size: int | None = option(None, help="images per batch (default: the runs' batch size)")
    device: str = _device()
    workers: int = option(WORKERS, help="image decoding processes (live)")
    precision: str | None = option(None, help="float32, bf16 or auto (default: what the runs trained with)")

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise VQTError(f"--batch-size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class PredictOptions:
    """`vqt-cache predict`."""

    store: str | None = _moved_store()
    device: str = _device()


@dataclass(frozen=True)
class ExportOptions:
    """`vqt-cache export`."""

    out: str | None = option(None, help="the file to write (default: <run folder>/<run name>.safetensors)")
    store: str | None = _moved_store()


@dataclass(frozen=True)
class CompressOptions:
    """`vqt-cache compress` (the API's `compress` checks the values)."""

    keep: float = option(recipe.KEEP, help="fraction of features kept")
    lasso: float = option(recipe.LASSO, help="group-lasso weight on the head's column norms")
    store: str | None = _moved_store()


@dataclass(frozen=True)
class VerifyOptions:
    """`vqt-cache verify`."""

    recompute: int = option(0, help="also re-run the backbone on N images per split and compare")


@dataclass(frozen=True)
class DemoOptions:
    """`vqt-cache demo`."""

    root: str = option("data", help="where the demo leaves its store and runs")
    epochs: int = option(recipe.DEMO_EPOCHS, help="training epochs")
    recipe_choice: str = option(
        recipe.RECIPE, name="recipe", help="own (each method its paper's recipe) or shared (VQT's for all)"
    )


@dataclass(frozen=True)
class SweepOptions:
    """`vqt-cache sweep`."""

    part: str | None = option(None, help="i/n: run only this part of the datasets (every n-th from i)")
    one_pass: bool = option(True, help="train each grid in one pass over the cache")
    report_only: bool = option(False, flag=True, help="skip training; merge the run folders into the report")
    runs_root: str | None = option(None, help="override the pipeline's runs_root")


@dataclass(frozen=True)
class ReportOptions:
    """`vqt-cache report`."""

    out: str | None = option(None, help="folder for results.csv/.md and plots")
