"""Stage two: train VQT runs and baselines from a store alone (method.md §5), many configurations per pass.

Runs that share a seed share a pass over the cache (the seed fixes the data order); each keeps its own
queries, head, Adam optimizer and run folder. Everything random is derived from (seed, epoch): the order of
the rows and the dropout masks, so a run resumed from a checkpoint replays exactly what an uninterrupted run
does. No image code and no backbone forward: the frozen blocks come from the store's own weights.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vqt_cache import package_versions
from vqt_cache.backbones import Backbone, backbone_from_weights, resolve_device
from vqt_cache.data import CachedSplit, default_memory_budget
from vqt_cache.errors import VQTError
from vqt_cache.model import METHODS, CachedVQT, Run
from vqt_cache.store import Store, open_store

# Progress: called with (description, steps done, steps total)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunSpec:
    """One configuration: what a run folder trains."""

    method: str = "vqt"
    queries: int = 1
    lr: float = 0.5  # base learning rate; the optimizer uses lr · batch_size / 256
    wd: float = 1e-3
    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise VQTError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.queries < 0:
            raise VQTError(f"the number of queries T must be >= 0, got {self.queries}")
        if not self.lr > 0 or not self.wd >= 0:
            raise VQTError(f"learning rate must be > 0 and weight decay >= 0, got lr={self.lr}, wd={self.wd}")
        if self.method != "vqt":
            object.__setattr__(self, "queries", 0)  # the baselines have no queries

    @property
    def name(self) -> str:
        queries = f"-T{self.queries}" if self.method == "vqt" else ""
        return f"{self.method}{queries}-lr{self.lr:g}-wd{self.wd:g}-seed{self.seed}"


@dataclass(frozen=True)
class TrainConfig:
    """A training pass: the store, the runs, and the recipe they share."""

    store: str
    runs: tuple[RunSpec, ...] = (RunSpec(),)
    train_split: str | None = None  # default: train800, else train
    eval_split: str | None = None  # default: val200, else val, else test
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 128
    dropout: float = 0.1
    memory_budget: int | None = None  # bytes for cached features in memory; default half the RAM
    device: str = "auto"
    out: str | None = None  # one run: its folder; several: their parent. Default data/runs/<dataset>/<backbone>
    eval_every: int = 1
    checkpoint_every: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, not interpreted (e.g. the sweep's name)

    def __post_init__(self) -> None:
        if not self.runs:
            raise VQTError("nothing to train: no run configurations given")
        if self.epochs < 1 or not 0 <= self.warmup_epochs < self.epochs:
            raise VQTError(f"need epochs >= 1 and 0 <= warmup < epochs, got {self.epochs} and {self.warmup_epochs}")
        if self.batch_size < 1:
            raise VQTError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.dropout < 1:
            raise VQTError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.memory_budget is not None and self.memory_budget < 0:
            raise VQTError(f"the memory budget must be >= 0, got {self.memory_budget / 2**30:g} GiB")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise VQTError("--eval-every and --checkpoint-every must be >= 1")
        if len({r.name for r in self.runs}) != len(self.runs):
            raise VQTError("the same configuration is listed twice")

    def recipe(self) -> dict[str, Any]:
        """The shared hyper-parameters, as recorded in every run's config.json."""
        keys = ("epochs", "warmup_epochs", "batch_size", "dropout", "eval_every")
        return {k: getattr(self, k) for k in keys}


def lr_factor(epoch: int, epochs: int, warmup: int) -> float:
    """Linear warm-up then cosine, stepped per epoch: e/W for e < W, else 0.5·(1 + cos(π(e−W)/(E−W)))."""
    if epoch < warmup:
        return epoch / warmup
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def derived_seed(seed: int, epoch: int) -> int:
    """A generator seed for (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_split(store: Store, requested: str | None, preferences: tuple[str, ...], what: str) -> str:
    if requested:
        return requested
    for name in preferences:
        if name in store.split_names():
            return name
    raise VQTError(f"store {store.url} has none of the {what} splits {', '.join(preferences)}; pass one explicitly")


def run_dirs(cfg: TrainConfig, store: Store) -> dict[RunSpec, Path]:
    if cfg.out and len(cfg.runs) == 1:
        return {cfg.runs[0]: Path(cfg.out)}
    dataset, backbone = store.attrs["dataset"]["name"], store.attrs["backbone"]["name"]
    parent = Path(cfg.out) if cfg.out else Path("data/runs") / dataset / backbone
    return {spec: parent / spec.name for spec in cfg.runs}


def accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 and mean per-class accuracy (over the classes present)."""
    correct = (logits.argmax(dim=1) == labels).double()
    per_class = [correct[labels == c].mean().item() for c in range(num_classes) if (labels == c).any()]
    return {"top1": correct.mean().item(), "mean_class": float(np.mean(per_class))}


def cached_logits(model: CachedVQT, data: CachedSplit) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every run's logits over a whole cached split (in store order, on the CPU), and the labels."""
    logits: list[list[torch.Tensor]] = [[] for _ in model.runs]
    labels = []
    with torch.no_grad():
        for batch in data.batches():
            for i, out in enumerate(model(batch.final, batch.cache)):
                logits[i].append(out.cpu())
            labels.append(batch.labels.cpu())
    return [torch.cat(lg) for lg in logits], torch.cat(labels)


class _Trainer:
    """One pass: runs of one seed over one train split (and evaluation on one eval split)."""

    def __init__(
        self,
        cfg: TrainConfig,
        store: Store,
        backbone: Backbone,
        train: CachedSplit,
        evaluation: CachedSplit | None,
        specs: list[RunSpec],
        dirs: dict[RunSpec, Path],
        device: torch.device,
    ) -> None:
        self.cfg, self.train_data, self.eval_data = cfg, train, evaluation
        self.specs, self.dirs, self.device = specs, dirs, device
        self.seed = specs[0].seed
        num_classes = store.attrs["dataset"]["num_classes"]
        runs = [
            Run(
                s.method, s.queries, backbone.depth, backbone.dim, num_classes, backbone.patch_size, cfg.dropout, s.seed
            )
            for s in specs
        ]
        self.model = CachedVQT(backbone.blocks, runs, store.layout).to(device)
        self.optimizers = []
        for run, spec in zip(runs, specs, strict=True):
            groups = [
                {"params": [run.queries.prompts, run.head.weight], "weight_decay": spec.wd},
                {"params": [run.head.bias], "weight_decay": 0.0},
            ]  # no decay on the head bias
            self.optimizers.append(torch.optim.Adam(groups, lr=self._lr(spec, 0)))
        self.history: list[list[dict]] = [[] for _ in specs]
        self.start_epoch = self._resume()

    def _lr(self, spec: RunSpec, epoch: int) -> float:
        cfg = self.cfg
        return spec.lr * cfg.batch_size / 256 * lr_factor(epoch, cfg.epochs, cfg.warmup_epochs)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoints(self, spec: RunSpec) -> dict[int, Path]:
        return {int(p.stem.split("-")[1]): p for p in self.dirs[spec].glob("checkpoint-*.pt")}

    def _resume(self) -> int:
        """Epochs already done by every run of this pass (0 without usable checkpoints)."""
        found = [self._checkpoints(s) for s in self.specs]
        if not all(found):
            return 0
        epoch = min(max(c) for c in found)
        if not all(epoch in c for c in found):
            return 0
        for i, checkpoints in enumerate(found):
            state = torch.load(checkpoints[epoch], map_location=self.device, weights_only=True)
            self.model.runs[i].load_state_dict(state["run"])
            self.optimizers[i].load_state_dict(state["optimizer"])
            self.history[i] = json.loads(state["history"])
        return epoch

    def _checkpoint(self, epochs_done: int) -> None:
        for i, spec in enumerate(self.specs):
            folder = self.dirs[spec]
            state = {
                "run": self.model.runs[i].state_dict(),
                "optimizer": self.optimizers[i].state_dict(),
                "history": json.dumps(self.history[i]),
            }
            tmp = folder / f".checkpoint-{epochs_done}.tmp"
            torch.save(state, tmp)
            tmp.rename(folder / f"checkpoint-{epochs_done}.pt")  # atomic: a checkpoint is whole or absent
            for old in sorted(self._checkpoints(spec))[:-2]:  # keep two, so runs of a pass can meet again
                self._checkpoints(spec)[old].unlink()

    # -- epochs ------------------------------------------------------------------------------------------------
    def _evaluate(self) -> list[dict[str, float]]:
        self.model.eval()
        logits, labels = cached_logits(self.model, self.eval_data)
        return [accuracy(lg, labels, run.head.out_features) for lg, run in zip(logits, self.model.runs, strict=True)]

    def run(self, progress: Progress | None, timing: dict[str, float]) -> None:
        cfg = self.cfg
        steps_per_epoch = math.ceil(len(self.train_data) / cfg.batch_size)
        label = f"train seed {self.seed} ({len(self.specs)} run{'s' if len(self.specs) > 1 else ''})"
        total = cfg.epochs * steps_per_epoch
        step = self.start_epoch * steps_per_epoch
        if progress:
            progress(label, step, total)
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.perf_counter()
            for spec, optimizer in zip(self.specs, self.optimizers, strict=True):
                for group in optimizer.param_groups:
                    group["lr"] = self._lr(spec, epoch)
            self.model.train()
            generators = [torch.Generator(self.device).manual_seed(derived_seed(s.seed, epoch)) for s in self.specs]
            losses = torch.zeros(len(self.specs), dtype=torch.float64)
            for batch in self.train_data.batches(self.train_data.shuffled(self.seed, epoch)):
                per_run = [
                    F.cross_entropy(out, batch.labels) for out in self.model(batch.final, batch.cache, generators)
                ]
                torch.stack(per_run).sum().backward()  # each run's parameters get only their own loss's gradient
                for optimizer in self.optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses += torch.tensor([loss.item() for loss in per_run], dtype=torch.float64) * len(batch.rows)
                step += 1
                if progress:
                    progress(label, step, total)
            timing["train_seconds"] += time.perf_counter() - started
            timing["train_images"] += len(self.train_data)
            last = epoch == cfg.epochs - 1
            evaluated = (
                self._evaluate()
                if self.eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last)
                else [None] * len(self.specs)
            )
            for i, spec in enumerate(self.specs):
                entry = {
                    "epoch": epoch,
                    "lr": self._lr(spec, epoch),
                    "train_loss": losses[i].item() / len(self.train_data),
                }
                if evaluated[i] is not None:
                    entry.update({f"eval_{k}": v for k, v in evaluated[i].items()})
                self.history[i].append(entry)
            if (epoch + 1) % cfg.checkpoint_every == 0 and not last:
                self._checkpoint(epoch + 1)

    def save(self, timing: dict[str, float]) -> list[dict[str, Any]]:
        results = []
        for i, spec in enumerate(self.specs):
            folder = self.dirs[spec]
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.runs[i].tensors().items()}
            save_file(tensors, folder / "model.safetensors")
            final = {k.removeprefix("eval_"): v for k, v in self.history[i][-1].items() if k.startswith("eval_")}
            metrics = {"run": spec.name, "complete": True, "epochs": self.history[i], "final": final}
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
            (folder / "timing.json").write_text(json.dumps({**timing, "runs_in_pass": len(self.specs)}))
            for checkpoint in self._checkpoints(spec).values():
                checkpoint.unlink()
            results.append({"name": spec.name, "dir": str(folder), "final": final, "skipped": False})
        return results


def _run_config(cfg: TrainConfig, spec: RunSpec, store: Store, splits: dict[str, str], backbone: Backbone) -> dict:
    attrs = store.attrs
    num_classes = attrs["dataset"]["num_classes"]
    depth, dim = backbone.depth, backbone.dim
    T = spec.queries if spec.method == "vqt" else 0
    return {
        "run": asdict(spec),
        "recipe": cfg.recipe(),
        "splits": splits,
        "store": {
            "url": store.url,
            "fingerprint": attrs["backbone"]["fingerprint"],
            "layout": store.layout,
            "dtype": attrs["dtype"],
            "dataset": attrs["dataset"]["name"],
            "backbone": attrs["backbone"]["name"],
            "index_hash": {k: store.group[v].attrs["index_hash"] for k, v in splits.items() if v},
        },
        "model": {
            "method": spec.method,
            "queries": T,
            "depth": depth,
            "dim": dim,
            "num_classes": num_classes,
            "patch_size": list(backbone.patch_size),
            "feature_dim": dim * (1 + depth) if spec.method == "pooled" else dim * (1 + depth * T),
        },
        "extra": cfg.extra,
    }


def _identity(config: dict) -> dict:
    """What must match for a run folder to be resumed or skipped (not where the store lives)."""
    kept = {k: v for k, v in config.items() if k not in ("versions", "git_sha")}
    return {**kept, "store": {k: v for k, v in config["store"].items() if k != "url"}}


def _prepare_folder(folder: Path, config: dict) -> bool:
    """Write config.json, or check an existing one; returns True when the run is already complete."""
    path = folder / "config.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if _identity(existing) != _identity(config):
            raise VQTError(f"run folder {folder} holds another configuration; use another --out or delete it")
        metrics = folder / "metrics.json"
        return metrics.exists() and json.loads(metrics.read_text()).get("complete", False)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**config, "versions": package_versions(), "git_sha": _git_sha()}, indent=1))
    return False


def train(cfg: TrainConfig, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train every run of `cfg` (one pass per seed); complete runs are skipped. Returns one result per run."""
    store = open_store(cfg.store)
    splits = {
        "train": resolve_split(store, cfg.train_split, ("train800", "train"), "training"),
        "eval": resolve_split(store, cfg.eval_split, ("val200", "val", "test"), "evaluation"),
    }
    train_split = store.split(splits["train"])
    eval_split = store.split(splits["eval"])
    backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    device = resolve_device(cfg.device)
    dirs = run_dirs(cfg, store)
    configs = {spec: _run_config(cfg, spec, store, splits, backbone) for spec in cfg.runs}
    results, todo = [], []
    for spec in cfg.runs:
        if _prepare_folder(dirs[spec], configs[spec]):
            metrics = json.loads((dirs[spec] / "metrics.json").read_text())
            results.append({"name": spec.name, "dir": str(dirs[spec]), "final": metrics["final"], "skipped": True})
        else:
            todo.append(spec)
    if not todo:
        return results
    # the budget covers the frozen weights and the cached features (held in memory, or the streaming batches)
    budget = default_memory_budget() if cfg.memory_budget is None else cfg.memory_budget
    budget -= sum(t.numel() * t.element_size() for t in backbone.model.state_dict().values())
    train_data = CachedSplit(train_split, max(budget, 0), cfg.batch_size, device=device)
    eval_data = CachedSplit(eval_split, max(budget - train_data.resident_bytes, 0), cfg.batch_size, device=device)
    for seed in sorted({s.seed for s in todo}):
        specs = [s for s in todo if s.seed == seed]
        timing = {"train_seconds": 0.0, "train_images": 0, "in_memory": train_data.in_memory}
        trainer = _Trainer(cfg, store, backbone, train_data, eval_data, specs, dirs, device)
        trainer.run(progress, timing)
        results += trainer.save(timing)
    order = {spec.name: i for i, spec in enumerate(cfg.runs)}
    return sorted(results, key=lambda r: order[r["name"]])


def load_run(run_dir: str | Path, store_url: str | None = None) -> tuple[dict, Store, Backbone, CachedVQT]:
    """A finished run folder -> (config, its store, the frozen backbone, the trained single-run model)."""
    folder = Path(run_dir)
    if not (folder / "config.json").exists() or not (folder / "model.safetensors").exists():
        raise VQTError(f"{folder} is not a finished run folder (no config.json and model.safetensors)")
    config = json.loads((folder / "config.json").read_text())
    store = open_store(store_url or config["store"]["url"])
    if store.attrs["backbone"]["fingerprint"] != config["store"]["fingerprint"]:
        raise VQTError(f"run {folder} was trained on another store (backbone fingerprint differs from {store.url})")
    backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    m = config["model"]
    run = Run(
        m["method"],
        m["queries"],
        m["depth"],
        m["dim"],
        m["num_classes"],
        tuple(m["patch_size"]),
        config["recipe"]["dropout"],
    )
    tensors = load_file(folder / "model.safetensors")
    with torch.no_grad():
        run.queries.prompts.copy_(tensors["queries"])
        run.head.weight.copy_(tensors["head.weight"])
        run.head.bias.copy_(tensors["head.bias"])
    return config, store, backbone, CachedVQT(backbone.blocks, [run], store.layout).eval()


def evaluate(
    run_dir: str | Path, split: str = "test", store_url: str | None = None, memory_budget: int | None = None
) -> dict[str, Any]:
    """Accuracy of a trained run on a cached split."""
    config, store, _, model = load_run(run_dir, store_url)
    data = CachedSplit(store.split(split), memory_budget, config["recipe"]["batch_size"])
    if data.num_classes > config["model"]["num_classes"]:
        raise VQTError(f"split {split!r} has labels beyond the run's {config['model']['num_classes']} classes")
    logits, labels = cached_logits(model, data)
    return {
        "run": config["run"],
        "split": split,
        "images": len(data),
        **accuracy(logits[0], labels, config["model"]["num_classes"]),
    }


def grid(
    methods: list[str], queries: list[int], lrs: list[float], wds: list[float], seeds: list[int]
) -> tuple[RunSpec, ...]:
    """Every combination, with T ignored (and deduplicated) for the baselines."""
    specs = []
    for method in methods:
        for T in queries if method == "vqt" else [0]:
            for lr in lrs:
                for wd in wds:
                    for seed in seeds:
                        spec = RunSpec(method, T, lr, wd, seed)
                        if spec not in specs:
                            specs.append(spec)
    return tuple(specs)
