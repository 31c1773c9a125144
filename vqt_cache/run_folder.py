"""The run folder: one trained configuration's files, and the rules that keep them trustworthy.

    <run>/config.json        what was trained on what (written first; its identity is the run's identity)
          checkpoint-<E>.pt  after E epochs: the run's state, stamped with the run's identity (at most two kept)
          model.safetensors  queries (L, T, D), head.weight (C, F), head.bias (C,)   [not written for a diverged run]
          timing.json
          metrics.csv        one row per epoch: epoch, lr, train_loss, eval_top1, eval_mean_class
          metrics.json       written last: {"complete": true, "diverged": ..., "epochs": [...], "final": {...},
                             "checksums": {file: blake2b-256} of config.json and model.safetensors}
          .lock              held (flock) by the one process training the folder

Rules: a run folder is created only where nothing exists or in an empty folder; a folder is reused only when its
config.json describes the very same run; files are written whole (vqt_cache.files); a checkpoint is resumed only
by the run that wrote it; one process at a time trains a folder, and another one waits, then finds it done.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vqt_cache import methods, recipe
from vqt_cache.config import RunSpec
from vqt_cache.errors import VQTError, recorded
from vqt_cache.files import (
    DamagedFile,
    check_digest,
    describe_entries,
    digest,
    folder_entries,
    load_tensors,
    load_torch,
    read_json,
    save_tensors,
    save_torch,
    write_bytes,
    write_json,
)

CHECKSUMMED = ("config.json", "model.safetensors")  # the files of a finished run whose checksums metrics.json holds
CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")
LOCK = ".lock"
KEEP_CHECKPOINTS = 2  # two, so the runs of a pass can meet at a common epoch again


# -- config.json: what was trained on what, as the records it is written from and read back as -------------------


@dataclass(frozen=True)
class RecipeRecord:
    """config.json's "recipe": the schedule the run's pass shared (`TrainConfig.recipe()`) and the optimization the
    run followed (`recipe.Optimization.record()`)."""

    epochs: int
    warmup_epochs: int
    batch_size: int
    dropout: float
    eval_every: int
    precision: str = "float32"  # runs from before precision was recorded trained in float32
    optimization: dict[str, Any] = field(default_factory=recipe.VQT_RECIPE.record)  # runs from before issue 30


@dataclass(frozen=True)
class SplitsRecord:
    """config.json's "splits": what the run trained on and evaluated on (None: no evaluation during training)."""

    train: str
    eval: str | None


@dataclass(frozen=True)
class StoreRecord:
    """config.json's "store": where the run's store was and what identifies it."""

    url: str  # evaluate and predict find it from any working directory
    fingerprint: str  # of the frozen weights
    layout: str | None = None
    dtype: str | None = None
    dataset: str | None = None
    backbone: str | None = None
    index_hash: dict[str, str] | None = None  # each split's identity
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from (provenance, not identity)


@dataclass(frozen=True)
class ModelRecord:
    """config.json's "model": the shapes of the run's tensors, and its method's version."""

    method: str
    queries: int  # the method's size: T for VQT, n for linear-multi, else 0
    depth: int
    dim: int
    num_classes: int
    patch_size: list[int]
    feature_dim: int
    heads: int = 0
    version: int = 1  # of the method's forward and initialisation; runs from before issue 30 are version 1

    @classmethod
    def from_json(cls, table: Any, where: Path) -> ModelRecord:
        """A "model" table (of a config.json, or an export's metadata), checked: DamagedFile naming what is wrong."""
        return _record(cls, table, where, "model")


@dataclass(frozen=True)
class RunConfig:
    """A run folder's config.json: written from these records when the folder is claimed, read back as them."""

    run: RunSpec
    recipe: RecipeRecord
    splits: SplitsRecord
    store: StoreRecord
    model: ModelRecord
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] | None = None  # of the packages that trained it (not identity)
    git_sha: str | None = None

    def to_json(self) -> dict[str, Any]:
        tables = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in tables.items()}
        return {k: v for k, v in out.items() if not (k in ("versions", "git_sha") and v is None)}

    @classmethod
    def from_json(cls, config: Any, where: Path) -> RunConfig:
        """The records of a config.json's content; DamagedFile naming the first entry that is missing or wrong."""
        if not isinstance(config, dict):
            raise DamagedFile(where, "it is not a JSON object")
        run = config.get("run")
        if isinstance(run, dict) and "recipe" not in run and isinstance(run.get("method"), str):
            own = methods.get(run["method"]).recipe == recipe.VQT_RECIPE.name  # before issue 30: VQT's for all
            run = {**run, "recipe": "own" if own else "shared"}  # as RunSpec names that recipe
        try:
            spec = RunSpec(**vars(_record(_RunTable, run, where, "run")))
        except VQTError as exc:
            raise DamagedFile(where, f"its run table is not a run this version trains ({exc})") from exc
        return cls(
            run=spec,
            recipe=_record(RecipeRecord, config.get("recipe"), where, "recipe"),
            splits=_record(SplitsRecord, config.get("splits"), where, "splits"),
            store=_record(StoreRecord, config.get("store"), where, "store"),
            model=_record(ModelRecord, config.get("model"), where, "model"),
            extra=_extra(config.get("extra", {}), where),
            versions=config.get("versions") if isinstance(config.get("versions"), dict) else None,
            git_sha=config.get("git_sha") if isinstance(config.get("git_sha"), str) else None,
        )

    def identity(self) -> dict[str, Any]:
        """What must match for a run folder to be resumed or skipped: not versions, nor where the store lives, nor
        where its weights came from (the fingerprint is their identity)."""
        kept = {k: v for k, v in self.to_json().items() if k not in ("versions", "git_sha")}
        return {**kept, "store": {k: v for k, v in kept["store"].items() if k not in ("url", "weights")}}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class _RunTable:
    """config.json's "run", type-checked before it becomes the `RunSpec` it was written from."""

    method: str
    queries: int
    lr: float
    wd: float
    seed: int
    recipe: str


def _extra(extra: Any, where: Path) -> dict[str, Any]:
    """config.json's "extra": free-form entries of the run's identity (a sweep's name), a table when present."""
    if not isinstance(extra, dict):
        raise DamagedFile(where, f"extra is {extra!r}")
    return extra


def _record(kind: type, table: Any, where: Path, name: str) -> Any:
    """A record of `kind` from config.json's table `name`: each field present (or defaulted) and of its type."""
    if not isinstance(table, dict):
        raise DamagedFile(where, f"no {name!r} table")
    hints = typing.get_type_hints(kind)
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in table:
            if not _is(table[f.name], hints[f.name]):
                raise DamagedFile(where, f"{name} {f.name} is {table[f.name]!r}")
            values[f.name] = table[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DamagedFile(where, f"{name} {f.name} is missing")
    return kind(**values)


def _is(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a record field's type (a number is an int only when integral; never a bool)."""
    if isinstance(hint, types.UnionType):
        return any(_is(value, option) for option in hint.__args__)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, int | float)
    origin = typing.get_origin(hint) or hint
    if origin is Any:
        return True
    return isinstance(value, origin)


def _ignorable(name: str) -> bool:
    return name == LOCK or name.startswith(".") and ".tmp" in name


def read_config(path: Path) -> RunConfig:
    """A run folder's config.json, as the records it was written from (DamagedFile where it is not one)."""
    return RunConfig.from_json(read_json(path / "config.json"), path / "config.json")


class RunFolder:
    """A run folder this process has claimed and holds the lock of (see `claimed`)."""

    def __init__(self, path: Path, config: RunConfig) -> None:
        self.path, self.config = path, config
        self.identity = config.identity_hash()

    # -- completion ------------------------------------------------------------------------------------------------
    def result(self) -> dict | None:
        """metrics.json when the run is provably complete, else None (not finished, or its model file is gone: it is
        trained again). A model or config.json that differs from its recorded checksum is DamagedFile: a damaged
        result is never "done"."""
        try:
            metrics = read_json(self.path / "metrics.json")
        except (FileNotFoundError, DamagedFile):
            return None
        if metrics.get("complete") is not True or not isinstance(metrics.get("final"), dict):
            return None
        if not metrics.get("diverged") and not (self.path / "model.safetensors").is_file():
            return None
        check_files(self.path, metrics, ("config.json",) if metrics.get("diverged") else CHECKSUMMED)
        return metrics

    def save_result(self, tensors: dict | None, metrics: dict, timing: dict) -> None:
        """The model, the timing, then metrics.json (the completion record, with the checksums of config.json and
        the model), then the checkpoints go."""
        checksums = {"config.json": digest((self.path / "config.json").read_bytes())}
        if tensors is not None:
            checksums["model.safetensors"] = save_tensors(self.path / "model.safetensors", tensors)
        else:
            (self.path / "model.safetensors").unlink(missing_ok=True)  # a diverged run has no model
        write_json(self.path / "timing.json", timing)
        write_bytes(self.path / "metrics.csv", _epochs_csv(metrics["epochs"]).encode())
        write_json(self.path / "metrics.json", {**metrics, "checksums": checksums})
        for checkpoint in self.checkpoints().values():
            checkpoint.unlink()

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def checkpoints(self) -> dict[int, Path]:
        found = {}
        for name in folder_entries(self.path):
            if match := CHECKPOINT.fullmatch(name):
                found[int(match.group(1))] = self.path / name
        return found

    def save_checkpoint(self, epochs_done: int, state: dict) -> None:
        save_torch(self.path / f"checkpoint-{epochs_done}.pt", {**state, "identity": self.identity})
        for old in sorted(self.checkpoints())[:-KEEP_CHECKPOINTS]:
            self.checkpoints()[old].unlink()

    def load_checkpoint(self, epochs_done: int, map_location: Any) -> dict:
        path = self.checkpoints()[epochs_done]
        state = load_torch(path, map_location)
        if state.get("identity") != self.identity:
            raise VQTError(
                f"checkpoint {path} was not written by this run (another configuration or an older vqt-cache); "
                "delete it to train this run from the start"
            )
        return state


EPOCH_COLUMNS = ("epoch", "lr", "train_loss", "eval_top1", "eval_mean_class")


def _epochs_csv(epochs: list[dict]) -> str:
    """metrics.json's per-epoch entries as CSV (epochs numbered from 1, as there; empty where not evaluated)."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, EPOCH_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(epochs)
    return text.getvalue()


@contextmanager
def claimed(path: str | Path, config: RunConfig, wait: Callable[[Path], None] | None = None) -> Iterator[RunFolder]:
    """Claim a run folder for `config` and hold its lock: create it (new or empty folder) or check it is this run's.

    Another process training the same folder holds the lock: this one waits for it (calling `wait` first).
    Anything else at `path` is refused in one sentence and left untouched.
    """
    path = Path(path)
    _check_claimable(path, config)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait:
                wait(path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _check_claimable(path, config)  # again, now that no one else writes here
            if not (path / "config.json").exists():
                from vqt_cache import package_versions

                stamped = dataclasses.replace(config, versions=package_versions(), git_sha=_git_sha())
                write_json(path / "config.json", stamped.to_json())
            yield RunFolder(path, config)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_claimable(path: Path, config: RunConfig) -> None:
    if path.exists() and not path.is_dir():
        raise VQTError(f"{path} is a file, not a run folder; choose another --out")
    if (path / "config.json").exists():
        existing = read_config(path)
        if existing.identity() != config.identity():
            raise VQTError(f"run folder {path} {_difference(existing.identity(), config.identity())}")
        return
    if any(not _ignorable(name) for name in folder_entries(path)):
        raise VQTError(
            f"{path} holds {describe_entries(path)} but no config.json, so it is not a vqt-cache run folder; "
            "runs are written only into a new or empty folder: choose another --out"
        )


# a recorded setting -> the option that sets it (the pipeline key is the same name without dashes)
_OPTIONS = {
    "recipe.epochs": "--epochs",
    "recipe.warmup_epochs": "--warmup-epochs",
    "recipe.batch_size": "--batch-size",
    "recipe.dropout": "--dropout",
    "recipe.eval_every": "--eval-every",
    "recipe.precision": "--precision",
    "splits.train": "--train-split",
    "splits.eval": "--eval-split",
}


def _difference(have: dict, want: dict, where: str = "") -> str:
    """What makes a run folder's identity another than this run's, in words: the first setting that differs, and
    the option that finishes or reuses the folder, if an option sets it."""
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if a == b:
            continue
        name = f"{where}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            return _difference(a, b, f"{name}.")
        said = f"was trained with {name} = {a!r}, this run has {b!r}"
        if name == "recipe.precision":
            said += " (precision auto picks per machine)"
        if name in _OPTIONS:
            shown = "none" if a is None else a
            return f"{said}: pass {_OPTIONS[name]} {shown} to finish or reuse it, or use another --out"
        if name.startswith("store."):
            return f"{said} (another store, or another version of it): use another --out, or train from its store"
        return f"{said}: use another --out, or delete the folder"
    return "holds another configuration: use another --out, or delete the folder"


def check_parent(path: str | Path) -> None:
    """A folder that will hold several run folders: new, or holding only run folders (not being one itself)."""
    path = Path(path)
    if (path / "config.json").exists():
        raise VQTError(f"{path} is a run folder; pass a new or empty folder (or its parent) as --out for several runs")
    for name in folder_entries(path):
        entry = path / name
        if (
            _ignorable(name)
            or entry.is_dir()
            and ((entry / "config.json").exists() or all(_ignorable(n) for n in folder_entries(entry)))
        ):
            continue
        raise VQTError(
            f"{path} holds {entry.name}, which is not a run folder; several runs are written only into a new "
            "folder or one that holds run folders alone: choose another --out"
        )


def _git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def recorded_checksums(record: dict, where: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The checksums a completion record (a metrics.json) holds for the files `names`. Every record this vqt-cache
    writes has them, so a missing, null or mistyped one is damage (`errors.recorded`), never "nothing to check".
    `where` is the record's path, named in the DamagedFile."""
    advice = "train the run again into a new --out, or restore the file"
    checksums = recorded(record, "checksums", dict, str(where), advice, "table of checksums")
    for name in names:
        recorded(checksums, name, str, str(where), advice, f"checksum of {name}")
    return checksums


def check_files(folder: Path, metrics: dict, names: tuple[str, ...]) -> None:
    """The files `names` of a run folder have the checksums its metrics.json records; DamagedFile naming the file
    otherwise (or naming metrics.json, when it records none)."""
    checksums = recorded_checksums(metrics, folder / "metrics.json", names)
    for name in names:
        check_digest(folder / name, checksums[name], "metrics.json")


def load_finished(path: str | Path) -> tuple[RunConfig, dict]:
    """(config, metrics) of a run folder that finished with a model; one sentence otherwise."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise VQTError(f"{path} is not a finished run folder (no config.json)")
    config = read_config(path)
    try:
        metrics = read_json(path / "metrics.json")
    except FileNotFoundError:
        raise VQTError(
            f"{path} is not a finished run folder (no metrics.json: still training or interrupted)"
        ) from None
    if metrics.get("diverged"):
        raise VQTError(f"run {path} diverged ({metrics.get('diverged_reason', 'non-finite loss')}): it has no model")
    if metrics.get("complete") is not True:
        raise VQTError(f"{path} is not a finished run folder (its metrics.json does not mark it complete)")
    if not (path / "model.safetensors").is_file():
        raise VQTError(f"{path} is not a finished run folder (no model.safetensors)")
    check_files(path, metrics, ("config.json",))  # the model is checked by the read that loads it (`load_model`)
    return config, metrics


def model_shapes(model: ModelRecord) -> dict[str, tuple[int, ...]]:
    """The tensors a run folder's model.safetensors must hold, from config.json's "model" table."""
    from vqt_cache.model import RunParameters

    try:
        shaped = RunParameters.from_record(model)  # the method's own tensors (a probe's), shaped by the table
    except (TypeError, ValueError) as exc:
        raise VQTError(f"config.json's model table is incomplete ({exc})") from exc
    probe = {name: tuple(t.shape) for name, t in shaped.tensors().items() if name.startswith("probe.")}
    T = shaped.queries.num_queries  # the method's queries per layer (its size is T for VQT only)
    C, F = model.num_classes, model.feature_dim
    return {"queries": (model.depth, T, model.dim), **probe, "head.weight": (C, F), "head.bias": (C,)}


def load_model(path: str | Path, model: ModelRecord, metrics: dict) -> dict:
    """A run folder's model.safetensors, its shapes from config.json's "model" table, finite, and checked against
    the checksum the run's metrics.json records, in the one read that loads it."""
    path = Path(path)
    checksums = recorded_checksums(metrics, path / "metrics.json", ("model.safetensors",))
    return load_tensors(path / "model.safetensors", model_shapes(model), True, checksums["model.safetensors"])


@dataclass(frozen=True)
class FinishedRun:
    """A complete run folder, as selection and reports read it: its configuration and its last-epoch result."""

    folder: Path
    config: RunConfig
    metrics: dict[str, Any]  # metrics.json: complete, with a "final" table

    @property
    def spec(self) -> RunSpec:
        return self.config.run

    @property
    def method(self) -> str:
        return self.config.run.method

    @property
    def queries(self) -> int:
        return self.config.run.queries

    @property
    def lr(self) -> float:
        return self.config.run.lr

    @property
    def wd(self) -> float:
        return self.config.run.wd

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def recipe(self) -> str:
        """ "own" or "shared"."""
        return self.config.run.recipe

    @property
    def diverged(self) -> bool:
        return bool(self.metrics.get("diverged"))

    @property
    def eval_top1(self) -> float | None:
        """Top-1 on the eval split after the last epoch; None if the run diverged or trained without one."""
        top1 = self.metrics["final"].get("top1")
        finite = isinstance(top1, float | int) and not isinstance(top1, bool) and math.isfinite(top1)
        return None if self.diverged or not finite else float(top1)


def read_timing(path: str | Path) -> dict[str, Any]:
    """A finished run's timing.json: train_seconds, train_images, in_memory, epoch_seconds, runs_in_pass."""
    return read_json(Path(path) / "timing.json")


def finished_runs(folders: list[Path]) -> list[FinishedRun]:
    """The complete runs among `folders`; damaged files are one sentence naming them."""
    runs = []
    for folder in folders:
        if not (folder / "metrics.json").exists():
            continue  # not trained yet, or interrupted
        config = read_config(folder)
        metrics = read_json(folder / "metrics.json")
        if metrics.get("complete") is True and isinstance(metrics.get("final"), dict):
            runs.append(FinishedRun(folder, config, metrics))
    return runs


def run_folders(parent: Path) -> list[Path]:
    """Run folders below `parent` (directly, or one level down for one-at-a-time sweeps), in name order."""
    return sorted(c.parent for c in parent.glob("**/config.json"))


COMPRESSED = "compressed"  # <run>/compressed/: what `vqt-cache compress` adds (model.safetensors, metrics.json)


def compressed_folder(path: str | Path) -> Path:
    return Path(path) / COMPRESSED


def compression_record(path: str | Path) -> Path:
    """Where a run's compression report lives; it is written last, so its presence marks the compression done."""
    return compressed_folder(path) / "metrics.json"


def is_compressed(path: str | Path) -> bool:
    return compression_record(path).exists()


def compressed_run(path: str | Path) -> Path | None:
    """The run folder whose compression `path` is (a `<run>/compressed` folder, compress done), else None."""
    path = Path(path)
    return path.parent if path.name == COMPRESSED and is_compressed(path.parent) else None
