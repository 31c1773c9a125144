"""Creating a store, and where stores go: `create_store`, `check_resumable`, `found_at` (what is at a path),
`default_store_path` and `absolute_url`.

One Zarr chunk of kv/hidden = one image, all layers. Logical shards (fixed groups of `shard_size` rows of the
image table, cut at block ends) are the unit of writing: one writer per shard, and its completion flag is written
last, so a store never reads as complete when it is not. final/valid are chunked by shard, so writers never share
a chunk. A split's rows and labels are covered by `rows_hash`, written with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from vqt_cache.errors import VQTError
from vqt_cache.files import describe_names
from vqt_cache.formats import CODECS, DTYPES, LAYOUTS
from vqt_cache.store.schema import (
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    array_shapes,
    check_format,
    check_same,
    metadata_hash,
    probe_shapes,
)
from vqt_cache.store.tables import Store, open_group, open_store


def _compressors(codec: str) -> Any:
    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=3)]
    if codec == "blosc":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    raise VQTError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")


def _create_images(group: zarr.Group, attrs: dict[str, Any], shard_size: int) -> None:
    """An empty image table (its arrays grow as splits add images)."""
    if "images" in group.group_keys():
        del group["images"]
    images = group.create_group("images")
    shape, scales = array_shapes(0, attrs["backbone"], attrs["layout"], attrs["dtype"])
    compressors = _compressors(attrs["codec"])
    images.create_array(
        attrs["layout"],
        shape=shape,
        chunks=(1, *shape[1:]),
        dtype=attrs["dtype"],
        compressors=compressors,
        fill_value=0,
    )
    if scales is not None:
        images.create_array(
            "scale", shape=scales, chunks=(1, *scales[1:]), dtype="float16", compressors=compressors, fill_value=0
        )
    D = attrs["backbone"]["dim"]
    images.create_array("final", shape=(0, D), chunks=(shard_size, D), dtype="float32", compressors=None, fill_value=0)
    if attrs.get("probes"):
        for name, (shape, dtype) in probe_shapes(0, attrs["backbone"], attrs["dtype"]).items():
            chunks = (shard_size, *shape[1:])
            images.create_array(name, shape=shape, chunks=chunks, dtype=dtype, compressors=compressors, fill_value=0)
    images.create_array("valid", shape=(0,), chunks=(shard_size,), dtype="uint8", compressors=None, fill_value=0)
    images.create_array("shard_done", shape=(0,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0)
    images.create_array("checksum", shape=(0, 32), chunks=(1, 32), dtype="uint8", compressors=None, fill_value=0)
    images.attrs.put({"shard_size": shard_size, "block_stops": [], "keys": []})
    if "splits" in group.group_keys():
        del group["splits"]
    group.create_group("splits")


def create_store(
    url: str,
    attrs: dict[str, Any],
    weights: dict[str, np.ndarray],
    storage_options: dict | None = None,
    shard_size: int = 64,
) -> Store:
    """Create a store where nothing is (or an empty folder), resume this tool's own store made with the same
    backbone, dataset and settings, or refuse in one sentence: nothing found at `url` is ever overwritten.

    shard_size: images per shard of a new store's image table (an existing store keeps its own)."""
    found, existing = _resumable(url, attrs, storage_options)
    if existing is not None:
        return open_store(url, mode="r+", storage_options=storage_options)
    if attrs["layout"] not in LAYOUTS:
        raise VQTError(f"unknown layout {attrs['layout']!r}: use one of {', '.join(LAYOUTS)}")
    if attrs["dtype"] not in DTYPES:
        raise VQTError(f"unknown dtype {attrs['dtype']!r}: use one of {', '.join(DTYPES)}")
    _compressors(attrs["codec"])
    marked = {"format": FORMAT, "format_version": FORMAT_VERSION, **attrs, "metadata_hash": metadata_hash(attrs)}
    if found == "creating":  # our own interrupted creation, of the same identity: redo the weights
        group = open_group(url, "r+", storage_options)
        if "weights" in group.group_keys():
            del group["weights"]
    else:
        try:
            group = zarr.create_group(
                store=url, zarr_format=3, attributes={**marked, "creating": True}, storage_options=storage_options
            )
        except zarr.errors.ContainsGroupError as exc:  # another process created it just now (no lock on S3)
            raise VQTError(f"{url} was created by another process meanwhile; re-run to resume it") from exc
    weights_group = group.create_group("weights")
    for name, array in weights.items():
        weights_group.create_array(name, shape=array.shape, dtype=array.dtype, compressors=None)[...] = array
    _create_images(group, attrs, shard_size)
    group.attrs.put(marked)  # one atomic write of the root metadata: the store now exists
    return Store(group, url)


def check_resumable(url: str, attrs: dict[str, Any], storage_options: dict | None = None) -> Store | None:
    """Refuse, writing nothing, what `create_store` would refuse: a path that holds anything but this tool's store
    (or its interrupted creation) of the same backbone, dataset and settings. Returns the existing store (read-only)
    or None where a new one would be created."""
    return _resumable(url, attrs, storage_options)[1]


def _resumable(url: str, attrs: dict[str, Any], storage_options: dict | None) -> tuple[str, Store | None]:
    """What is at `url` (`found_at`) and, where it is a store, that store opened read-only; refuses one of another
    identity (an interrupted creation too)."""
    found = found_at(url, storage_options)
    if found == "creating":
        check_same(dict(open_group(url, "r", storage_options).attrs), attrs, url)
    store = open_store(url, storage_options=storage_options) if found == "store" else None
    if store is not None:
        check_same(store.attrs, attrs, url)
    return found, store


def found_at(url: str, storage_options: dict | None = None) -> str:
    """What is at `url`: "new" (nothing, or an empty folder), "store", "creating" (an interrupted creation of
    ours), or a VQTError saying what else is there."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/")
    if fs.isfile(path):
        raise VQTError(f"{url} is a file, not a store; choose another --out")
    if not fs.exists(f"{path}/zarr.json"):
        entries = fs.ls(path, detail=False) if fs.isdir(path) else []
        if not entries:
            return "new"
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        raise VQTError(
            f"{url} is a folder holding {describe_names(names)}, not a vqt-cache store; extract writes a new "
            "store only into a new or empty folder: choose another --out"
        )
    try:
        meta = json.loads(fs.cat_file(f"{path}/zarr.json"))
        attrs = meta.get("attributes", {}) if isinstance(meta, dict) else None
        if not isinstance(attrs, dict):
            raise ValueError("not a Zarr group's metadata")
    except (ValueError, UnicodeDecodeError) as exc:
        raise VQTError(
            f"{url}/zarr.json is damaged ({exc}), so {url} cannot be shown to be a vqt-cache store and is left "
            "untouched; restore that file, or move the folder away, then re-run"
        ) from exc
    if attrs.get("format") != FORMAT:
        raise VQTError(
            f"{url} is a Zarr store that vqt-cache did not write; it is left untouched: choose another --out"
        )
    if attrs.get("format_version") not in READABLE_VERSIONS:
        check_format(attrs, url)  # the version sentence
    return "creating" if attrs.get("creating") else "store"


def absolute_url(url: str) -> str:
    """A store's URL as run folders record it: a local path made absolute; a URL with a scheme as it is."""
    return url if "://" in url else str(Path(url).resolve())


FOLDER_DATASETS = ("imagefolder", "classfolder", "hf")  # kinds whose default store path adds their folder's name


def default_store_path(
    cache_root: str | Path,
    dataset: str,
    backbone: str,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    root: str | Path | None = None,
) -> str:
    """Where a store goes when no --out is given: <cache_root>/<dataset>/<backbone>.zarr, with what makes two
    stores of one dataset and backbone differ in the names: the weights when they are not the pretrained ones
    (`-random`, or the weights file's name), the model arguments (`-img_size=384`), and the folder of an image
    folder dataset (`imagefolder-<its name>`)."""
    folder = f"{dataset}-{Path(root).resolve().name}" if dataset in FOLDER_DATASETS and root else dataset
    name = backbone
    if weights:
        name += "-random" if weights == "random" else f"-{Path(weights).stem}"
    name += "".join(f"-{key}={value}" for key, value in sorted((model_kwargs or {}).items()))
    return str(Path(cache_root) / folder / f"{name}.zarr")
