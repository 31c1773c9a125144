"""How long a pipeline will take on this machine, before it runs: the time half of `vqt-cache plan`.

Measured, not modelled. On the device the sweep would use: a few seconds of the frozen backbone's forward (what
extraction and live test sets cost per image) and, for each dataset whose store exists, a few steps of each of
its training passes (the selection grid in one pass; one final configuration per method and size, one pass per
seed), with the loading of the store's splits. These are extrapolated to the protocol's epochs, seeds and splits.
Compression of the final VQT runs is counted as one forward of its run over the splits it reads and two head
trainings. Not counted: the process's start-up and the report's plots (seconds).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vqt_cache.backbones import Backbone, backbone_from_weights, load_backbone, resolve_device, resolve_name
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.formats import EXTRACT_BATCH_SIZE, FORWARD_PRECISION
from vqt_cache.methods.vqt import METHOD as VQT
from vqt_cache.plan import DatasetPlan
from vqt_cache.store import Store, found_at, open_store
from vqt_cache.sweep import Pipeline, final_configurations, pipeline_recipe, selection_specs
from vqt_cache.training import PassCost, grid, measure_pass

FORWARD_SECONDS = 2.0  # how long the backbone's forward is timed


@dataclass
class TaskTime:
    """One dataset's estimated seconds, by phase (None: not measurable yet, its store does not exist)."""

    dataset: str
    extract: float
    select: float | None
    final: float | None
    live: float
    compress: float | None

    @property
    def total(self) -> float | None:
        parts = (self.extract, self.select, self.final, self.live, self.compress)
        return None if None in parts else sum(parts)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def device_name(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU's and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def forward_rate(
    backbone: Backbone, device: torch.device, precision: str = FORWARD_PRECISION, batch: int = EXTRACT_BATCH_SIZE
) -> float:
    """Images a second of the backbone's forward as extraction runs it (its input size and precision, captures
    included)."""
    backbone.model.to(device)
    images = torch.randn(batch, *backbone.data_config["input_size"], device=device)
    backbone.forward_cache(images, precision=precision)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < FORWARD_SECONDS or done == 0:
        backbone.forward_cache(images, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        done += batch
    return done / (time.perf_counter() - started)


def _architecture(p: Pipeline, store: Store | None) -> str:
    """What a forward's speed depends on, for a dataset of `p` (its store's backbone, or the pipeline's)."""
    if store is not None:
        described = store.attrs["backbone"]
        return json.dumps([described["timm_name"], described["kwargs"], store.forward_precision], sort_keys=True)
    timm_name, kwargs = resolve_name(p.backbone)
    return json.dumps([timm_name, kwargs, FORWARD_PRECISION], sort_keys=True)


def _forward_of(p: Pipeline, store: Store | None) -> tuple[Backbone, str]:
    """The backbone a dataset of `p` is extracted with, and its forward's precision (random weights for a store
    yet to be made: a forward's speed does not depend on them)."""
    if store is not None:
        return backbone_from_weights(store.attrs["backbone"], store.weights()), store.forward_precision
    return load_backbone(p.backbone, weights="random"), FORWARD_PRECISION


def _final_specs(p: Pipeline, entry: Any) -> tuple[RunSpec, ...]:
    """One run per (method, size) the protocol selects: what each final pass trains (at their recipes' default lr
    and wd: selection picks others, which does not change a step's cost)."""
    names, seeds = [VQT.name, *p.baselines], [p.protocol.final_seeds[0]]
    return grid(names, list(entry.queries), [None], [None], seeds, [p.recipe], list(entry.blocks))


def estimate_pipeline(p: Pipeline, plans: list[DatasetPlan]) -> tuple[str, list[TaskTime]]:
    """The device's name, and each dataset's estimated seconds (`plans`: `plan.plan_pipeline(p)`)."""
    proto, device = p.protocol, resolve_device("auto")
    times = []
    rates: dict[str, float] = {}  # a backbone's forward is timed once, whatever its weights: one per architecture
    for entry, plan in zip(p.datasets, plans, strict=True):
        url = p.store_for(entry)
        stored = found_at(url) == "store"
        store = open_store(url) if stored else None
        architecture = _architecture(p, store)
        if architecture not in rates:
            backbone, precision = _forward_of(p, store)
            rates[architecture] = forward_rate(backbone, device, precision)
        rate = rates[architecture]
        extract = sum(s.new_images for s in plan.splits if s.cached) / rate
        live_images = sum(s.images or 0 for s in plan.splits if not s.cached and s.name == proto.final_eval)
        live = live_images / rate
        select = final = compress = None
        if store is not None:
            common = {"store": url, "device": "auto", **pipeline_recipe(p)}
            evaluations = 1  # the sweep evaluates once, after the last epoch
            chosen = TrainConfig(
                runs=selection_specs(p, entry),
                train_split=proto.select_train,
                eval_split=proto.select_eval,
                **common,
            )
            select = measure_pass(chosen).seconds(proto.epochs, evaluations)
            cached_test = store.has_split(proto.final_eval)
            finals = TrainConfig(
                runs=_final_specs(p, entry),
                train_split=proto.final_train,
                eval_split=proto.final_eval if cached_test else "none",
                **common,
            )
            cost = measure_pass(finals)
            final = len(proto.final_seeds) * cost.seconds(proto.epochs, evaluations if cached_test else 0)
            compress = _compress_seconds(p, entry, cost)
        times.append(TaskTime(entry.name, extract, select, final, live, compress))
    return device_name(device), times


def _compress_seconds(p: Pipeline, entry: Any, cost: PassCost) -> float:
    """Compression of each seed's VQT runs: the run's features over its train and eval splits (a forward of the
    pass's runs, shared out per run) and two head trainings of the protocol's epochs (a step of a linear head costs
    about what a pass's step costs per run, once more, from features already computed)."""
    if not (entry.compress if entry.compress is not None else p.compress):
        return 0.0
    runs = final_configurations(p, entry)
    vqt_runs = len(list(entry.queries))
    per_run_forward = (cost.steps_per_epoch + cost.eval_batches) * cost.eval_seconds / runs
    per_run_heads = 2 * p.protocol.epochs * cost.steps_per_epoch * cost.step_seconds / runs
    return len(p.protocol.final_seeds) * vqt_runs * (per_run_forward + per_run_heads + cost.load_seconds)


def clock(seconds: float | None) -> str:
    """Seconds as a reader reads them: 42 s, 3.5 min, 2.1 h."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
