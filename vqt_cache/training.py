"""Stage two: train VQT runs and baselines from a store alone (docs/method.md §5), many configurations per pass.

Runs that share a seed share a pass over the cache (the seed fixes the data order); each keeps its own
queries, head, Adam optimizer and run folder. Everything random is derived from (seed, epoch): the order of
the rows and the dropout masks, so a run resumed from a checkpoint replays exactly what an uninterrupted run
does. No image code and no backbone forward: the frozen blocks come from the store's own weights.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vqt_cache import methods, recipe, schedule
from vqt_cache.backbones import Backbone, backbone_from_weights, resolve_device
from vqt_cache.batches import NO_PROBES, CachedSplit, default_memory_budget
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.errors import VQTError, VQTWarning
from vqt_cache.evaluation import accuracy, cached_logits
from vqt_cache.files import DamagedFile
from vqt_cache.methods.base import Geometry
from vqt_cache.model import CachedVQT, RunParameters
from vqt_cache.query import CACHE_DTYPES, flush_subnormals
from vqt_cache.run_folder import (
    ModelRecord,
    RecipeRecord,
    RunConfig,
    RunFolder,
    SplitsRecord,
    StoreRecord,
    check_parent,
    claimed,
)
from vqt_cache.store import Store, absolute_url, open_store

# Progress: called with (description, steps done, steps total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, kw_only=True)
class TrainedRun:
    """One configuration `train` finished (or found finished): its run folder and last-epoch metrics."""

    name: str  # e.g. vqt-T10-lr0.5-wd0.001-seed42
    dir: str
    final: dict[str, Any]  # top1, mean_class, ... on eval_split (empty without one, or if it diverged)
    eval_split: str | None  # the split `final` was measured on (None: trained without evaluating)
    skipped: bool  # it was already done: nothing was trained
    diverged: bool  # the loss became NaN or infinite; the run has no model
    precision: str  # the query path's precision it trained in (float32 or bf16; "auto" resolved on its machine)


NO_EVAL = "none"  # an eval split that means: no evaluation during training (a test set evaluated live later)


def resolve_split(store: Store, requested: str | None, preferences: tuple[str, ...], refusal: str) -> str:
    """The split named, else the first of `preferences` the store holds; else "store <url> <refusal>"."""
    if requested:
        return requested
    found = next((name for name in preferences if name in store.split_names()), None)
    if found is None:
        raise VQTError(f"store {store.url} {refusal}")
    return found


# Runs are evaluated each epoch (and selected) on a validation split only: a default never falls back on the test set
NO_TRAIN_SPLIT = f"has none of the training splits {', '.join(recipe.TRAIN_SPLITS)}; pass one explicitly"
NO_EVAL_SPLIT = (
    f"has no validation split ({' or '.join(recipe.EVAL_SPLITS)}), and training never selects on the test set: "
    "extract with --val-fraction F to carve one out of train, or name a split with --eval-split (none: train "
    "without evaluating)"
)


def run_dirs(cfg: TrainConfig, store: Store) -> dict[RunSpec, Path]:
    if cfg.out and len(cfg.runs) == 1:
        return {cfg.runs[0]: Path(cfg.out)}
    dataset, backbone = store.attrs["dataset"]["name"], store.attrs["backbone"]["name"]
    parent = Path(cfg.out) if cfg.out else Path(recipe.RUNS_ROOT) / dataset / backbone
    return {spec: parent / spec.name for spec in cfg.runs}


class _Trainer:
    """One pass: runs of one seed over one train split (and evaluation on one eval split).

    A run whose loss or parameters stop being finite is marked diverged at the end of that epoch: its optimizer
    stops stepping, it is never evaluated, and it is saved without a model. The other runs of the pass are not
    affected (each run's outputs and gradients depend on its own parameters only).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        store: Store,
        backbone: Backbone,
        train: CachedSplit,
        evaluation: CachedSplit | None,
        specs: list[RunSpec],
        folders: dict[RunSpec, RunFolder] | None,
        device: torch.device,
    ) -> None:
        self.cfg, self.train_data, self.eval_data = cfg, train, evaluation
        self.specs, self.device = specs, device
        self.folders = [folders[s] for s in specs] if folders is not None else []  # none: measured, not trained
        self.seed = specs[0].seed
        num_classes = store.attrs["dataset"]["num_classes"]
        runs = [
            RunParameters(
                s.method,
                s.queries,
                backbone.depth,
                backbone.dim,
                num_classes,
                backbone.patch_size,
                cfg.dropout,
                s.seed,
                backbone.heads,
                s.optimization.head_init,
            )
            for s in specs
        ]
        self.model = CachedVQT(backbone.blocks, runs, store.layout, cfg.precision, cfg.query_path).to(device)
        self.optimizers = []
        for run, spec in zip(runs, specs, strict=True):
            decayed, plain = _parameter_groups(run)
            self.optimizers.append(schedule.optimizer(spec.optimization, decayed, plain, spec.wd))
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.history: list[list[dict]] = [[] for _ in specs]
        self.diverged: list[str | None] = [None] * len(specs)  # why, once a run has diverged
        self.start_epoch = self._resume() if self.folders else 0

    def _rates(self, spec: RunSpec, epoch: int, step: int) -> tuple[float, float]:
        """The run's learning rate and weight decay at this step, as its recipe schedules them."""
        cfg, optimization = self.cfg, spec.optimization
        lr = spec.lr * (methods.get(spec.method).lr_scale if optimization is recipe.VQT_RECIPE else 1.0)
        return schedule.rates(
            optimization, lr, spec.wd, cfg.batch_size, epoch, step, self.steps_per_epoch, cfg.epochs, cfg.warmup_epochs
        )

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _resume(self) -> int:
        """Epochs already done by every run of this pass (0 without a common checkpoint)."""
        found = [folder.checkpoints() for folder in self.folders]
        for checkpoints in found:
            stray = [path for epoch, path in checkpoints.items() if not 0 < epoch < self.cfg.epochs]
            if stray:
                raise VQTError(
                    f"checkpoint {stray[0]} does not fit this run's {self.cfg.epochs} epochs; delete it to go on"
                )
        if not all(found):
            return 0
        epoch = min(max(c) for c in found)
        if not all(epoch in c for c in found):
            return 0
        for i, folder in enumerate(self.folders):
            state = folder.load_checkpoint(epoch, self.device)
            try:
                self.model.runs[i].load_tensors(_run_tensors(state["run"]))
                self.optimizers[i].load_state_dict(state["optimizer"])
                self.history[i] = json.loads(state["history"])
                self.diverged[i] = state.get("diverged")
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise DamagedFile(folder.checkpoints()[epoch], f"does not fit the run: {exc}") from exc
        return epoch

    def _checkpoint(self, epochs_done: int) -> None:
        for i, folder in enumerate(self.folders):
            state = {
                "run": {k: v.detach() for k, v in self.model.runs[i].tensors().items()},
                "optimizer": self.optimizers[i].state_dict(),
                "history": json.dumps(self.history[i]),
                "diverged": self.diverged[i],
            }
            folder.save_checkpoint(epochs_done, state)

    # -- epochs ------------------------------------------------------------------------------------------------
    def _evaluate(self) -> list[dict[str, float] | None]:
        self.model.eval()
        logits, labels = cached_logits(self.model, self.eval_data)
        return [
            None if diverged else accuracy(lg, labels, run.head.out_features)
            for lg, run, diverged in zip(logits, self.model.runs, self.diverged, strict=True)
        ]

    def _check_divergence(self, epoch: int, losses: torch.Tensor) -> None:
        for i, run in enumerate(self.model.runs):
            if self.diverged[i] is None and not (
                math.isfinite(losses[i].item()) and all(torch.isfinite(p).all() for p in run.parameters())
            ):
                self.diverged[i] = f"non-finite loss or parameters in epoch {epoch + 1}"

    def _step(self, batch: Any, epoch: int, i: int, generators: list[torch.Generator]) -> torch.Tensor:
        """One update of every run on `batch` (step `i` of `epoch`); each run's loss, on the device."""
        for spec, optimizer in zip(self.specs, self.optimizers, strict=True):
            schedule.set_rates(optimizer, *self._rates(spec, epoch, i))
        per_run = [
            F.cross_entropy(out, batch.labels)
            for out in self.model(batch.final, batch.cache, generators, batch.means, batch.probes)
        ]
        torch.stack(per_run).sum().backward()  # each run's parameters get only their own loss's gradient
        for spec, run, optimizer, diverged in zip(
            self.specs, self.model.runs, self.optimizers, self.diverged, strict=True
        ):
            if diverged is None:
                if spec.optimization.clip is not None:
                    torch.nn.utils.clip_grad_norm_(run.parameters(), spec.optimization.clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.stack(per_run).detach()

    def seconds_per_step(self, steps: int) -> tuple[float, float]:
        """(training step, evaluation batch) seconds, each the median of `steps` after one unmeasured warm-up:
        what `plan` extrapolates. The runs' parameters move; nothing is saved."""
        self.model.train()
        generators = [torch.Generator(self.device).manual_seed(s.seed) for s in self.specs]
        batches = list(itertools.islice(self.train_data.batches(self.train_data.shuffled(self.seed, 0)), steps + 1))
        train = []
        for i in range(steps + 1):  # a split of fewer batches is cycled
            started = time.perf_counter()
            self._step(batches[i % len(batches)], 0, i % len(batches), generators).cpu()  # .cpu(): waits for it
            train.append(time.perf_counter() - started)
        self.model.eval()
        evaluate = []
        with torch.no_grad():
            for batch in batches[:2]:
                started = time.perf_counter()
                [out.cpu() for out in self.model(batch.final, batch.cache, None, batch.means, batch.probes)]
                evaluate.append(time.perf_counter() - started)
        return statistics.median(train[1:]), evaluate[-1]

    def run(self, progress: Progress | None, timing: dict[str, float]) -> None:
        cfg = self.cfg
        steps_per_epoch = self.steps_per_epoch
        described = ", ".join(dict.fromkeys(methods.get(s.method).describe(s.queries) for s in self.specs))
        label = f"train seed {self.seed}: {described} ({len(self.specs)} run{'s' if len(self.specs) > 1 else ''})"
        total = cfg.epochs * steps_per_epoch
        step = self.start_epoch * steps_per_epoch
        if progress:
            progress(label, step, total)
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.perf_counter()
            self.model.train()
            generators = [
                torch.Generator(self.device).manual_seed(schedule.derived_seed(s.seed, epoch)) for s in self.specs
            ]
            # summed on the device and read once per epoch: a per-step read would wait for every step (on a GPU)
            losses = torch.zeros(len(self.specs), dtype=torch.float64, device=self.device)
            for i, batch in enumerate(self.train_data.batches(self.train_data.shuffled(self.seed, epoch))):
                losses += self._step(batch, epoch, i, generators).double() * len(batch.rows)
                step += 1
                if progress:
                    progress(label, step, total)
            losses = losses.cpu()
            seconds = time.perf_counter() - started
            timing["train_seconds"] += seconds
            timing["train_images"] += len(self.train_data)
            timing["epoch_seconds"][str(epoch + 1)] = seconds  # epoch 1..E: a slowdown late in training shows
            self._check_divergence(epoch, losses)
            last = epoch == cfg.epochs - 1
            evaluated = (
                self._evaluate()
                if self.eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last)
                else [None] * len(self.specs)
            )
            for i, spec in enumerate(self.specs):
                loss = losses[i].item() / len(self.train_data)
                entry = {
                    "epoch": epoch + 1,  # epochs are numbered 1..E everywhere: metrics.json, metrics.csv, timing
                    "lr": self._rates(spec, epoch, 0)[0],  # of the epoch's first step
                    "train_loss": loss if math.isfinite(loss) else None,
                }
                if evaluated[i] is not None:
                    entry.update({f"eval_{k}": v for k, v in evaluated[i].items()})
                self.history[i].append(entry)
            if (epoch + 1) % cfg.checkpoint_every == 0 and not last:
                self._checkpoint(epoch + 1)

    def save(self, timing: dict[str, float]) -> list[TrainedRun]:
        results = []
        for i, (spec, folder) in enumerate(zip(self.specs, self.folders, strict=True)):
            diverged = self.diverged[i]
            final = (
                {}
                if diverged
                else {k.removeprefix("eval_"): v for k, v in self.history[i][-1].items() if k.startswith("eval_")}
            )
            metrics = {
                "run": spec.name,
                "complete": True,
                "diverged": diverged is not None,
                "epochs": self.history[i],
                "final": final,
            }
            if diverged:
                metrics["diverged_reason"] = diverged
            tensors = None if diverged else self.model.runs[i].tensors()
            folder.save_result(tensors, metrics, {**timing, "runs_in_pass": len(self.specs)})
            results.append(_result(spec, folder, metrics, skipped=False))
        return results


MIN_STEPS = 5  # an epoch of fewer steps than this is warned about: warm-up and cosine then have a handful of updates


def _warn_if_few_steps(images: int, batch_size: int, split: str) -> None:
    """Warn when an epoch is only a few steps (small data at a large batch): the schedules then take too few updates
    (VQT stayed at chance at one step an epoch where a batch of 32 reached 80%)."""
    steps = math.ceil(images / batch_size)
    if steps < MIN_STEPS:
        suggested = max(2 ** int(math.log2(max(images // (2 * MIN_STEPS), 1))), 1)
        warnings.warn(
            f"an epoch of {split} ({images} images) is {steps} step{'s' if steps > 1 else ''} at batch size "
            f"{batch_size}, too few updates for the schedule; --batch-size {suggested} gives "
            f"{math.ceil(images / suggested)} steps an epoch",
            VQTWarning,
            stacklevel=3,
        )


def _parameter_groups(run: RunParameters) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A run's parameters with weight decay (queries, matrices) and without (biases, norms): VQT's recipe decays
    the queries and the head's weight, not its bias; a probe's parameters follow the same rule by shape."""
    probe = [] if run.probe is None else list(run.probe.parameters())
    decayed = [run.queries.prompts, *(p for p in probe if p.dim() > 1), run.head.weight]
    return decayed, [*(p for p in probe if p.dim() <= 1), run.head.bias]


def _run_tensors(saved: dict) -> dict:
    """A checkpoint's run tensors, named as in model.safetensors; checkpoints of vqt-cache 0.1 before issue 15
    saved the module's state_dict, whose queries are named "queries.prompts"."""
    return {("queries" if k == "queries.prompts" else k): v for k, v in saved.items()}


def _result(spec: RunSpec, folder: RunFolder, metrics: dict, skipped: bool) -> TrainedRun:
    return TrainedRun(
        name=spec.name,
        dir=str(folder.path),
        final=metrics["final"],
        eval_split=folder.config.splits.eval,
        skipped=skipped,
        diverged=bool(metrics.get("diverged")),
        precision=folder.config.recipe.precision,
    )


def _run_config(
    cfg: TrainConfig, spec: RunSpec, store: Store, splits: dict[str, str | None], backbone: Backbone
) -> RunConfig:
    attrs = store.attrs
    method, geometry = methods.get(spec.method), Geometry.of(backbone)
    return RunConfig(
        run=spec,
        recipe=RecipeRecord(**cfg.recipe(), optimization=spec.optimization.record()),  # the pass's, the run's own
        splits=SplitsRecord(train=splits["train"], eval=splits["eval"]),
        store=StoreRecord(
            url=absolute_url(store.url),  # evaluate and predict find it from any working directory
            fingerprint=attrs["backbone"]["fingerprint"],
            weights=attrs["backbone"].get("weights") or {},  # where they came from (provenance, not identity)
            layout=store.layout,
            dtype=attrs["dtype"],
            dataset=attrs["dataset"]["name"],
            backbone=attrs["backbone"]["name"],
            index_hash={
                k: store.split(v, require_complete=False).group.attrs["index_hash"] for k, v in splits.items() if v
            },
        ),
        model=ModelRecord(
            method=spec.method,
            version=method.version,  # of the method's forward and initialisation
            queries=spec.queries,  # the method's size: T for VQT, n for linear-multi, else 0
            depth=geometry.depth,
            dim=geometry.dim,
            heads=geometry.heads,
            num_classes=attrs["dataset"]["num_classes"],
            patch_size=list(geometry.patch_size),
            feature_dim=method.feature_dim(spec.queries, geometry),
        ),
        extra=cfg.extra,
    )


def _opened(cfg: TrainConfig) -> tuple[Store, dict[str, str | None], Backbone, torch.device]:
    """The store, the splits (train, eval or None), the frozen backbone and the device of a pass, checked: what no
    store can serve, then what this one lacks, is refused before anything is made."""
    flush_subnormals()  # else the trained regime runs four times slower on a CPU
    store = open_store(cfg.store)
    no_eval = cfg.eval_split == NO_EVAL
    splits = {
        "train": resolve_split(store, cfg.train_split, recipe.TRAIN_SPLITS, NO_TRAIN_SPLIT),
        "eval": None if no_eval else resolve_split(store, cfg.eval_split, recipe.EVAL_SPLITS, NO_EVAL_SPLIT),
    }
    backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    for spec in cfg.runs:
        methods.get(spec.method).check_geometry(spec.queries, Geometry.of(backbone))
    if any("probes" in methods.get(spec.method).reads for spec in cfg.runs) and not store.images.probes:
        raise VQTError(f"store {store.url} {NO_PROBES}")
    return store, splits, backbone, resolve_device(cfg.device)


def _data(
    cfg: TrainConfig,
    store: Store,
    backbone: Backbone,
    train_split: Any,
    eval_split: Any,
    specs: list[RunSpec],
    device: torch.device,
) -> tuple[CachedSplit, CachedSplit | None]:
    """The train and eval splits as the runs `specs` read them, within the memory budget (which covers the frozen
    weights and the cached features, held in memory or the streaming batches)."""
    budget = default_memory_budget() if cfg.memory_budget is None else cfg.memory_budget
    budget -= sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values())
    num_classes = store.attrs["dataset"]["num_classes"]
    reads = {  # what the runs read: the cache only for queries, the rest as their methods say
        "dtype": CACHE_DTYPES[cfg.precision],
        "cache": any(methods.get(s.method).reads_cache(s.queries) for s in specs),
        **{k: any(k in methods.get(s.method).reads for s in specs) for k in ("means", "probes")},
    }
    train_data = CachedSplit(train_split, max(budget, 0), cfg.batch_size, device, num_classes, **reads)
    eval_data = eval_split and CachedSplit(
        eval_split, max(budget - train_data.resident_bytes, 0), cfg.batch_size, device, num_classes, **reads
    )
    return train_data, eval_data


@dataclass(frozen=True)
class PassCost:
    """What one training pass of a `TrainConfig` costs on its device, measured on its store (`measure_pass`)."""

    load_seconds: float  # opening the store and reading its splits into memory
    step_seconds: float  # one training step of every run of the pass
    eval_seconds: float  # one evaluation batch of every run
    steps_per_epoch: int
    eval_batches: int  # per evaluation of the eval split

    def seconds(self, epochs: int, evaluations: int) -> float:
        """A pass of `epochs` with `evaluations` of the eval split, its loading included."""
        work = epochs * self.steps_per_epoch * self.step_seconds + evaluations * self.eval_batches * self.eval_seconds
        return self.load_seconds + work


def measure_pass(cfg: TrainConfig, steps: int = 5) -> PassCost:
    """Time `steps` training steps (after a warm-up) of the runs of `cfg`'s first seed on its store and device,
    without run folders: what a pass of `cfg` costs, for `plan`'s estimate."""
    started = time.perf_counter()
    store, splits, backbone, device = _opened(cfg)
    specs = [s for s in cfg.runs if s.seed == cfg.runs[0].seed]
    train_split = store.split(splits["train"])
    eval_split = splits["eval"] and store.split(splits["eval"])
    train_data, eval_data = _data(cfg, store, backbone, train_split, eval_split, specs, device)
    loaded = time.perf_counter() - started
    trainer = _Trainer(cfg, store, backbone, train_data, eval_data, specs, None, device)
    step, evaluation = trainer.seconds_per_step(steps)
    eval_batches = math.ceil(len(eval_data) / cfg.batch_size) if eval_data is not None else 0
    return PassCost(loaded, step, evaluation, trainer.steps_per_epoch, eval_batches)


def train(cfg: TrainConfig, progress: Progress | None = None) -> list[TrainedRun]:
    """Train every run of `cfg` (one pass per seed); complete runs are skipped. Returns one result per run.

    A diverged run is a result with `diverged` true and no accuracy. Each run folder is claimed and locked for
    the whole call: another process training the same folders waits, then finds them complete.
    """
    store, splits, backbone, device = _opened(cfg)
    train_split = store.split(splits["train"])
    eval_split = splits["eval"] and store.split(splits["eval"])
    dirs = run_dirs(cfg, store)
    if not (cfg.out and len(cfg.runs) == 1):
        check_parent(next(iter(dirs.values())).parent)
    configs = {spec: _run_config(cfg, spec, store, splits, backbone) for spec in cfg.runs}

    def wait(folder: Path) -> None:
        if progress:
            progress(f"waiting: another process trains {folder}", 0, 1)

    with ExitStack() as held:
        folders = {}
        for spec in sorted(cfg.runs, key=lambda s: str(dirs[s])):  # one order for every process: no deadlock
            folders[spec] = held.enter_context(claimed(dirs[spec], configs[spec], wait))
        results, todo = [], []
        for spec in cfg.runs:
            metrics = folders[spec].result()
            if metrics is not None:
                results.append(_result(spec, folders[spec], metrics, skipped=True))
            else:
                todo.append(spec)
        if not todo:
            return results
        train_data, eval_data = _data(cfg, store, backbone, train_split, eval_split, todo, device)
        _warn_if_few_steps(len(train_data), cfg.batch_size, splits["train"])
        for seed in sorted({s.seed for s in todo}):
            specs = [s for s in todo if s.seed == seed]
            timing = {"train_seconds": 0.0, "train_images": 0, "in_memory": train_data.in_memory, "epoch_seconds": {}}
            trainer = _Trainer(cfg, store, backbone, train_data, eval_data, specs, folders, device)
            trainer.run(progress, timing)
            results += trainer.save(timing)
    order = {spec.name: i for i, spec in enumerate(cfg.runs)}
    return sorted(results, key=lambda r: order[r.name])


def grid(
    names: list[str],
    queries: list[int],
    lrs: list[float | None],
    wds: list[float | None],
    seeds: list[int],
    recipes: list[str] = [recipe.RECIPE],  # noqa: B006 (never mutated)
    blocks: list[int] | None = None,
) -> tuple[RunSpec, ...]:
    """Every combination; each method trains its own sizes (`Method.sizes`: VQT the T of `queries`, linear-multi the
    n of `blocks`, default 1 and 4, the others one), duplicates dropped. An lr or wd of None is the run's recipe's."""
    specs = []
    for method in names:
        for T in methods.get(method).sizes({"T": queries, "n": blocks or []}):
            for lr in lrs:
                for wd in wds:
                    for seed in seeds:
                        for choice in recipes:
                            spec = RunSpec(method, T, lr, wd, seed, choice)
                            if spec not in specs:
                                specs.append(spec)
    return tuple(specs)
