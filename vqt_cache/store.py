"""The feature store: a self-describing Zarr v3 group (design.md §5). No timm, no image code.

    <store>/            attrs: format, format_version, backbone, preprocessing, dataset, layout, dtype, codec,
                        versions
      weights/<name>    every tensor of the frozen backbone's state dict, exact (stage two needs only the store)
      <split>/          attrs: num_samples, shard_size, num_shards, index_hash, sources
        kv      (n, L, 2, H, N, dh)  keys (after k_norm) and values, head-major   [layout "kv"]
        hidden  (n, L, N, D)         X̂_l = LN1(Z_{l-1})                           [layout "hidden"]
        final   (n, D)               the backbone's final feature f_0
        labels  (n,)                 int64
        valid   (n,)                 0 where a bad image was skipped
        checksum (num_shards, 32)    blake2b-256 of the shard's feature rows (in order) and final features
        shard_done (num_shards,)     1 once every image of the shard is written (one chunk per shard)

One Zarr chunk of kv/hidden = one image, all layers. Logical shards (fixed groups of `shard_size` images) are the
unit of writing: one writer per shard, and its completion flag is written last, so a store never reads as
complete when it is not. final/labels/valid are chunked by shard, so writers never share a chunk.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from vqt_cache.errors import VQTError

FORMAT = "vqt-cache"
FORMAT_VERSION = 1
LAYOUTS = ("kv", "hidden")
DTYPES = ("float16", "float32")
CODECS = ("none", "zstd", "blosc")
# attrs that must agree between a store and a run that writes into it
IDENTITY_KEYS = ("layout", "dtype", "codec", "preprocessing")


def row_checksum() -> Any:
    """The hash of the per-shard checksums (blake2b-256: strong, and twice as fast as sha256 here)."""
    return hashlib.blake2b(digest_size=32)


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
            + ("; upgrade vqt-cache" if newer else "; re-extract it")
        )


@dataclass
class Split:
    """One split of a store: the arrays and the shard bookkeeping."""

    group: zarr.Group
    layout: str

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
        """kv (n, L, 2, H, N, dh) or hidden (n, L, N, D)."""
        return self.group[self.layout]

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_samples)

    def done(self) -> np.ndarray:
        return self.group["shard_done"][:].astype(bool)

    def incomplete_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.done())]

    @property
    def complete(self) -> bool:
        return bool(self.done().all())

    def write_images(self, start: int, features: np.ndarray) -> None:
        """Write features of images start.. (one chunk per image)."""
        self.features[start : start + len(features)] = features

    def finish_shard(self, shard: int, final: np.ndarray, valid: np.ndarray, rows_digest: bytes) -> None:
        """Write the shard's final features, valid flags and checksum, then (last) its completion flag.

        rows_digest: the `row_checksum()` digest of the shard's feature rows as written, in row order.
        """
        start, stop = self.shard_range(shard)
        self.group["final"][start:stop] = final
        self.group["valid"][start:stop] = valid
        digest = row_checksum()
        digest.update(rows_digest)
        digest.update(np.ascontiguousarray(final, dtype=np.float32).tobytes())
        self.group["checksum"][shard] = np.frombuffer(digest.digest(), dtype=np.uint8)
        self.group["shard_done"][shard] = 1

    def verify_shard(self, shard: int) -> list[str]:
        """Re-read a complete shard: every chunk readable, finite, and matching the checksum recorded at write."""
        start, stop = self.shard_range(shard)
        where = f"split {self.name!r} shard {shard} (rows {start}..{stop - 1})"
        rows = row_checksum()
        try:
            for row in range(start, stop):
                features = self.features[row]
                if not np.isfinite(features).all():
                    return [f"{where}: row {row} holds NaN or Inf"]
                rows.update(np.ascontiguousarray(features))
            final = self.group["final"][start:stop]
        except Exception as exc:  # a truncated or corrupt chunk fails to decode in many ways
            return [f"{where}: a chunk cannot be read ({type(exc).__name__}: {exc})"]
        digest = row_checksum()
        digest.update(rows.digest())
        digest.update(np.ascontiguousarray(final, dtype=np.float32).tobytes())
        if digest.digest() != self.group["checksum"][shard].tobytes():
            return [f"{where}: data differs from the checksum recorded when it was written (missing or altered chunks)"]
        return []

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
        split = Split(self.group[name], self.layout)
        if require_complete and not split.complete:
            missing = len(split.incomplete_shards())
            raise VQTError(
                f"split {name!r} of {self.url} is incomplete ({missing} of {split.num_shards} shards missing); "
                "re-run the same extract command to finish it"
            )
        return split

    def weights(self) -> dict[str, np.ndarray]:
        weights = self.group["weights"]
        return {name: weights[name][...] for name in weights.array_keys()}

    def create_split(self, name: str, sources: list[str], labels: list[int], shard_size: int, index_hash: str) -> Split:
        """Create a split's arrays and metadata (labels, sources); data shards are written later."""
        n = len(sources)
        num_shards = math.ceil(n / shard_size)
        a = self.attrs
        L, D, H, N = a["backbone"]["depth"], a["backbone"]["dim"], a["backbone"]["heads"], a["backbone"]["tokens"]
        shape = (n, L, 2, H, N, D // H) if self.layout == "kv" else (n, L, N, D)
        group = self.group.create_group(name)
        compressors = _compressors(a["codec"])
        group.create_array(
            self.layout, shape=shape, chunks=(1, *shape[1:]), dtype=a["dtype"], compressors=compressors, fill_value=0
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
        return Split(group, self.layout)

    def bytes_per_image(self) -> int:
        """Bytes of one image's layers, uncompressed."""
        a = self.attrs["backbone"]
        per_layer = 2 * a["tokens"] * a["dim"] if self.layout == "kv" else a["tokens"] * a["dim"]
        return a["depth"] * per_layer * np.dtype(self.attrs["dtype"]).itemsize

    def describe(self) -> dict[str, Any]:
        """Everything `vqt-cache info` shows, JSON-ready."""
        splits = []
        for name in self.split_names():
            split = Split(self.group[name], self.layout)
            if "index_hash" not in split.group.attrs:
                continue
            done = split.done()
            finished = np.flatnonzero(done)
            valid = split.valid()
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
    """Create a store, or open an existing one after checking it was made for the same backbone and settings."""
    try:
        existing = zarr.open_group(store=url, mode="r", zarr_format=3, storage_options=storage_options)
    except (FileNotFoundError, ValueError):
        existing = None
    if existing is not None and "format" in existing.attrs:
        store = open_store(url, mode="r+", storage_options=storage_options)
        _check_same(store.attrs, attrs, url)
        return store
    if attrs["layout"] not in LAYOUTS:
        raise VQTError(f"unknown layout {attrs['layout']!r}: use one of {', '.join(LAYOUTS)}")
    if attrs["dtype"] not in DTYPES:
        raise VQTError(f"unknown dtype {attrs['dtype']!r}: use one of {', '.join(DTYPES)}")
    _compressors(attrs["codec"])
    group = _open_group(url, "w", storage_options)
    weights_group = group.create_group("weights")
    for name, array in weights.items():
        weights_group.create_array(name, shape=array.shape, dtype=array.dtype, compressors=None)[...] = array
    # the format attrs last: a store without them is an interrupted creation and is rewritten
    group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, **attrs})
    return Store(group, url)


def _check_same(have: dict, want: dict, url: str) -> None:
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
