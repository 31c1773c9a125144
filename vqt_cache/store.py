"""The feature store: a self-describing Zarr v3 group (design.md §5). No timm, no image code.

    <store>/            attrs: format, format_version, backbone, preprocessing, dataset, layout, dtype, codec,
                        versions
      weights/<name>    every tensor of the frozen backbone's state dict, exact (stage two needs only the store)
      <split>/          attrs: num_samples, shard_size, num_shards, index_hash, sources
        kv      (n, L, 2, H, N, dh)  keys (after k_norm) and values, head-major   [layout "kv"]
        hidden  (n, L, N, D)         X̂_l = LN1(Z_{l-1})                           [layout "hidden"]
        scale   (n, ..., C / g)      float16 scale per token and group of g channels   [dtype "int8" only]
        final   (n, D)               the backbone's final feature f_0
        labels  (n,)                 int64
        valid   (n,)                 0 where a bad image was skipped
        checksum (num_shards, 32)    blake2b-256 of the shard's feature rows (in order), final features, labels
                                     and valid flags: everything stage two reads of the shard
        shard_done (num_shards,)     1 once every image of the shard is written (one chunk per shard)

One Zarr chunk of kv/hidden = one image, all layers. Logical shards (fixed groups of `shard_size` images) are the
unit of writing: one writer per shard, and its completion flag is written last, so a store never reads as
complete when it is not. final/labels/valid are chunked by shard, so writers never share a chunk.

Creation writes the root attributes first with `creating: true`, then the weights, then the attributes without
it: an interrupted creation is provably this tool's and is redone, while a path holding anything else (files, a
foreign or damaged Zarr store) is refused, never overwritten. On open, the attributes and every array's shape,
dtype and chunking are checked against each other before any data is trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from vqt_cache.errors import VQTError
from vqt_cache.files import describe_names
from vqt_cache.quantize import bytes_per_value, dequantize, group_for

FORMAT = "vqt-cache"
FORMAT_VERSION = 2  # 2: labels and valid flags inside the shard checksums; creation marker
LAYOUTS = ("kv", "hidden")
DTYPES = ("float16", "float32", "int8")  # int8: quantized with a float16 scale per token and channel group
CODECS = ("none", "zstd", "blosc")
# attrs that must agree between a store and a run that writes into it
IDENTITY_KEYS = ("layout", "dtype", "codec", "preprocessing")


def row_checksum() -> Any:
    """The hash of the per-shard checksums (blake2b-256: strong, and twice as fast as sha256 here)."""
    return hashlib.blake2b(digest_size=32)


def hash_rows(digest: Any, values: np.ndarray, scales: np.ndarray | None = None) -> None:
    """Feed rows to a shard's row digest in row order: each row's values, then (int8 stores) its scales."""
    if scales is None:
        digest.update(np.ascontiguousarray(values))
        return
    for row_values, row_scales in zip(values, scales, strict=True):
        digest.update(np.ascontiguousarray(row_values))
        digest.update(np.ascontiguousarray(row_scales))


def shard_checksum(rows_digest: bytes, final: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> bytes:
    """A shard's checksum: its rows' digest, then its final features, labels and valid flags, in row order."""
    digest = row_checksum()
    digest.update(rows_digest)
    digest.update(np.ascontiguousarray(final, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(valid, dtype=np.uint8).tobytes())
    return digest.digest()


# what the root attributes must hold (and of which type) for a store to be opened at all
ATTR_TYPES = {
    "backbone": dict,
    "preprocessing": dict,
    "dataset": dict,
    "layout": str,
    "dtype": str,
    "codec": str,
    "versions": dict,
}
BACKBONE_KEYS = {"name": str, "timm_name": str, "kwargs": dict, "fingerprint": str, "depth": int, "dim": int}
BACKBONE_KEYS |= {"heads": int, "tokens": int}
DATASET_KEYS = {"name": str, "num_classes": int, "class_names": list}
SPLIT_ATTR_TYPES = {"num_samples": int, "shard_size": int, "num_shards": int, "index_hash": str, "sources": list}


def _compressors(codec: str) -> Any:
    if codec == "none":
        return None
    if codec == "zstd":
        return [ZstdCodec(level=3)]
    if codec == "blosc":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    raise VQTError(f"unknown codec {codec!r}: use one of {', '.join(CODECS)}")


def _open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    try:
        return zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options)
    except FileNotFoundError as exc:
        raise VQTError(f"no store at {url}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise VQTError(f"{url} is not a readable Zarr v3 store: {exc}") from exc


def _check_format(attrs: dict, url: str) -> None:
    if attrs.get("format") != FORMAT:
        raise VQTError(f"{url} is not a vqt-cache store (no format attribute {FORMAT!r})")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise VQTError(
            f"store {url} has format_version {version}, this vqt-cache reads {FORMAT_VERSION}"
            + ("; upgrade vqt-cache" if newer else "; re-extract it into a new folder")
        )
    if attrs.get("creating"):
        raise VQTError(f"the creation of store {url} was interrupted; re-run the extract command that made it")
    _check_attrs(attrs, url)
    if attrs["layout"] not in LAYOUTS or attrs["dtype"] not in DTYPES:
        raise VQTError(f"store {url} has an unknown layout or dtype ({attrs['layout']!r}, {attrs['dtype']!r})")


def _check_attrs(attrs: dict, url: str) -> None:
    """The root attributes stage one and two rely on are there, with their types."""
    _check_types(attrs, ATTR_TYPES, f"store {url}")
    _check_types(attrs["backbone"], BACKBONE_KEYS, f"store {url}: backbone")
    _check_types(attrs["dataset"], DATASET_KEYS, f"store {url}: dataset")


def _check_types(attrs: dict, types: dict[str, type], where: str) -> None:
    for key, kind in types.items():
        if not isinstance(attrs.get(key), kind) or kind is int and isinstance(attrs.get(key), bool):
            found = "missing" if key not in attrs else f"a {type(attrs[key]).__name__}"
            raise VQTError(f"{where} is damaged: attribute {key!r} is {found}, not a {kind.__name__}; re-extract it")


def array_shapes(n: int, backbone: dict, layout: str, dtype: str) -> tuple[tuple, tuple | None]:
    """The shapes of a split's feature array and (int8 stores) its scale array, for n images."""
    L, D, H, N = backbone["depth"], backbone["dim"], backbone["heads"], backbone["tokens"]
    shape = (n, L, 2, H, N, D // H) if layout == "kv" else (n, L, N, D)
    scales = (*shape[:-1], shape[-1] // group_for(shape[-1])) if dtype == "int8" else None
    return shape, scales


def _check_array(group: zarr.Group, name: str, shape: tuple, dtype: str, chunks: tuple, where: str) -> None:
    if name not in group.array_keys():
        raise VQTError(f"{where} is damaged: array {name!r} is missing; re-extract it")
    array = group[name]
    found = (tuple(array.shape), str(array.dtype), tuple(array.chunks))
    if found != (tuple(shape), dtype, tuple(chunks)):
        raise VQTError(
            f"{where} is damaged: array {name!r} has shape {found[0]}, dtype {found[1]}, chunks {found[2]}, "
            f"but the store's attributes call for {tuple(shape)}, {dtype}, {tuple(chunks)}; re-extract it"
        )


@dataclass
class Split:
    """One split of a store: the arrays and the shard bookkeeping."""

    group: zarr.Group
    layout: str
    dtype: str

    @property
    def quantized(self) -> bool:
        return self.dtype == "int8"

    @property
    def name(self) -> str:
        return self.group.basename

    @property
    def num_samples(self) -> int:
        return self.group.attrs["num_samples"]

    @property
    def shard_size(self) -> int:
        return self.group.attrs["shard_size"]

    @property
    def num_shards(self) -> int:
        return self.group.attrs["num_shards"]

    @property
    def sources(self) -> list[str]:
        return self.group.attrs["sources"]

    @property
    def features(self) -> zarr.Array:
        """kv (n, L, 2, H, N, dh) or hidden (n, L, N, D), in the store's dtype (int8: see `scales`)."""
        return self.group[self.layout]

    @property
    def scales(self) -> zarr.Array | None:
        """int8 stores: (n, ..., C / g) float16, one per token and group of g channels; else None."""
        return self.group["scale"] if self.quantized else None

    @property
    def group_size(self) -> int:
        return group_for(self.features.shape[-1])

    def row(self, row: int) -> np.ndarray:
        """One image's features as stored (float16/float32), or dequantized to float32 (int8)."""
        values = self.features[row]
        if not self.quantized:
            return values
        return dequantize(torch.from_numpy(values), torch.from_numpy(self.scales[row]), self.group_size).numpy()

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def done(self) -> np.ndarray:
        try:
            return self.group["shard_done"][:].astype(bool)
        except Exception as exc:  # a truncated chunk fails to decode in many ways
            raise VQTError(
                f"split {self.name!r}: its completion record (shard_done) cannot be read; run `vqt-cache verify`"
            ) from exc

    def incomplete_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def write_images(self, start: int, features: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write features (and, int8, their scales) of images start.. (one chunk per image)."""
        self.features[start : start + len(features)] = features
        if scales is not None:
            self.scales[start : start + len(scales)] = scales

    def finish_shard(self, shard: int, final: np.ndarray, valid: np.ndarray, rows_digest: bytes) -> None:
        """Write the shard's final features, valid flags and checksum, then (last) its completion flag.

        rows_digest: the `row_checksum()` digest of the shard's feature rows as written, in row order.
        """
        start, stop = self.shard_range(shard)
        self.group["final"][start:stop] = final
        self.group["valid"][start:stop] = valid
        labels = self.group["labels"][start:stop]
        self.group["checksum"][shard] = np.frombuffer(shard_checksum(rows_digest, final, labels, valid), np.uint8)
        self.group["shard_done"][shard] = 1

    def where(self, shard: int) -> str:
        start, stop = self.shard_range(shard)
        return f"split {self.name!r} shard {shard} (rows {start}..{stop - 1})"

    def shard_faults(self, shard: int, rows: np.ndarray | None = None, scales: np.ndarray | None = None) -> list[str]:
        """Faults of a complete shard: unreadable chunks, NaN/Inf, or data that differs from its checksum.

        rows (and scales): the shard's feature rows when the caller holds them already (else they are read, one at
        a time).
        """
        start, stop = self.shard_range(shard)
        where = self.where(shard)
        digest = row_checksum()
        try:
            for row in range(start, stop):
                features = self.features[row] if rows is None else rows[row - start]
                row_scales = None
                if self.quantized:
                    row_scales = self.scales[row] if scales is None else scales[row - start]
                if not np.isfinite(row_scales if self.quantized else features).all():
                    return [f"{where}: row {row} holds NaN or Inf"]
                hash_rows(digest, features[None], None if row_scales is None else row_scales[None])
            final, labels, valid = (self.group[k][start:stop] for k in ("final", "labels", "valid"))
        except Exception as exc:  # a truncated or corrupt chunk fails to decode in many ways
            return [f"{where}: a chunk cannot be read ({type(exc).__name__}: {exc})"]
        if shard_checksum(digest.digest(), final, labels, valid) != self.group["checksum"][shard].tobytes():
            return [f"{where}: data differs from the checksum recorded when it was written (missing or altered chunks)"]
        return []

    def check_shards(self, features: np.ndarray | None = None, scales: np.ndarray | None = None) -> None:
        """Every shard against its checksum (from `features` and `scales`, whole arrays, when already in memory)."""
        for shard in range(self.num_shards):
            start, stop = self.shard_range(shard)
            rows = None if features is None else features[start:stop]
            row_scales = None if scales is None else scales[start:stop]
            faults = self.shard_faults(shard, rows, row_scales)
            if faults:
                raise VQTError(f"{faults[0]}; run `vqt-cache verify` on the store, then re-extract it")

    def check_metadata(self, backbone: dict, dtype: str) -> None:
        """The split's attributes and arrays agree with each other and with the store's (cheap: no data read)."""
        where = f"split {self.name!r}"
        _check_types(dict(self.group.attrs), SPLIT_ATTR_TYPES, where)
        n, shard_size, num_shards = self.num_samples, self.shard_size, self.num_shards
        if n < 1 or shard_size < 1 or num_shards != math.ceil(n / shard_size) or len(self.sources) != n:
            raise VQTError(f"{where} is damaged: its sample, shard and source counts disagree; re-extract it")
        shape, scales = array_shapes(n, backbone, self.layout, dtype)
        _check_array(self.group, self.layout, shape, dtype, (1, *shape[1:]), where)
        if scales is not None:
            _check_array(self.group, "scale", scales, "float16", (1, *scales[1:]), where)
        D = backbone["dim"]
        _check_array(self.group, "final", (n, D), "float32", (shard_size, D), where)
        _check_array(self.group, "labels", (n,), "int64", (shard_size,), where)
        _check_array(self.group, "valid", (n,), "uint8", (shard_size,), where)
        _check_array(self.group, "shard_done", (num_shards,), "uint8", (1,), where)
        _check_array(self.group, "checksum", (num_shards, 32), "uint8", (1, 32), where)

    def labels(self) -> np.ndarray:
        return self.group["labels"][:]

    def valid(self) -> np.ndarray:
        return self.group["valid"][:].astype(bool)

    def nbytes_stored(self) -> int:
        return sum(self.group[name].nbytes_stored() for name in self.group.array_keys())


class Store:
    """An opened feature store."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group, self.url = group, url

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def layout(self) -> str:
        return self.group.attrs["layout"]

    def split_names(self) -> list[str]:
        return sorted(k for k in self.group.group_keys() if k != "weights")

    def split(self, name: str, require_complete: bool = True) -> Split:
        if name not in self.split_names():
            have = ", ".join(self.split_names()) or "none"
            raise VQTError(f"store {self.url} has no split {name!r} (it has: {have})")
        split = Split(self.group[name], self.layout, self.attrs["dtype"])
        if "index_hash" not in split.group.attrs:
            raise VQTError(f"the creation of split {name!r} of {self.url} was interrupted; re-run extract to finish it")
        try:
            split.check_metadata(self.attrs["backbone"], self.attrs["dtype"])
        except VQTError as exc:
            raise VQTError(f"store {self.url}: {exc}") from exc
        if require_complete and not split.complete:
            missing = len(split.incomplete_shards())
            raise VQTError(
                f"split {name!r} of {self.url} is incomplete ({missing} of {split.num_shards} shards missing); "
                "re-run the same extract command to finish it"
            )
        return split

    def weights(self) -> dict[str, np.ndarray]:
        """The frozen backbone's tensors (trusted once `backbone_from_weights` has checked their fingerprint)."""
        if "weights" not in self.group.group_keys():
            raise VQTError(f"store {self.url} is damaged: it has no weights group; re-extract it")
        weights = self.group["weights"]
        out = {}
        for name in weights.array_keys():
            try:
                out[name] = weights[name][...]
            except Exception as exc:  # a truncated chunk fails to decode in many ways
                raise VQTError(
                    f"store {self.url} is damaged: the stored weight {name!r} cannot be read ({type(exc).__name__}); "
                    "re-extract it"
                ) from exc
        return out

    def create_split(self, name: str, sources: list[str], labels: list[int], shard_size: int, index_hash: str) -> Split:
        """Create a split's arrays and metadata (labels, sources); data shards are written later."""
        n = len(sources)
        num_shards = math.ceil(n / shard_size)
        a = self.attrs
        D = a["backbone"]["dim"]
        shape, scales = array_shapes(n, a["backbone"], self.layout, a["dtype"])
        group = self.group.create_group(name)
        compressors = _compressors(a["codec"])
        group.create_array(
            self.layout, shape=shape, chunks=(1, *shape[1:]), dtype=a["dtype"], compressors=compressors, fill_value=0
        )
        if scales is not None:
            group.create_array(
                "scale", shape=scales, chunks=(1, *scales[1:]), dtype="float16", compressors=compressors, fill_value=0
            )
        group.create_array(
            "final", shape=(n, D), chunks=(shard_size, D), dtype="float32", compressors=None, fill_value=0
        )
        group.create_array("labels", shape=(n,), chunks=(shard_size,), dtype="int64", compressors=None)
        group.create_array("valid", shape=(n,), chunks=(shard_size,), dtype="uint8", compressors=None, fill_value=0)
        group.create_array(
            "shard_done", shape=(num_shards,), chunks=(1,), dtype="uint8", compressors=None, fill_value=0
        )
        group.create_array(
            "checksum", shape=(num_shards, 32), chunks=(1, 32), dtype="uint8", compressors=None, fill_value=0
        )
        group["labels"][:] = np.asarray(labels, dtype=np.int64)
        # attrs last: a split group without them is a creation that was interrupted and is redone
        group.attrs.update(
            {
                "num_samples": n,
                "shard_size": shard_size,
                "num_shards": num_shards,
                "index_hash": index_hash,
                "sources": sources,
            }
        )
        return Split(group, self.layout, a["dtype"])

    def bytes_per_image(self) -> int:
        """Bytes of one image's layers, uncompressed (int8: with its scales)."""
        shape, _ = array_shapes(1, self.attrs["backbone"], self.layout, self.attrs["dtype"])
        return round(math.prod(shape) * bytes_per_value(self.attrs["dtype"], group_for(shape[-1])))

    def describe(self) -> dict[str, Any]:
        """Everything `vqt-cache info` shows, JSON-ready."""
        splits = []
        for name in self.split_names():
            split = Split(self.group[name], self.layout, self.attrs["dtype"])
            if "index_hash" not in split.group.attrs:
                continue
            try:
                split.check_metadata(self.attrs["backbone"], self.attrs["dtype"])
                done = split.done()
                valid = split.group["valid"][:].astype(bool)
            except Exception:  # `info` shows what it can; `verify` says what is wrong
                splits.append({"name": name, "damaged": True})
                continue
            finished = np.flatnonzero(done)
            skipped = [split.sources[i] for s in finished for i in range(*split.shard_range(s)) if not valid[i]]
            splits.append(
                {
                    "name": name,
                    "images": split.num_samples,
                    "shards": split.num_shards,
                    "shards_done": int(done.sum()),
                    "complete": bool(done.all()),
                    "skipped": skipped,
                    "bytes": split.nbytes_stored(),
                }
            )
        keys = ("format_version", "backbone", "preprocessing", "dataset", "layout", "dtype", "codec", "versions")
        return {
            "url": self.url,
            **{k: self.attrs[k] for k in keys},
            "bytes_per_image": self.bytes_per_image(),
            "splits": splits,
        }

    def has_split(self, name: str) -> bool:
        return name in self.split_names() and "index_hash" in self.group[name].attrs

    def remove_split(self, name: str) -> None:
        del self.group[name]


def create_store(
    url: str, attrs: dict[str, Any], weights: dict[str, np.ndarray], storage_options: dict | None = None
) -> Store:
    """Create a store where nothing is (or an empty folder), resume this tool's own store made with the same
    backbone, dataset and settings, or refuse in one sentence: nothing found at `url` is ever overwritten."""
    found = found_at(url, storage_options)
    if found == "store":
        store = open_store(url, mode="r+", storage_options=storage_options)
        _check_same(store.attrs, attrs, url)
        return store
    if attrs["layout"] not in LAYOUTS:
        raise VQTError(f"unknown layout {attrs['layout']!r}: use one of {', '.join(LAYOUTS)}")
    if attrs["dtype"] not in DTYPES:
        raise VQTError(f"unknown dtype {attrs['dtype']!r}: use one of {', '.join(DTYPES)}")
    _compressors(attrs["codec"])
    marked = {"format": FORMAT, "format_version": FORMAT_VERSION, **attrs}
    if found == "creating":  # our own interrupted creation: same identity, then redo the weights
        group = _open_group(url, "r+", storage_options)
        _check_same(dict(group.attrs), attrs, url)
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
    group.attrs.put(marked)  # one atomic write of the root metadata: the store now exists
    return Store(group, url)


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
    if attrs.get("format_version") != FORMAT_VERSION:
        _check_format(attrs, url)  # the version sentence
    return "creating" if attrs.get("creating") else "store"


def _check_same(have: dict, want: dict, url: str) -> None:
    _check_attrs(have, url)
    for key in ("fingerprint", "timm_name", "kwargs"):
        if have["backbone"][key] != want["backbone"][key]:
            raise VQTError(
                f"store {url} was written with a different backbone ({key} differs: {have['backbone'][key]!r}); "
                "use another --out or delete the store"
            )
    if have["dataset"]["name"] != want["dataset"]["name"]:
        raise VQTError(f"store {url} holds dataset {have['dataset']['name']!r}, not {want['dataset']['name']!r}")
    for key in IDENTITY_KEYS:
        if have[key] != want[key]:
            raise VQTError(
                f"store {url} was written with {key} {have[key]!r}, this run asks for {want[key]!r}; "
                "use another --out or delete the store"
            )


def open_store(url: str, mode: str = "r", storage_options: dict | None = None) -> Store:
    """Open an existing store read-only (or "r+"), checking its format and version."""
    group = _open_group(url, mode, storage_options)
    _check_format(dict(group.attrs), url)
    return Store(group, url)
