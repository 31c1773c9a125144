"""`vqt-cache export RUN`: one standalone file that classifies images with no store and no run folder.

The file is a safetensors file: the frozen backbone's weights (`backbone.<name>`), the run's queries and head
(`queries`, `head.weight`, `head.bias`, as in model.safetensors; a compressed run's `<run>/compressed` adds
`feature_index`, the features its head reads), and in its metadata (JSON under "vqt_cache") the backbone's
description with its fingerprint, the preprocessing, the class names and the run's model table. A checksum (under
"checksum") covers that metadata and every tensor but the backbone's, which its fingerprint covers. Loading it
checks both and rebuilds the backbone from those weights, as a store does; `predict` takes such a file (whatever
its name) wherever it takes a run folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqt_cache.backbones import Backbone, backbone_from_weights
from vqt_cache.errors import VQTError, first_line, recorded
from vqt_cache.evaluation import compressed_head, compressed_linear, load_run
from vqt_cache.files import DamagedFile, load_tensors, write_bytes
from vqt_cache.model import CachedVQT, RunParameters
from vqt_cache.run_folder import COMPRESSED, ModelRecord, compressed_run, model_shapes
from vqt_cache.store import forward_precision

FORMAT = "vqt-cache-export"
VERSION = 2  # 2: a checksum over the metadata and the run's tensors; compressed heads
SUFFIX = ".safetensors"


@dataclass(frozen=True, kw_only=True)
class Exported:
    """What the live path needs, from an export file."""

    backbone: Backbone
    model: CachedVQT  # the run's queries and head over the backbone's blocks
    preprocessing: dict[str, Any]
    class_names: list[str]
    precision: str  # the frozen forward's arithmetic, the store's (float32 or bf16)
    kept: torch.Tensor | None = None  # a compressed run's kept feature indices (its head reads only those)
    head: torch.nn.Linear | None = None  # a compressed run's head; None: the run's own (model.runs[0].head)


def is_export(path: str | Path) -> bool:
    """A file where a run folder is expected is taken for an export (loading it says if it is not one)."""
    return Path(path).is_file()


def _checksum(meta_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """blake2b-256 of the metadata and every tensor but the backbone's (name, dtype, shape, bytes, in name order)."""
    hashed = hashlib.blake2b(meta_json.encode(), digest_size=32)
    for name in sorted(k for k in tensors if not k.startswith("backbone.")):
        t = tensors[name].detach().cpu().contiguous()
        hashed.update(f"\0{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        hashed.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, not copied
    return hashed.hexdigest()


def export_run(run_dir: str | Path, out: str | Path | None = None, store_url: str | None = None) -> Path:
    """Write the run's export file and return its path. By default it goes inside the run folder, named after the
    run (`<run>/<run>.safetensors`, or `<run>/<run>.compressed.safetensors` for `<run>/compressed`, the compressed
    head): beside the run folders it would be an entry of the runs' parent that is not a run, which a later `train`
    into that parent refuses. An existing file is replaced only if it is an export itself."""
    parent = compressed_run(run_dir)
    compressed = parent is not None
    folder = parent or Path(run_dir)
    loaded = load_run(folder, store_url)
    default = folder / (folder.resolve().name + (f".{COMPRESSED}" if compressed else "") + SUFFIX)
    path = Path(out) if out is not None else Path(default)
    if path.is_dir() or path.exists() and not _is_ours(path):
        raise VQTError(f"{path} exists and is not a vqt-cache export; it is left untouched: choose another --out")
    attrs = loaded.store.attrs
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": attrs["backbone"],
        "layout": attrs["layout"],
        "preprocessing": attrs["preprocessing"],
        **({"precision": attrs["precision"]} if "precision" in attrs else {}),  # as in the store: absent is float32
        "class_names": attrs["dataset"]["class_names"],
        **{k: v for k, v in loaded.config.to_json().items() if k in ("model", "run", "recipe")},
        # model: the tensors' shapes; run: method, size, lr, wd, seed, recipe (own or shared); recipe: epochs,
        # batch, ..., and the optimization the run followed
        "compressed": compressed,
    }
    tensors = {f"backbone.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in loaded.store.weights().items()}
    tensors |= {k: v.detach().contiguous() for k, v in loaded.model.runs[0].tensors().items()}
    if compressed:
        kept, head = compressed_head(folder)
        tensors |= {"head.weight": head.weight.detach(), "head.bias": head.bias.detach(), "feature_index": kept}
    from safetensors.torch import save

    meta_json = json.dumps(meta)
    checksum = _checksum(meta_json, tensors)
    write_bytes(path, save(tensors, metadata={"vqt_cache": meta_json, "checksum": checksum}))
    return path


def _header(path: Path) -> tuple[dict[str, str], dict[str, Any], str]:
    """(the file's safetensors metadata, the export's metadata as parsed and as written), of any export version."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta_json = raw.get("vqt_cache", "null")
        meta = json.loads(meta_json)
    except Exception as exc:  # not safetensors, truncated, no JSON
        raise VQTError(
            f"{path} is neither a run folder nor a readable vqt-cache export ({first_line(exc)}); pass a run folder "
            "or the file `vqt-cache export` wrote (export it again if it was cut short)"
        ) from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise VQTError(f"{path} is a safetensors file but not a vqt-cache export (it has no vqt_cache metadata)")
    return raw, meta, meta_json


def _metadata(path: Path) -> tuple[dict[str, Any], str, str]:
    """(the export's metadata, as parsed and as written, its checksum), of an export this vqt-cache reads."""
    raw, meta, meta_json = _header(path)
    version = recorded(meta, "version", int, str(path), "export the run again")
    if version != VERSION:
        raise VQTError(
            f"{path} is an export of version {version}; this vqt-cache reads version {VERSION} only (version 1 "
            "carried no checksum): export the run again"
        )
    checksum = recorded(raw, "checksum", str, str(path), "export the run again")
    return meta, meta_json, checksum


def _is_ours(path: Path) -> bool:
    """An export (of any version), so export may replace it."""
    try:
        _header(path)
    except VQTError:
        return False
    return True


def load_exported(path: str | Path) -> Exported:
    """An export file -> the frozen backbone (fingerprint checked), the run's model, preprocessing, class names."""
    path = Path(path)
    meta, meta_json, checksum = _metadata(path)
    try:
        model = ModelRecord.from_json(meta.get("model"), path)
        run = RunParameters.from_record(model)
        shapes = model_shapes(model)
        compressed = meta.get("compressed") is True
        if compressed:  # the compressed head reads k of the run's features
            shapes |= {"feature_index": None, "head.weight": None, "head.bias": (shapes["head.bias"][0],)}
        tensors = load_tensors(path, {k: v for k, v in shapes.items() if v is not None}, finite=True)
        if _checksum(meta_json, tensors) != checksum:
            raise DamagedFile(path, "its metadata or the run's tensors differ from the checksum it was written with")
        weights = {k.removeprefix("backbone."): v.numpy() for k, v in tensors.items() if k.startswith("backbone.")}
        backbone = backbone_from_weights(meta["backbone"], weights)
        kept = head = None
        if compressed:
            kept, head = compressed_linear(path, tensors, model_shapes(model)["head.weight"][1])
        else:
            run.load_tensors(tensors)
        if len(meta["class_names"]) != shapes["head.bias"][0]:
            raise DamagedFile(path, f"it names {len(meta['class_names'])} classes for {shapes['head.bias'][0]}")
    except (KeyError, TypeError, ValueError) as exc:
        raise DamagedFile(path, f"missing or wrong entry {exc}") from exc
    if compressed:
        run.queries.prompts.data.copy_(tensors["queries"])
    model = CachedVQT(backbone.blocks, [run], meta["layout"]).eval()
    return Exported(
        backbone=backbone,
        model=model,
        preprocessing=meta["preprocessing"],
        class_names=meta["class_names"],
        precision=forward_precision(meta),
        kept=kept,
        head=head,
    )
