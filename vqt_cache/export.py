"""`vqt-cache export RUN`: one standalone file that classifies images with no store and no run folder.

The file is a safetensors file: the frozen backbone's weights (`backbone.<name>`), the run's queries and head
(`queries`, `head.weight`, `head.bias`, as in model.safetensors), and in its metadata (JSON under "vqt_cache") the
backbone's description with its fingerprint, the preprocessing, the class names and the run's model table. Loading
it rebuilds the backbone from those weights and checks them against the fingerprint, as a store does; `predict`
takes such a file wherever it takes a run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqt_cache.backbones import Backbone, backbone_from_weights
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import load_run
from vqt_cache.files import DamagedFile, load_tensors, write_bytes
from vqt_cache.model import CachedVQT, RunParameters
from vqt_cache.run_folder import model_shapes

FORMAT = "vqt-cache-export"
VERSION = 1
SUFFIX = ".safetensors"


@dataclass(frozen=True, kw_only=True)
class Exported:
    """What the live path needs, from an export file."""

    backbone: Backbone
    model: CachedVQT  # the run's queries and head over the backbone's blocks
    preprocessing: dict[str, Any]
    class_names: list[str]


def is_export(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == SUFFIX


def export_run(run_dir: str | Path, out: str | Path | None = None, store_url: str | None = None) -> Path:
    """Write the run's export file (default: <run folder>.safetensors beside it) and return its path. An existing
    file is replaced only if it is an export itself."""
    loaded = load_run(run_dir, store_url)
    path = Path(out) if out is not None else Path(str(Path(run_dir).resolve()) + SUFFIX)
    if path.exists() and not _is_ours(path):
        raise VQTError(f"{path} exists and is not a vqt-cache export; it is left untouched: choose another --out")
    attrs = loaded.store.attrs
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": attrs["backbone"],
        "layout": attrs["layout"],
        "preprocessing": attrs["preprocessing"],
        "class_names": attrs["dataset"]["class_names"],
        "model": loaded.config["model"],
        "run": loaded.config["run"],
    }
    tensors = {f"backbone.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in loaded.store.weights().items()}
    tensors |= {k: v.detach().contiguous() for k, v in loaded.model.runs[0].tensors().items()}
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata={"vqt_cache": json.dumps(meta)}))
    return path


def _metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("vqt_cache", "null"))
    except Exception as exc:  # not safetensors, truncated, no JSON
        raise DamagedFile(path, f"not a vqt-cache export ({str(exc).splitlines()[0]})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DamagedFile(path, "not a vqt-cache export (no vqt_cache metadata)")
    if meta.get("version") != VERSION:
        raise VQTError(f"{path} is an export of version {meta.get('version')}; this vqt-cache reads {VERSION}")
    return meta


def _is_ours(path: Path) -> bool:
    try:
        _metadata(path)
    except VQTError:
        return False
    return True


def load_exported(path: str | Path) -> Exported:
    """An export file -> the frozen backbone (fingerprint checked), the run's model, preprocessing, class names."""
    path = Path(path)
    meta = _metadata(path)
    try:
        run = RunParameters.from_table(meta["model"])
        tensors = load_tensors(path, model_shapes(meta["model"]))  # the run's tensors with their shapes checked
        weights = {k.removeprefix("backbone."): v.numpy() for k, v in tensors.items() if k.startswith("backbone.")}
        backbone = backbone_from_weights(meta["backbone"], weights)
        run.load_tensors(tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedFile(path, f"missing or wrong entry {exc}") from exc
    model = CachedVQT(backbone.blocks, [run], meta["layout"]).eval()
    return Exported(
        backbone=backbone, model=model, preprocessing=meta["preprocessing"], class_names=meta["class_names"]
    )
