"""The feature store: a self-describing Zarr v3 group (docs/design.md §5). No timm, no image code.

    <store>/            attrs: format, format_version, backbone, preprocessing, dataset, layout, dtype, codec,
                        versions
      weights/<name>    every tensor of the frozen backbone's state dict, exact (stage two needs only the store)
      images/           attrs: shard_size, block_stops, keys (one per row: "<source>#<content digest>", "" = gap)
        kv      (M, L, 2, H, N, dh)  keys (after k_norm) and values, head-major   [layout "kv"]
        hidden  (M, L, N, D)         X̂_l = LN1(Z_{l-1})                           [layout "hidden"]
        scale   (M, ..., C / g)      float16 scale per token and group of g channels   [dtype "int8" only]
        final   (M, D)               the backbone's final feature f_0
        tokens  (M, P, D)            the final block's P patch tokens through the final norm    [extract --probes]
        tokens_scale (M, P, D / g)   their float16 scales                             [--probes, dtype "int8"]
        class_tokens (M, L, D)       every block's class token through the final norm, float32  [--probes]
        patch_mean (M, D)            the mean of the final block's patch tokens, normed, float32 [--probes]
        valid   (M,)                 0 where a bad image was skipped
        checksum (num_shards, 32)    blake2b-256 of the shard's feature rows (in order), final features and valid
                                     flags: everything stage two reads of the shard
        shard_done (num_shards,)     1 once every image of the shard is written (one chunk per shard)
      splits/<split>/   attrs: num_samples, index_hash, rows_hash, sources
        rows    (n,)                 int64: the image row of each sample
        labels  (n,)                 int64

Each image is stored once per store, however many splits list it: an image is identified by its source and a
digest of its content, so train800val200 costs no feature bytes once train800 and val200 are there. A split that
brings new images appends them to the image table as one block that starts on a shard boundary.

One Zarr chunk of kv/hidden = one image, all layers. Logical shards (fixed groups of `shard_size` rows of the
image table, cut at block ends) are the unit of writing: one writer per shard, and its completion flag is written
last, so a store never reads as complete when it is not. final/valid are chunked by shard, so writers never share
a chunk. A split's rows and labels are covered by `rows_hash`, written with them.

Creation writes the root attributes first with `creating: true`, then the weights, then the attributes without
it: an interrupted creation is provably this tool's and is redone, while a path holding anything else (files, a
foreign or damaged Zarr store) is refused, never overwritten. Adding a split grows the image arrays first and
commits with one write of the image table's attributes, then writes the split (its attributes last); a grown but
uncommitted image table is shrunk back by the next writer. On open, the attributes and every array's shape, dtype
and chunking are checked against each other before any data is trusted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from vqt_cache.errors import VQTError
from vqt_cache.files import describe_names
from vqt_cache.formats import CODECS, DTYPES, LAYOUTS, bytes_per_value, group_for, layer_shape, quantized

FORMAT = "vqt-cache"
# 2: labels and valid flags inside the shard checksums; 3: each image stored once; 4: blake3 shard checksums
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)  # a version-3 store keeps blake2b shard checksums, and is resumed as version 3
# attrs that must agree between a store and a run that writes into it
IDENTITY_KEYS = ("layout", "dtype", "codec", "preprocessing")
# what identifies a store's dataset (datasets.Dataset.describe): a split of anything else is refused
DATASET_IDENTITY = ("name", "root", "columns", "fingerprint", "class_names", "resize", "validation")
# the root attributes covered by the metadata checksum: everything stage two and live evaluation read from them
# ("probes" only where recorded: stores made before it have none)
HASHED_ATTRS = ("backbone", "preprocessing", "dataset", "layout", "dtype", "codec", "probes")
# the probe arrays (extract --probes), chunked by shard and written with its final features, in checksum order
PROBES = ("tokens", "tokens_scale", "class_tokens", "patch_mean")


def metadata_hash(attrs: dict) -> str:
    """blake2b-256 of the root attributes a result depends on (HASHED_ATTRS), as canonical JSON."""
    canonical = json.dumps({key: attrs[key] for key in HASHED_ATTRS if key in attrs}, sort_keys=True, allow_nan=False)
    return hashlib.blake2b(canonical.encode(), digest_size=32).hexdigest()


def row_checksum(version: int = FORMAT_VERSION) -> Any:
    """A new digest for the shard checksums of a store of format `version`: blake3 (version 4; 5.6 GB/s on one core
    of this CPU, so one hashing thread keeps up with 3,000 ViT-B/16 images a second), or blake2b-256 (version 3;
    0.95 GB/s, which capped extraction near 500 images a second)."""
    if version == 3:
        return hashlib.blake2b(digest_size=32)
    import blake3

    return blake3.blake3()


def hash_rows(digest: Any, values: np.ndarray, scales: np.ndarray | None = None) -> None:
    """Feed rows to a shard's row digest in row order: each row's values, then (int8 stores) its scales."""
    if scales is None:
        digest.update(_bytes(values))
        return
    for row_values, row_scales in zip(values, scales, strict=True):
        digest.update(_bytes(row_values))
        digest.update(_bytes(row_scales))


def _bytes(array: np.ndarray) -> np.ndarray:
    """An array's bytes in C order, as a uint8 view where it can be one (blake3 takes byte buffers only)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def shard_checksum(
    rows_digest: bytes,
    final: np.ndarray,
    valid: np.ndarray,
    version: int = FORMAT_VERSION,
    probes: dict[str, np.ndarray] | None = None,
) -> bytes:
    """A shard's checksum: its rows' digest, then its final features and valid flags, in row order; then, in a store
    with probe arrays, each of them (PROBES order) as stored."""
    digest = row_checksum(version)
    digest.update(rows_digest)
    digest.update(np.ascontiguousarray(final, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(valid, dtype=np.uint8).tobytes())
    for name in PROBES:
        if probes and name in probes:
            digest.update(_bytes(probes[name]))
    return digest.digest()


def probe_shapes(n: int, backbone: dict, dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The probe arrays of n images (extract --probes): name -> (shape, dtype). The patch tokens are kept in the
    store's dtype (int8 with float16 scales per group of channels); the class tokens and patch mean in float32."""
    L, D, P = backbone["depth"], backbone["dim"], backbone["tokens"] - backbone["prefix_tokens"]
    shapes = {"tokens": ((n, P, D), dtype)}
    if quantized(dtype):
        shapes["tokens_scale"] = ((n, P, D // group_for(D)), "float16")
    return shapes | {"class_tokens": ((n, L, D), "float32"), "patch_mean": ((n, D), "float32")}


def probe_bytes(backbone: dict, dtype: str) -> int:
    """Bytes of one image's probe arrays, uncompressed."""
    return sum(math.prod(shape) * np.dtype(kind).itemsize for shape, kind in probe_shapes(1, backbone, dtype).values())


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
SPLIT_ATTR_TYPES = {"num_samples": int, "index_hash": str, "rows_hash": str, "sources": list}
IMAGES_ATTR_TYPES = {"shard_size": int, "block_stops": list, "keys": list}


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
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise VQTError(
            f"store {url} has format_version {version}, this vqt-cache reads {readable}"
            + ("; upgrade vqt-cache" if newer else " (older stores keep each split's images apart); re-extract it")
        )
    if attrs.get("creating"):
        raise VQTError(f"the creation of store {url} was interrupted; re-run the extract command that made it")
    _check_attrs(attrs, url)
    if attrs["layout"] not in LAYOUTS or attrs["dtype"] not in DTYPES:
        raise VQTError(f"store {url} has an unknown layout or dtype ({attrs['layout']!r}, {attrs['dtype']!r})")
    recorded = attrs.get("metadata_hash")  # absent only in stores from before it was recorded
    if recorded is not None and recorded != metadata_hash(attrs):
        raise VQTError(
            f"store {url} is damaged: its attributes (backbone, preprocessing, dataset, layout, dtype, codec) differ "
            "from the checksum recorded when it was written; restore its zarr.json, or re-extract into a new --out"
        )


def _check_attrs(attrs: dict, url: str) -> None:
    """The root attributes stage one and two rely on are there, with their types."""
    _check_types(attrs, ATTR_TYPES, f"store {url}")
    _check_types(attrs["backbone"], BACKBONE_KEYS, f"store {url}: backbone")
    _check_types(attrs["dataset"], DATASET_KEYS, f"store {url}: dataset")
    names = attrs["dataset"]["class_names"]
    if len(names) != attrs["dataset"]["num_classes"] or not all(isinstance(n, str) for n in names):
        raise VQTError(
            f"store {url} is damaged: its dataset has {attrs['dataset']['num_classes']} classes but "
            f"{len(names)} class names; re-extract it"
        )


def _check_types(attrs: dict, types: dict[str, type], where: str) -> None:
    for key, kind in types.items():
        if not isinstance(attrs.get(key), kind) or kind is int and isinstance(attrs.get(key), bool):
            found = "missing" if key not in attrs else f"a {type(attrs[key]).__name__}"
            raise VQTError(f"{where} is damaged: attribute {key!r} is {found}, not a {kind.__name__}; re-extract it")


def dequantized(values: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """int8 rows and their float16 scales (..., C // group) -> float32 features: quantize.dequantize in numpy (the
    store imports no torch), bit for bit."""
    grouped = values.astype(np.float32).reshape(*values.shape[:-1], -1, group)
    return (grouped * scales.astype(np.float32)[..., None]).reshape(values.shape)


def array_shapes(n: int, backbone: dict, layout: str, dtype: str) -> tuple[tuple, tuple | None]:
    """The shapes of a split's feature array and (int8 stores) its scale array, for n images."""
    L, D, H, N = backbone["depth"], backbone["dim"], backbone["heads"], backbone["tokens"]
    shape = (n, *layer_shape(layout, L, H, N, D))
    scales = (*shape[:-1], shape[-1] // group_for(shape[-1])) if quantized(dtype) else None
    return shape, scales


def image_bytes(backbone: dict, layout: str, dtype: str) -> int:
    """Bytes of one image's layers in a store, uncompressed (int8: with its scales); backbone: depth, dim, heads,
    tokens."""
    shape, _ = array_shapes(1, backbone, layout, dtype)
    return round(math.prod(shape) * bytes_per_value(dtype, group_for(shape[-1])))


def _check_array(
    group: zarr.Group, name: str, shape: tuple, dtype: str, chunks: tuple, where: str, growing: bool = False
) -> None:
    """growing: the array may have more rows than the attributes commit (another process is adding images)."""
    if name not in group.array_keys():
        raise VQTError(f"{where} is damaged: array {name!r} is missing; re-extract it")
    array = group[name]
    found = (tuple(array.shape), str(array.dtype), tuple(array.chunks))
    if growing and found[0] and found[0][0] > shape[0]:
        shape = (found[0][0], *shape[1:])  # rows beyond the committed ones are never read
    if found != (tuple(shape), dtype, tuple(chunks)):
        raise VQTError(
            f"{where} is damaged: array {name!r} has shape {found[0]}, dtype {found[1]}, chunks {found[2]}, "
            f"but the store's attributes call for {tuple(shape)}, {dtype}, {tuple(chunks)}; re-extract it"
        )


def key_source(key: str) -> str:
    """The source of an image key "<source>#<content digest>" (datasets.Dataset.image_key makes them)."""
    return key.rsplit("#", 1)[0]


def _read(array: zarr.Array, selection: Any, what: str) -> np.ndarray:
    try:
        return array[selection]
    except Exception as exc:  # a truncated or corrupt chunk fails to decode in many ways
        raise VQTError(f"{what} cannot be read ({type(exc).__name__}); run `vqt-cache verify`") from exc


@dataclass
class Images:
    """The store's image table: every image's features, stored once, and the shard bookkeeping."""

    group: zarr.Group
    layout: str
    dtype: str
    version: int = FORMAT_VERSION  # the store's format version, which fixes its shard checksums' hash

    def row_checksum(self) -> Any:
        """A new digest for a shard's rows, with this store's hash (`row_checksum`)."""
        return row_checksum(self.version)

    @property
    def quantized(self) -> bool:
        return quantized(self.dtype)

    @property
    def shard_size(self) -> int:
        return self.group.attrs["shard_size"]

    @property
    def keys(self) -> list[str]:
        """One per row: "<source>#<content digest>", or "" for a row between blocks that holds no image."""
        return self.group.attrs["keys"]

    @property
    def block_stops(self) -> list[int]:
        return self.group.attrs["block_stops"]

    @property
    def num_rows(self) -> int:
        """Rows of the table, the unused rows between blocks included."""
        return len(self.keys)

    @property
    def num_images(self) -> int:
        """Images the table holds (each once)."""
        return sum(1 for key in self.keys if key)

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_rows / self.shard_size)

    @property
    def features(self) -> zarr.Array:
        """kv (M, L, 2, H, N, dh) or hidden (M, L, N, D), in the store's dtype (int8: see `scales`)."""
        return self.group[self.layout]

    @property
    def scales(self) -> zarr.Array | None:
        """int8 stores: (M, ..., C / g) float16, one per token and group of g channels; else None."""
        return self.group["scale"] if self.quantized else None

    @property
    def group_size(self) -> int:
        return group_for(self.features.shape[-1])

    def source(self, row: int) -> str:
        return key_source(self.keys[row])

    def stored_row(self, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One image's features and (int8) scales, as stored."""
        return self.features[row], self.scales[row] if self.quantized else None

    def row(self, row: int) -> np.ndarray:
        """One image's features as stored (float16/float32), or dequantized to float32 (int8)."""
        values, scales = self.stored_row(row)
        return values if scales is None else dequantized(values, scales, self.group_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Rows start..stop-1 of a shard: shard_size rows, cut at the end of the block that holds them."""
        start = shard * self.shard_size
        block_stop = next(stop for stop in self.block_stops if stop > start)
        return start, min(start + self.shard_size, block_stop)

    def shards_of(self, rows: np.ndarray) -> list[int]:
        """The shards that hold the given rows, in order."""
        return [int(s) for s in np.unique(np.asarray(rows) // self.shard_size)]

    def done(self) -> np.ndarray:
        return _read(self.group["shard_done"], slice(None), "the image table's completion record (shard_done)").astype(
            bool
        )

    def where(self, shard: int) -> str:
        start, stop = self.shard_range(shard)
        return f"image shard {shard} (rows {start}..{stop - 1}, from {self.source(start)})"

    def write_images(self, start: int, features: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write features (and, int8, their scales) of rows start.. (one chunk per image). Every chunk is written,
        zeros too: zarr would otherwise compare each chunk with the fill value first (a quarter of a write's time)."""
        whole = {"write_empty_chunks": True}
        self.features.with_config(whole)[start : start + len(features)] = features
        if scales is not None:
            self.scales.with_config(whole)[start : start + len(scales)] = scales

    @property
    def probes(self) -> bool:
        """Whether the table holds the probe arrays (extract --probes)."""
        return "class_tokens" in self.group.array_keys()

    def finish_shard(
        self,
        shard: int,
        final: np.ndarray,
        valid: np.ndarray,
        rows_digest: bytes,
        probes: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write the shard's final features, valid flags, probe arrays (a store with them) and checksum, then (last)
        its completion flag.

        rows_digest: the `row_checksum()` digest of the shard's feature rows as written, in row order.
        """
        start, stop = self.shard_range(shard)
        self.group["final"][start:stop] = final
        self.group["valid"][start:stop] = valid
        if self.probes != (probes is not None):
            raise VQTError(f"{self.where(shard)}: the probe arrays are {'missing' if self.probes else 'unexpected'}")
        for name, values in (probes or {}).items():
            self.group[name][start:stop] = values
        checksum = shard_checksum(rows_digest, final, valid, self.version, probes)
        self.group["checksum"][shard] = np.frombuffer(checksum, np.uint8)
        self.group["shard_done"][shard] = 1

    def read_shard(self, shard: int, probes: dict | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """A complete shard's feature rows and scales, with its faults: unreadable chunks, NaN/Inf, or data that
        differs from its checksum (a missing chunk reads as zeros and is caught here). The shard's probe arrays (a
        store with them) are checked with it, and put into `probes` when given."""
        start, stop = self.shard_range(shard)
        where = self.where(shard)
        try:
            features = self.features[start:stop]
            scales = self.scales[start:stop] if self.quantized else None
            final, valid = self.group["final"][start:stop], self.group["valid"][start:stop]
            read = {name: self.group[name][start:stop] for name in PROBES if self.probes and name in self.group}
            recorded = self.group["checksum"][shard].tobytes()
        except Exception as exc:  # a truncated or corrupt chunk fails to decode in many ways
            return np.empty(0), None, [f"{where}: a chunk cannot be read ({type(exc).__name__}: {exc})"]
        finite = np.isfinite(scales if self.quantized else features).reshape(stop - start, -1).all(axis=1)
        for values in read.values():
            if values.dtype != np.int8:
                finite &= np.isfinite(values).reshape(stop - start, -1).all(axis=1)
        if not finite.all():
            return features, scales, [f"{where}: row {start + int(np.argmin(finite))} holds NaN or Inf"]
        digest = self.row_checksum()
        hash_rows(digest, features, scales)
        if shard_checksum(digest.digest(), final, valid, self.version, read or None) != recorded:
            faults = [
                f"{where}: data differs from the checksum recorded when it was written (missing or altered chunks)"
            ]
            return features, scales, faults
        if probes is not None:
            probes.update(read)
        return features, scales, []

    def check_metadata(self, backbone: dict) -> None:
        """The table's attributes and arrays agree (cheap: no data read)."""
        where = "the image table"
        _check_types(dict(self.group.attrs), IMAGES_ATTR_TYPES, where)
        M, shard_size, stops = self.num_rows, self.shard_size, self.block_stops
        if shard_size < 1 or (stops[-1] if stops else 0) != M or stops != sorted(set(stops)):
            raise VQTError(f"{where} is damaged: its shard size, blocks and rows disagree; re-extract it")
        shape, scales = array_shapes(M, backbone, self.layout, self.dtype)
        grows = dict(where=where, growing=True)  # an append in progress grows the arrays before it commits
        _check_array(self.group, self.layout, shape, self.dtype, (1, *shape[1:]), **grows)
        if scales is not None:
            _check_array(self.group, "scale", scales, "float16", (1, *scales[1:]), **grows)
        D = backbone["dim"]
        _check_array(self.group, "final", (M, D), "float32", (shard_size, D), **grows)
        if self.probes:
            for name, (shape, dtype) in probe_shapes(M, backbone, self.dtype).items():
                _check_array(self.group, name, shape, dtype, (shard_size, *shape[1:]), **grows)
        _check_array(self.group, "valid", (M,), "uint8", (shard_size,), **grows)
        _check_array(self.group, "shard_done", (self.num_shards,), "uint8", (1,), **grows)
        _check_array(self.group, "checksum", (self.num_shards, 32), "uint8", (1, 32), **grows)

    def _arrays(self) -> dict[str, zarr.Array]:
        return {name: self.group[name] for name in self.group.array_keys()}

    def _resize(self, rows: int) -> None:
        """Grow (or shrink back) every array to `rows` rows; the attributes, written after, commit it."""
        shards = math.ceil(rows / self.shard_size)
        for name, array in self._arrays().items():
            length = shards if name in ("shard_done", "checksum") else rows
            if array.shape[0] != length:
                array.resize((length, *array.shape[1:]))

    def append(self, keys: list[str]) -> None:
        """Add a block of new images (starting on a shard boundary); one attribute write commits it."""
        self._resize(self.num_rows)  # an append that was interrupted before its commit is undone first
        start = math.ceil(self.num_rows / self.shard_size) * self.shard_size
        rows = start + len(keys)
        self._resize(rows)
        gap = [""] * (start - self.num_rows)
        self.group.attrs.update({"keys": self.keys + gap + keys, "block_stops": [*self.block_stops, rows]})

    def nbytes_stored(self) -> int:
        return sum(array.nbytes_stored() for array in self._arrays().values())


def _rows_hash(rows: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=32)  # a split's index: small, and hashed the same in every version
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


class Split:
    """One split of a store: which images (rows of the image table) in which order, with their labels.

    Read checked: `rows()` and `labels()` come from arrays whose hash is recorded with them.
    """

    def __init__(self, group: zarr.Group, images: Images) -> None:
        self.group, self.images = group, images
        self._rows: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.group.basename

    @property
    def layout(self) -> str:
        return self.images.layout

    @property
    def quantized(self) -> bool:
        return self.images.quantized

    @property
    def num_samples(self) -> int:
        return self.group.attrs["num_samples"]

    @property
    def sources(self) -> list[str]:
        return self.group.attrs["sources"]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.images.features.shape[1:])

    def rows(self) -> np.ndarray:
        """The image-table row of each sample."""
        if self._rows is None:
            self._load_index()
        return self._rows

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._load_index()
        return self._labels

    def _load_index(self) -> None:
        where = f"split {self.name!r}"
        rows = _read(self.group["rows"], slice(None), f"{where}: its rows")
        labels = _read(self.group["labels"], slice(None), f"{where}: its labels")
        if _rows_hash(rows, labels) != self.group.attrs["rows_hash"]:
            raise VQTError(f"{where} is damaged: its rows or labels differ from their recorded hash; re-extract it")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.images.num_rows):
            raise VQTError(f"{where} is damaged: it points outside the image table; re-extract it")
        self._rows, self._labels = rows, labels

    def shards(self) -> list[int]:
        """The image shards this split reads."""
        return self.images.shards_of(self.rows())

    def incomplete_shards(self) -> list[int]:
        done = self.images.done()
        return [s for s in self.shards() if not done[s]]

    @property
    def complete(self) -> bool:
        return not self.incomplete_shards()

    def valid(self) -> np.ndarray:
        return _read(self.images.group["valid"], slice(None), f"split {self.name!r}: the valid flags")[
            self.rows()
        ].astype(bool)

    def final(self) -> np.ndarray:
        return _read(self.images.group["final"], slice(None), f"split {self.name!r}: the final features")[self.rows()]

    def row(self, sample: int) -> np.ndarray:
        """One sample's features (float16/float32 as stored, int8 dequantized to float32)."""
        return self.images.row(int(self.rows()[sample]))

    def checked_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]]:
        """Shard by shard, each checked against its checksum: (the split positions it holds, their features, their
        int8 scales or None, their probe arrays by name (none in a store without them)), in split order within a
        shard."""
        rows = self.rows()
        for shard in self.shards():
            probes: dict[str, np.ndarray] = {}
            shard_features, shard_scales, faults = self.images.read_shard(shard, probes)
            if faults:
                raise VQTError(f"{faults[0]}; run `vqt-cache verify` on the store, then re-extract it")
            start, _ = self.images.shard_range(shard)
            here = np.flatnonzero(rows // self.images.shard_size == shard)
            at = rows[here] - start
            if len(at) == len(shard_features) and (at == np.arange(len(at))).all():
                at = slice(None)  # the whole shard in order (the usual case): a view, not a copy
            scales = None if shard_scales is None else shard_scales[at]
            yield here, shard_features[at], scales, {name: values[at] for name, values in probes.items()}

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every sample's features (and int8 scales), in split order, from shards checked against their checksums."""
        n = self.num_samples
        features = np.empty((n, *self.row_shape), dtype=self.images.features.dtype)
        scales = np.empty((n, *self.images.scales.shape[1:]), dtype=np.float16) if self.quantized else None
        for here, shard_features, shard_scales, _ in self.checked_shards():
            features[here] = shard_features
            if scales is not None:
                scales[here] = shard_scales
        return features, scales

    def check_metadata(self) -> None:
        """The split's attributes and arrays agree with each other (cheap: two small arrays read)."""
        where = f"split {self.name!r}"
        _check_types(dict(self.group.attrs), SPLIT_ATTR_TYPES, where)
        n = self.num_samples
        if n < 1 or len(self.sources) != n:
            raise VQTError(f"{where} is damaged: its sample and source counts disagree; re-extract it")
        _check_array(self.group, "rows", (n,), "int64", (n,), where)
        _check_array(self.group, "labels", (n,), "int64", (n,), where)
        self._load_index()

    def nbytes_stored(self) -> int:
        """Bytes of the image rows this split reads (shared rows count for every split that reads them)."""
        per_row = self.images.nbytes_stored() / max(self.images.num_rows, 1)
        return round(per_row * len(np.unique(self.rows())))


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

    @property
    def images(self) -> Images:
        """The image table (its metadata checked against its arrays)."""
        with self._metadata("the image table (images/)"):
            if "images" not in self.group.group_keys():
                raise VQTError(f"store {self.url} is damaged: it has no image table; re-extract it")
            images = Images(self.group["images"], self.layout, self.attrs["dtype"], self.attrs["format_version"])
            try:
                images.check_metadata(self.attrs["backbone"])
            except VQTError as exc:
                raise VQTError(f"store {self.url}: {exc}") from exc
        return images

    @contextmanager
    def _metadata(self, what: str) -> Iterator[None]:
        """Metadata zarr cannot parse (a zarr.json that is not JSON, or not a node's) is one sentence naming where."""
        try:
            yield
        except VQTError:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
            where = self._unreadable_metadata() or f"the metadata (zarr.json) of {what}"
            raise VQTError(
                f"store {self.url} is damaged: {where} cannot be read ({type(exc).__name__}); restore it, or "
                "re-extract into a new --out"
            ) from exc

    def _unreadable_metadata(self) -> str | None:
        """The first zarr.json below a local store's root that is not a JSON object (None if none is found)."""
        if "://" in self.url:
            return None
        root = Path(self.url)
        folders = [root / name for name in ("weights", "images", "splits")]
        folders += [
            d for name in ("weights", "images", "splits") if (root / name).is_dir() for d in (root / name).iterdir()
        ]
        folders += [d for split in (root / "splits").glob("*") if split.is_dir() for d in split.iterdir()]
        for folder in sorted(folders):
            meta = folder / "zarr.json"
            try:
                if meta.is_file() and not isinstance(json.loads(meta.read_bytes()), dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                return str(meta.relative_to(root))
        return None

    def _splits(self) -> zarr.Group:
        with self._metadata("the splits (splits/)"):
            if "splits" not in self.group.group_keys():
                raise VQTError(f"store {self.url} is damaged: it has no splits group; re-extract it")
            return self.group["splits"]

    def split_names(self) -> list[str]:
        with self._metadata("a split (splits/*)"):
            return sorted(self._splits().group_keys())

    def split(self, name: str, require_complete: bool = True) -> Split:
        if name not in self.split_names():
            have = ", ".join(self.split_names()) or "none"
            raise VQTError(f"store {self.url} has no split {name!r} (it has: {have})")
        with self._metadata(f"split {name!r}"):
            group = self._splits()[name]
            if "index_hash" not in group.attrs:
                raise VQTError(
                    f"the creation of split {name!r} of {self.url} was interrupted; re-run extract to finish it"
                )
            split = Split(group, self.images)
            try:
                split.check_metadata()
            except VQTError as exc:
                raise VQTError(f"store {self.url}: {exc}") from exc
        if require_complete and not split.complete:
            missing = len(split.incomplete_shards())
            raise VQTError(
                f"split {name!r} of {self.url} is incomplete ({missing} of {len(split.shards())} shards missing); "
                "re-run the same extract command to finish it"
            )
        return split

    def weights(self) -> dict[str, np.ndarray]:
        """The frozen backbone's tensors (trusted once `backbone_from_weights` has checked their fingerprint)."""
        with self._metadata("the weights (weights/)"):
            if "weights" not in self.group.group_keys():
                raise VQTError(f"store {self.url} is damaged: it has no weights group; re-extract it")
            weights = self.group["weights"]
            names = list(weights.array_keys())
        out = {}
        for name in names:
            try:
                out[name] = weights[name][...]
            except Exception as exc:  # a truncated chunk fails to decode in many ways
                raise VQTError(
                    f"store {self.url} is damaged: the stored weight {name!r} cannot be read ({type(exc).__name__}); "
                    "re-extract it"
                ) from exc
        return out

    def create_split(self, name: str, keys: list[str], labels: list[int], index_hash: str) -> Split:
        """Create a split of the images `keys` ("<source>#<content digest>"): images the store does not hold yet
        are appended to the image table as one block (their data is written later, shard by shard)."""
        images = self.images
        known = {key: row for row, key in enumerate(images.keys) if key}
        new = list(dict.fromkeys(key for key in keys if key not in known))
        if new:
            images.append(new)
            known.update((key, row) for row, key in enumerate(images.keys) if key)
        rows = np.asarray([known[key] for key in keys], dtype=np.int64)
        labels_array = np.asarray(labels, dtype=np.int64)
        n = len(keys)
        splits = self._splits()
        if name in splits.group_keys():  # an interrupted creation: its attributes were never written
            del splits[name]
        group = splits.create_group(name)
        group.create_array("rows", shape=(n,), chunks=(n,), dtype="int64", compressors=None)[:] = rows
        group.create_array("labels", shape=(n,), chunks=(n,), dtype="int64", compressors=None)[:] = labels_array
        # attrs last: a split group without them is a creation that was interrupted and is redone
        group.attrs.update(
            {
                "num_samples": n,
                "index_hash": index_hash,
                "rows_hash": _rows_hash(rows, labels_array),
                "sources": [key_source(key) for key in keys],
            }
        )
        return Split(group, self.images)

    def rekey_split(
        self, split: Split, keys: list[str], labels: list[int], index_hash: str, dry_run: bool = False
    ) -> bool:
        """Record new contents for images of `split` that were never written (an unreadable image the user has
        since fixed); False, changing nothing, when anything else differs (other sources, labels, or a written image).
        dry_run: only say whether it could (nothing is written).
        """
        rows, images = split.rows(), split.images
        old = [images.keys[row] for row in rows]
        if len(keys) != len(rows) or split.labels().tolist() != list(labels):
            return False
        changed = [i for i, (a, b) in enumerate(zip(old, keys, strict=True)) if a != b]
        done = images.done()
        for i in changed:
            if key_source(old[i]) != key_source(keys[i]) or done[rows[i] // images.shard_size]:
                return False
        if dry_run:
            return True
        if changed:
            table = list(images.keys)
            for i in changed:
                table[rows[i]] = keys[i]
            images.group.attrs.update({"keys": table})
        split.group.attrs.update({"index_hash": index_hash})
        return True

    def bytes_per_image(self) -> int:
        """Bytes of one image's layers, uncompressed (int8: with its scales)."""
        return image_bytes(self.attrs["backbone"], self.layout, self.attrs["dtype"])

    def describe(self) -> dict[str, Any]:
        """Everything `vqt-cache info` shows, JSON-ready."""
        splits = []
        try:
            images = self.images
            done = images.done()
            valid = images.group["valid"][:].astype(bool)
            images_info = {"images": images.num_images, "bytes": images.nbytes_stored()}
        except Exception:  # `info` shows what it can; `verify` says what is wrong
            images, images_info = None, {"damaged": True}
        for name in self.split_names():
            group = self._splits()[name]
            if "index_hash" not in group.attrs:
                continue
            try:
                if images is None:
                    raise VQTError("no image table")
                split = Split(group, images)
                split.check_metadata()
                shards = split.shards()
            except Exception:
                splits.append({"name": name, "damaged": True})
                continue
            finished = {s for s in shards if done[s]}
            rows = split.rows()
            skipped = [
                split.sources[i] for i, r in enumerate(rows) if r // images.shard_size in finished and not valid[r]
            ]
            splits.append(
                {
                    "name": name,
                    "images": split.num_samples,
                    "shards": len(shards),
                    "shards_done": len(finished),
                    "complete": len(finished) == len(shards),
                    "skipped": skipped,
                    "bytes": split.nbytes_stored(),
                }
            )
        keys = ("format_version", "backbone", "preprocessing", "dataset", "layout", "dtype", "codec", "versions")
        return {
            "url": self.url,
            **{k: self.attrs[k] for k in keys},
            "bytes_per_image": self.bytes_per_image(),
            "probes": bool(self.attrs.get("probes")),  # extract --probes: the probe arrays beside the layers
            "probe_bytes_per_image": probe_bytes(self.attrs["backbone"], self.attrs["dtype"])
            if self.attrs.get("probes")
            else 0,
            "images": images_info,
            "splits": splits,
        }

    def has_split(self, name: str) -> bool:
        with self._metadata(f"split {name!r}"):
            return name in self.split_names() and "index_hash" in self._splits()[name].attrs


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
        group = _open_group(url, "r+", storage_options)
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
        _check_same(dict(_open_group(url, "r", storage_options).attrs), attrs, url)
    store = open_store(url, storage_options=storage_options) if found == "store" else None
    if store is not None:
        _check_same(store.attrs, attrs, url)
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
        _check_format(attrs, url)  # the version sentence
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


def describe_weights(weights: dict[str, Any]) -> str:
    """One phrase for `info`, summaries and reports: e.g. "random (seed 0)"."""
    source = weights.get("source")
    if source == "random":
        return f"random (seed {weights.get('seed')})"
    if source == "file":
        return f"file {weights.get('path')} (sha256 {str(weights.get('sha256'))[:12]})"
    if source == "pretrained":
        revision = weights.get("revision")
        return f"pretrained {weights.get('tag')}" + (f" (revision {revision[:12]})" if revision else "")
    return "not recorded (a store from before vqt-cache recorded where weights came from)"


def _check_same(have: dict, want: dict, url: str) -> None:
    _check_attrs(have, url)
    for key in ("fingerprint", "timm_name", "kwargs"):
        if have["backbone"][key] != want["backbone"][key]:
            raise VQTError(
                f"store {url} was written with a different backbone ({key} differs: {have['backbone'][key]!r}); "
                "use another --out or delete the store"
            )
    _check_dataset(have["dataset"], want["dataset"], url)
    if bool(have.get("probes")) != bool(want.get("probes")):
        held = "holds" if have.get("probes") else "does not hold"
        raise VQTError(f"store {url} {held} probe arrays (extract --probes); use another --out or delete the store")
    for key in IDENTITY_KEYS:
        if have[key] != want[key]:
            raise VQTError(
                f"store {url} was written with {key} {have[key]!r}, this run asks for {want[key]!r}; "
                "use another --out or delete the store"
            )


def _describe_dataset(dataset: dict) -> str:
    return f"{dataset['name']!r}" + (f" from {dataset['root']}" if dataset.get("root") else "")


def _check_dataset(have: dict, want: dict, url: str) -> None:
    """A store holds one dataset: refuse a split of any other (another kind, folder, HF content, columns, classes,
    resize or carved validation split), before anything is written."""
    for key in DATASET_IDENTITY:
        recorded, asked = have.get(key), want.get(key)
        if key == "root" and recorded and asked:  # stores from before roots were recorded absolute
            recorded = str(Path(recorded).resolve())
        if recorded == asked:
            continue
        if key == "validation":
            hint = (
                f"its validation split was carved with --val-fraction {recorded['fraction']}: pass the same"
                if isinstance(recorded, dict)
                else "its dataset had no carved validation split: leave out --val-fraction"
            )
            raise VQTError(f"store {url} was extracted with another validation split; {hint}")
        if key == "class_names":
            detail = f"its {len(recorded)} classes differ from the {len(asked)} this dataset has now"
        elif key == "fingerprint":
            detail = "the dataset's content differs"
        else:
            detail = f"{key} {recorded!r} differs from {asked!r}"
        raise VQTError(
            f"store {url} holds dataset {_describe_dataset(have)}, not {_describe_dataset(want)} ({detail}): a store "
            "holds one dataset; extract this one into another --out"
        )


def open_store(url: str, mode: str = "r", storage_options: dict | None = None) -> Store:
    """Open an existing store read-only (or "r+"), checking its format and version."""
    group = _open_group(url, mode, storage_options)
    _check_format(dict(group.attrs), url)
    return Store(group, url)
