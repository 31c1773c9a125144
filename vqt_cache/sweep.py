"""`vqt-cache sweep`: grids × datasets × seeds over existing stores, with the paper's selection protocol.

A pipeline (pipelines/*.toml) names the datasets, the grid and the protocol (docs/method.md §5):
1. selection: every (method, T, lr, wd) on `select_train`, evaluated on `select_eval`, seed `select_seed`; all
   of it is one pass over the cache (one seed);
2. per (method, T), the (lr, wd) with the best last-epoch eval top-1 (ties -> smaller lr, then smaller wd);
3. final: the selected configurations on `final_train` with every seed of `final_seeds`, tested on `final_eval`
   (one pass per seed, all methods together); a `final_eval` the store does not hold is evaluated live after
   training, one forward of the backbone over its images for every final run at once;
4. optionally group-lasso compression of the final VQT runs (docs/method.md §6).
Run folders are the only state: finished runs are skipped, and `--part i/n` splits the datasets across
processes or machines, whose folders `vqt-cache report` merges.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from vqt_cache import methods, recipe
from vqt_cache.backbones import resolve_device
from vqt_cache.config import RECIPE_KEYS, Recipe, RunSpec, TrainConfig
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import evaluate, read_evaluation
from vqt_cache.methods.vqt import METHOD as VQT
from vqt_cache.query import resolve_precision
from vqt_cache.run_folder import FinishedRun, finished_runs, is_compressed, run_folders
from vqt_cache.store import default_store_path, open_store
from vqt_cache.training import NO_EVAL, grid, train

# VTAB-1k groups (for the group means of the report); the image code's task table lives in datasets.py
VTAB_GROUPS = {
    "natural": ("caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"),
    "specialized": ("patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"),
    "structured": (
        "clevr_count",
        "clevr_dist",
        "dmlab",
        "kitti",
        "dsprites_loc",
        "dsprites_ori",
        "smallnorb_azi",
        "smallnorb_ele",
    ),
}


# pipeline files are validated against the dataclasses below: exact TOML types, no unknown keys
_STRICT = pydantic.ConfigDict(strict=True, extra="forbid")


@dataclass(frozen=True)
class Protocol(Recipe):
    """The selection protocol, and the recipe (`config.Recipe`: epochs, warmup_epochs, batch_size, dropout,
    precision) every run of the pipeline trains with."""

    __pydantic_config__ = _STRICT
    select_train: str = recipe.SELECT_TRAIN
    select_eval: str = recipe.SELECT_EVAL
    select_seed: int = recipe.SELECT_SEED
    final_train: str = recipe.FINAL_TRAIN
    final_eval: str = recipe.FINAL_EVAL
    final_seeds: tuple[int, ...] = recipe.FINAL_SEEDS

    def __post_init__(self) -> None:
        """Selection never sees the split results are reported on, nor the one it trains on."""
        if self.select_eval in (self.final_eval, self.select_train):
            which = "final_eval" if self.select_eval == self.final_eval else "select_train"
            raise VQTError(
                f"[protocol] select_eval {self.select_eval!r} is also its {which} split: selection must evaluate on "
                "a validation split of its own (extract --val-fraction carves one out of train)"
            )


@dataclass(frozen=True)
class Grid:
    """VQT's grid: every method's under recipe = "shared"; under "own", a method with a recipe of its own searches
    its paper's grid (`recipe.Optimization.lrs`, `.wds`)."""

    __pydantic_config__ = _STRICT
    lr: tuple[float, ...] = recipe.GRID_LRS  # base lrs, scaled by batch/256
    wd: tuple[float, ...] = recipe.GRID_WDS


@dataclass(frozen=True)
class DatasetEntry:
    __pydantic_config__ = _STRICT
    name: str
    queries: tuple[int, ...] = (1,)
    blocks: tuple[int, ...] = recipe.LINEAR_MULTI_BLOCKS  # linear-multi's n
    group: str | None = None
    compress: bool | None = None  # None: the pipeline's default
    store: str | None = None  # None: <cache_root>/<name>/<backbone>.zarr


@dataclass(frozen=True)
class Pipeline:
    __pydantic_config__ = _STRICT
    name: str
    datasets: tuple[DatasetEntry, ...]
    backbone: str = recipe.BACKBONE
    cache_root: str = recipe.CACHE_ROOT
    runs_root: str = recipe.SWEEPS_ROOT
    baselines: tuple[str, ...] = recipe.BASELINES
    compress: bool = False
    keep: float = recipe.KEEP
    description: str = ""
    protocol: Protocol = field(default_factory=Protocol)
    grid: Grid = field(default_factory=Grid)
    recipe: str = recipe.RECIPE  # "own": each method its paper's optimization; "shared": VQT's (last: it shadows)

    @property
    def root(self) -> Path:
        return Path(self.runs_root) / self.name

    def store_for(self, entry: DatasetEntry) -> str:
        return entry.store or default_store_path(self.cache_root, entry.name, self.backbone)

    def group_of(self, entry: DatasetEntry) -> str:
        if entry.group:
            return entry.group
        task = entry.name.split("/")[-1]
        return next((g for g, tasks in VTAB_GROUPS.items() if task in tasks), "all")

    def folder(self, entry: DatasetEntry, phase: str) -> Path:
        return self.root / entry.name.replace("/", "-") / phase


_PIPELINE = pydantic.TypeAdapter(Pipeline)


def _first_problem(exc: pydantic.ValidationError) -> str:
    """The first validation error in TOML words: '[protocol] epochs: Input should be a valid integer (got 'ten')'."""
    error = exc.errors()[0]
    rest = list(error["loc"])
    table = ""
    if len(rest) > 1 and isinstance(rest[0], str):
        head = rest.pop(0)
        table = f"[[{head}]] #{rest.pop(0) + 1}" if isinstance(rest[0], int) else f"[{head}]"
    key = " #".join(str(p + 1) if isinstance(p, int) else p for p in rest)
    if error["type"] == "unexpected_keyword_argument":
        return f"unknown key {key} " + (f"in {table}" if table else "at the top level")
    message = error["msg"].replace("an object", "a table")
    return f"{table} {key}".strip() + f": {message} (got {error['input']!r})"


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline file."""
    path = Path(path)
    if not path.is_file():
        raise VQTError(f"pipeline file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise VQTError(f"pipeline file {path} is not valid TOML: {exc}") from exc
    data.setdefault("name", path.stem)
    if not data.get("datasets"):
        raise VQTError(f"pipeline file {path} lists no [[datasets]]")
    for entry in data["datasets"] if isinstance(data["datasets"], list) else ():
        if isinstance(entry, dict) and isinstance(entry.get("queries"), int):
            entry["queries"] = [entry["queries"]]
    try:  # JSON mode: tables may become dataclasses and arrays tuples, while every scalar keeps its exact type
        pipeline = _PIPELINE.validate_json(json.dumps(data, default=str))
    except pydantic.ValidationError as exc:
        raise VQTError(f"pipeline file {path}: {_first_problem(exc)}") from exc
    except VQTError as exc:  # a check of the schema's own (`Protocol.__post_init__`)
        raise VQTError(f"pipeline file {path}: {exc}") from exc
    _check(pipeline, path)
    return pipeline


def _check(p: Pipeline, path: Path) -> None:
    """Values the types allow but the protocol does not, caught before any training starts."""
    if not p.grid.lr or not p.grid.wd or not p.protocol.final_seeds:
        raise VQTError(f"pipeline file {path}: the grid (lr, wd) and final_seeds must not be empty")
    if p.recipe not in recipe.RECIPE_CHOICES:
        raise VQTError(
            f"pipeline file {path}: recipe must be own (each method its paper's) or shared, got {p.recipe!r}"
        )
    if not 0 < p.keep <= 1:
        raise VQTError(f"pipeline file {path}: keep must be in (0, 1], got {p.keep}")
    others = [name for name in methods.names() if name != VQT.name]
    bad = [b for b in p.baselines if b not in others]
    if bad:
        raise VQTError(f"pipeline file {path}: unknown baseline {bad[0]!r} (use {', '.join(others)})")
    names = [d.name for d in p.datasets]
    if len(set(names)) != len(names):
        raise VQTError(f"pipeline file {path}: a dataset is listed twice")
    lists = {"[grid] lr": p.grid.lr, "[grid] wd": p.grid.wd, "[protocol] final_seeds": p.protocol.final_seeds}
    lists |= {f"[[datasets]] {d.name} queries": d.queries for d in p.datasets}
    lists |= {f"[[datasets]] {d.name} blocks": d.blocks for d in p.datasets}
    lists |= {"baselines": p.baselines}
    for where, values in lists.items():
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise VQTError(f"pipeline file {path}: {where} lists {repeated[0]!r} twice")
    for entry in p.datasets:  # the recipe, queries, lrs, wds and seeds as the trainer will see them
        try:
            TrainConfig(store=p.store_for(entry), runs=selection_specs(p, entry), **pipeline_recipe(p))
            for seed in p.protocol.final_seeds:
                RunSpec(seed=seed)
        except VQTError as exc:
            raise VQTError(f"pipeline file {path}, dataset {entry.name}: {exc}") from exc


def _check_stores(p: Pipeline, entries: list[DatasetEntry]) -> None:
    """Every store this part needs exists and holds the protocol's training and validation splits, complete, and
    the final test split is cached or is a split of the store's dataset (evaluated live), before any training."""
    proto = p.protocol
    splits = {proto.select_train, proto.select_eval, proto.final_train}
    for entry in entries:
        try:
            store = open_store(p.store_for(entry))
            for name in sorted(splits):
                store.split(name)
            if not store.has_split(proto.final_eval):
                from vqt_cache.datasets import reopen_dataset  # image code, for a live test set only

                reopen_dataset(store.attrs["dataset"]).split(proto.final_eval)
        except VQTError as exc:
            raise VQTError(f"dataset {entry.name}: {exc}") from exc


def parse_part(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise VQTError(f"--part takes i/n, e.g. 0/2, got {text!r}") from exc
    if not 0 <= i < n:
        raise VQTError(f"--part {text}: need 0 <= i < n")
    return i, n


def select(runs: list[FinishedRun]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, T): among `finished_runs`, the one with the best last-epoch eval top-1; ties -> smaller lr,
    then smaller wd.

    A diverged run is never selected (it has no accuracy); a (method, T) whose every run diverged has no choice.
    """
    best: dict[tuple[str, int], tuple[tuple, dict]] = {}
    for run in runs:
        top1 = run.eval_top1
        if top1 is None:
            continue
        key = (run.method, run.queries)
        rank = (-top1, run.lr, run.wd)
        if key not in best or rank < best[key][0]:
            best[key] = (rank, {**dataclasses.asdict(run.spec), "val_top1": top1, "folder": str(run.folder)})
    return {k: v[1] for k, v in best.items()}


def selection_specs(p: Pipeline, entry: DatasetEntry) -> tuple[RunSpec, ...]:
    """Each method over its recipe's grid: the pipeline's [grid] where that recipe is VQT's, else its paper's."""
    specs = []
    for name in (VQT.name, *p.baselines):
        optimization = recipe.optimization(name, p.recipe)
        lrs, wds = (p.grid.lr, p.grid.wd) if optimization is recipe.VQT_RECIPE else (optimization.lrs, optimization.wds)
        seeds = [p.protocol.select_seed]
        specs += grid([name], list(entry.queries), list(lrs), list(wds), seeds, [p.recipe], list(entry.blocks))
    return tuple(specs)


def final_configurations(p: Pipeline, entry: DatasetEntry) -> int:
    """The (method, size) pairs the protocol selects for a dataset: each has one final run per seed."""
    sizes = {"T": list(entry.queries), "n": list(entry.blocks)}
    return sum(len(methods.get(name).sizes(sizes)) for name in (VQT.name, *p.baselines))


def pipeline_recipe(p: Pipeline) -> dict[str, Any]:
    """The TrainConfig fields a pipeline fixes for every run: its protocol's recipe, evaluated once at the end."""
    proto = p.protocol
    return dict(
        {f.name: getattr(proto, f.name) for f in dataclasses.fields(Recipe)},
        precision=resolve_precision(proto.precision, resolve_device("auto")),
        eval_every=proto.epochs,
        checkpoint_every=max(proto.epochs // 4, 1),
        extra={"sweep": p.name},
    )


def recorded_recipe(p: Pipeline) -> dict[str, Any]:
    """The recipe every run of the pipeline records in its config.json (precision only if the pipeline names one:
    "auto" may have resolved differently on the machines that trained its parts)."""
    recipe = pipeline_recipe(p)
    auto = p.protocol.precision == "auto"
    return {k: recipe[k] for k in RECIPE_KEYS if not (auto and k == "precision")}


def _train(
    p: Pipeline,
    store: str,
    specs: tuple[RunSpec, ...],
    train_split: str,
    eval_split: str,
    out: Path,
    one_pass: bool,
    progress,
) -> list[dict]:
    common = dict(store=store, train_split=train_split, eval_split=eval_split, **pipeline_recipe(p))
    if one_pass:
        return train(TrainConfig(runs=specs, out=str(out), **common), progress=progress)
    results = []
    for spec in specs:  # the same runs one at a time (for comparison only)
        results += train(TrainConfig(runs=(spec,), out=str(out / spec.name), **common), progress=progress)
    return results


def run_sweep(
    p: Pipeline,
    part: tuple[int, int] = (0, 1),
    one_pass: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    on_run: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run this part's datasets (every n-th, from the i-th) through the protocol; returns the datasets it handled."""
    from vqt_cache.compress import compress

    mine = [d for i, d in enumerate(p.datasets) if i % part[1] == part[0]]
    _check_stores(p, mine)
    seeds = len(p.protocol.final_seeds)
    total = sum(len(selection_specs(p, d)) + final_configurations(p, d) * seeds for d in mine)
    done = 0
    if on_run:
        on_run(0, total)
    for entry in mine:
        store = p.store_for(entry)
        specs = selection_specs(p, entry)
        _train(
            p,
            store,
            specs,
            p.protocol.select_train,
            p.protocol.select_eval,
            p.folder(entry, "select"),
            one_pass,
            progress,
        )
        done += len(specs)
        if on_run:
            on_run(done, total)
        chosen = select(finished_runs(run_folders(p.folder(entry, "select"))))
        finals = tuple(
            RunSpec(m, t, c["lr"], c["wd"], seed, c["recipe"])
            for (m, t), c in sorted(chosen.items())
            for seed in p.protocol.final_seeds
        )
        # a (method, T) whose every selection run diverged has no final runs; the report says it diverged
        live = not open_store(store).has_split(p.protocol.final_eval)  # the test set is not cached: evaluate live
        results = (
            []
            if not finals
            else _train(
                p,
                store,
                finals,
                p.protocol.final_train,
                NO_EVAL if live else p.protocol.final_eval,
                p.folder(entry, "final"),
                one_pass,
                progress,
            )
        )
        if entry.compress if entry.compress is not None else p.compress:
            compressible = {spec.name for spec in finals if methods.get(spec.method).compressible}
            for result in results:
                folder = Path(result.dir)
                compressed = is_compressed(folder)
                if result.name in compressible and not result.diverged and not compressed:
                    compress(folder, keep=p.keep)
        if live:  # one forward of the backbone over the test images serves every final run (and compressed head)
            untested = [r.dir for r in results if not r.diverged and not _tested(r.dir, p.protocol.final_eval)]
            if untested:
                evaluate(untested, p.protocol.final_eval, progress=progress)
        done += final_configurations(p, entry) * seeds
        if on_run:
            on_run(done, total)
    return [d.name for d in mine]


def _tested(run_dir: str, split: str) -> bool:
    """Whether a final run has its live result on `split` (with its compressed head's, if it was compressed)."""
    result = read_evaluation(run_dir, split)
    compressed = is_compressed(run_dir)
    return result is not None and (not compressed or "compressed" in result)
