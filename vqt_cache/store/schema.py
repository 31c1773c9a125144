"""The store's format: what a store holds, its checksums, and the checks of what is read back (docs/design.md §5).

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

Everything read from a store is checked here first: the root attributes (`check_attrs`), each array's shape, dtype
and chunking against them (`check_array`), and, for writing into a store, its identity (`check_same`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vqt_cache.errors import VQTError, recorded
from vqt_cache.formats import (
    DTYPES,
    FORWARD_PRECISION,
    LAYOUTS,
    PRECISIONS,
    bytes_per_value,
    group_for,
    layer_shape,
    quantized,
)

FORMAT = "vqt-cache"
# 2: labels and valid flags inside the shard checksums; 3: each image stored once; 4: blake3 shard checksums
FORMAT_VERSION = 4
READABLE_VERSIONS = (3, 4)  # a version-3 store keeps blake2b shard checksums, and is resumed as version 3
# attrs that must agree between a store and a run that writes into it
IDENTITY_KEYS = ("layout", "dtype", "codec", "preprocessing")
# what identifies a store's dataset (datasets.Dataset.describe): a split of anything else is refused
DATASET_IDENTITY = ("name", "root", "columns", "fingerprint", "class_names", "resize", "validation")
# the root attributes covered by the metadata checksum: everything stage two and live evaluation read from them
# ("probes" and "precision" only where recorded: stores made before them have none)
HASHED_ATTRS = ("backbone", "preprocessing", "dataset", "layout", "dtype", "codec", "probes", "precision")
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


RESTORE = "restore its zarr.json, or re-extract into a new --out"  # advice for damaged root attributes
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


def check_format(attrs: dict, url: str) -> None:
    if attrs.get("format") != FORMAT:
        raise VQTError(f"{url} is not a vqt-cache store (no format attribute {FORMAT!r})")
    where = f"store {url}"
    version = recorded(attrs, "format_version", int, where, RESTORE)
    if version not in READABLE_VERSIONS:
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise VQTError(
            f"store {url} has format_version {version}, this vqt-cache reads {readable}"
            + (
                "; upgrade vqt-cache"
                if version > FORMAT_VERSION
                else " (older stores keep each split's images apart); re-extract it"
            )
        )
    if attrs.get("creating"):
        raise VQTError(f"the creation of store {url} was interrupted; re-run the extract command that made it")
    check_attrs(attrs, url)
    if attrs["layout"] not in LAYOUTS or attrs["dtype"] not in DTYPES:
        raise VQTError(f"store {url} has an unknown layout or dtype ({attrs['layout']!r}, {attrs['dtype']!r})")
    if version >= 4:  # the frozen weights' blake3 checksum, beside their fingerprint (`backbone_from_weights`)
        recorded(attrs["backbone"], "checksum", str, where, RESTORE, "backbone's weights checksum")
    if recorded(attrs, "metadata_hash", str, where, RESTORE) != metadata_hash(attrs):
        raise VQTError(
            f"store {url} is damaged: its attributes ({', '.join(k for k in HASHED_ATTRS if k in attrs)}) differ from "
            "the checksum recorded when it was written; restore its zarr.json, or re-extract into a new --out"
        )


def check_attrs(attrs: dict, url: str) -> None:
    """The root attributes stage one and two rely on are there, with their types."""
    check_types(attrs, ATTR_TYPES, f"store {url}")
    check_types(attrs["backbone"], BACKBONE_KEYS, f"store {url}: backbone")
    check_types(attrs["dataset"], DATASET_KEYS, f"store {url}: dataset")
    if forward_precision(attrs) not in PRECISIONS:
        raise VQTError(f"store {url} is damaged: its precision {attrs['precision']!r} is none of {PRECISIONS}")
    names = attrs["dataset"]["class_names"]
    if len(names) != attrs["dataset"]["num_classes"] or not all(isinstance(n, str) for n in names):
        raise VQTError(
            f"store {url} is damaged: its dataset has {attrs['dataset']['num_classes']} classes but "
            f"{len(names)} class names; re-extract it"
        )


def forward_precision(attrs: dict) -> str:
    """The arithmetic of the frozen forward that made a store's features: "float32" (recorded by its absence) or
    "bf16"; live evaluation, verify and predict run the store's backbone so too."""
    return attrs.get("precision", FORWARD_PRECISION)


def check_types(attrs: dict, types: dict[str, type], where: str) -> None:
    """Each attribute is there, not null, and of its type (`errors.recorded`: hashes and versions among them)."""
    for key, kind in types.items():
        recorded(attrs, key, kind, where, "re-extract it")


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


def stored_bytes(backbone: dict, layout: str, dtype: str, probes: bool) -> int:
    """Bytes written per image, uncompressed: its layers (int8: with scales), its final feature (float32), its valid
    flag and (extract --probes) its probe arrays."""
    return (
        image_bytes(backbone, layout, dtype) + 4 * backbone["dim"] + 1 + (probe_bytes(backbone, dtype) if probes else 0)
    )


def check_array(
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


def read_checked(array: zarr.Array, selection: Any, what: str) -> np.ndarray:
    try:
        return array[selection]
    except Exception as exc:  # a truncated or corrupt chunk fails to decode in many ways
        raise VQTError(f"{what} cannot be read ({type(exc).__name__}); run `vqt-cache verify`") from exc


def rows_hash(rows: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=32)  # a split's index: small, and hashed the same in every version
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


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


def check_same(have: dict, want: dict, url: str) -> None:
    check_attrs(have, url)
    for key in ("fingerprint", "timm_name", "kwargs"):
        if have["backbone"][key] != want["backbone"][key]:
            raise VQTError(
                f"store {url} was written with a different backbone ({key} differs: {have['backbone'][key]!r}); "
                "use another --out or delete the store"
            )
    _check_dataset(have["dataset"], want["dataset"], url)
    if bool(have.get("probes")) != bool(want.get("probes")):
        if have.get("probes"):
            raise VQTError(f"store {url} was extracted with --probes: pass --probes to add to it")
        raise VQTError(
            f"store {url} was extracted without --probes, and a store holds probe arrays for all its images or "
            "none: leave out --probes to add to it, or extract with --probes into another --out"
        )
    if forward_precision(have) != forward_precision(want):
        raise VQTError(
            f"store {url} was extracted with --precision {forward_precision(have)}: pass it to add to the store, "
            f"or extract with --precision {forward_precision(want)} into another --out"
        )
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
            if isinstance(recorded, dict):
                hint = f"its validation split was carved with --val-fraction {recorded['fraction']}: pass the same"
            else:  # carving now would change the store's train split: a store is never rewritten
                hint = (
                    "it has none carved, and carving one changes its train split: extract with --val-fraction into "
                    "a new --out (or leave --val-fraction out to add splits to this store)"
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
