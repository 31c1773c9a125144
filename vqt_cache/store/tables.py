"""The store's tables, read and written: `Images` (the image table, each image once), `Split` (which images,
in which order, with their labels) and `Store` (the opened group: its splits, adding a split, `describe` for
`info`). Each reads through the checks of `vqt_cache/store/schema.py`."""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from vqt_cache.errors import VQTError
from vqt_cache.formats import group_for, quantized
from vqt_cache.store.chunks import Chunks, read_whole
from vqt_cache.store.schema import (
    FORMAT_VERSION,
    IMAGES_ATTR_TYPES,
    PROBES,
    SPLIT_ATTR_TYPES,
    array_shapes,
    check_array,
    check_format,
    check_types,
    dequantized,
    forward_precision,
    hash_rows,
    image_bytes,
    key_source,
    probe_bytes,
    probe_shapes,
    read_checked,
    row_checksum,
    rows_hash,
    shard_checksum,
    stored_bytes,
)


class _SiblingsOfAReportedError(logging.Filter):
    """zarr lists a group's members by reading every member's metadata in concurrent tasks and raises the first
    failure, which `Store._metadata` turns into one sentence; the other failing tasks are dropped unawaited, and
    asyncio would print each as "Task exception was never retrieved" with a traceback after that sentence. This
    drops exactly those records (tasks of zarr's member listing), and nothing else asyncio logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "_getitem_semaphore" in message)


logging.getLogger("asyncio").addFilter(_SiblingsOfAReportedError())

READ_AHEAD = 4  # shards read at once when a split is loaded


def read_ahead(read: Callable[[Any], Any], items: Iterable[Any], ahead: int) -> Iterator[Any]:
    """read(item) of each item, in order, `ahead` of them at once on threads (reads that release the GIL add up)."""
    with ThreadPoolExecutor(ahead) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) == ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def open_group(url: str, mode: str, storage_options: dict | None = None) -> zarr.Group:
    try:
        return zarr.open_group(store=url, mode=mode, zarr_format=3, storage_options=storage_options)
    except FileNotFoundError as exc:
        raise VQTError(f"no store at {url}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise VQTError(f"{url} is not a readable Zarr v3 store: {exc}") from exc


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
        return read_checked(
            self.group["shard_done"], slice(None), "the image table's completion record (shard_done)"
        ).astype(bool)

    def where(self, shard: int) -> str:
        start, stop = self.shard_range(shard)
        return f"image shard {shard} (rows {start}..{stop - 1}, from {self.source(start)})"

    def write_images(self, start: int, features: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write features (and, int8, their scales) of rows start.. , one chunk per image, on the calling thread
        (`Chunks`: threads add up). Every chunk is written, zeros too."""
        self._chunks(self.layout).write(start, features)
        if scales is not None:
            self._chunks("scale").write(start, scales)

    @cached_property
    def _names(self) -> set[str]:
        return set(self.group.array_keys())

    def _chunks(self, name: str) -> Chunks:
        """The reader and writer of one of the table's arrays (kept: opening an array reads its metadata)."""
        writers = self.__dict__.setdefault("_writers", {})
        if name not in writers:
            writers[name] = Chunks(self.group[name], empty=name in (self.layout, "scale"))
        return writers[name]

    @property
    def probes(self) -> bool:
        """Whether the table holds the probe arrays (extract --probes)."""
        return "class_tokens" in self._names

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
        start, _ = self.shard_range(shard)
        self._chunks("final").write(start, final)
        self._chunks("valid").write(start, valid)
        if self.probes != (probes is not None):
            raise VQTError(f"{self.where(shard)}: the probe arrays are {'missing' if self.probes else 'unexpected'}")
        for name, values in (probes or {}).items():
            self._chunks(name).write(start, values)
        checksum = shard_checksum(rows_digest, final, valid, self.version, probes)
        self._chunks("checksum").write(shard, np.frombuffer(checksum, np.uint8)[None])
        self._chunks("shard_done").write(shard, np.ones(1, np.uint8))

    def read_shard(self, shard: int, probes: dict | None = None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """A complete shard's feature rows and scales, with its faults: unreadable chunks, NaN/Inf, or data that
        differs from its checksum (a missing chunk reads as zeros and is caught here). The shard's probe arrays (a
        store with them) are checked with it, and put into `probes` when given."""
        start, stop = self.shard_range(shard)
        where = self.where(shard)
        try:
            features = self._chunks(self.layout).read(start, stop)
            scales = self._chunks("scale").read(start, stop) if self.quantized else None
            final, valid = self._chunks("final").read(start, stop), self._chunks("valid").read(start, stop)
            names = [name for name in PROBES if name in self._names]
            read = {name: self._chunks(name).read(start, stop) for name in names}
            recorded = self._chunks("checksum").read(shard, shard + 1)[0].tobytes()
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
        check_types(dict(self.group.attrs), IMAGES_ATTR_TYPES, where)
        M, shard_size, stops = self.num_rows, self.shard_size, self.block_stops
        if shard_size < 1 or (stops[-1] if stops else 0) != M or stops != sorted(set(stops)):
            raise VQTError(f"{where} is damaged: its shard size, blocks and rows disagree; re-extract it")
        shape, scales = array_shapes(M, backbone, self.layout, self.dtype)
        grows = dict(where=where, growing=True)  # an append in progress grows the arrays before it commits
        check_array(self.group, self.layout, shape, self.dtype, (1, *shape[1:]), **grows)
        if scales is not None:
            check_array(self.group, "scale", scales, "float16", (1, *scales[1:]), **grows)
        D = backbone["dim"]
        check_array(self.group, "final", (M, D), "float32", (shard_size, D), **grows)
        if self.probes:
            for name, (shape, dtype) in probe_shapes(M, backbone, self.dtype).items():
                check_array(self.group, name, shape, dtype, (shard_size, *shape[1:]), **grows)
        check_array(self.group, "valid", (M,), "uint8", (shard_size,), **grows)
        check_array(self.group, "shard_done", (self.num_shards,), "uint8", (1,), **grows)
        check_array(self.group, "checksum", (self.num_shards, 32), "uint8", (1, 32), **grows)

    def _arrays(self) -> dict[str, zarr.Array]:
        return {name: self.group[name] for name in self.group.array_keys()}

    def _resize(self, rows: int) -> None:
        """Grow (or shrink back) every array to `rows` rows; the attributes, written after, commit it."""
        shards = math.ceil(rows / self.shard_size)
        self.__dict__.pop("_writers", None)  # they know the arrays' old length
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
        rows = read_checked(self.group["rows"], slice(None), f"{where}: its rows")
        labels = read_checked(self.group["labels"], slice(None), f"{where}: its labels")
        if rows_hash(rows, labels) != self.group.attrs["rows_hash"]:
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
        return read_checked(self.images.group["valid"], slice(None), f"split {self.name!r}: the valid flags")[
            self.rows()
        ].astype(bool)

    def final(self) -> np.ndarray:
        return read_checked(self.images.group["final"], slice(None), f"split {self.name!r}: the final features")[
            self.rows()
        ]

    def row(self, sample: int) -> np.ndarray:
        """One sample's features (float16/float32 as stored, int8 dequantized to float32)."""
        return self.images.row(int(self.rows()[sample]))

    def checked_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]]:
        """Shard by shard, each checked against its checksum: (the split positions it holds, their features, their
        int8 scales or None, their probe arrays by name (none in a store without them)), in split order within a
        shard."""
        rows = self.rows()
        for shard, (shard_features, shard_scales, faults, probes) in zip(
            self.shards(), self._read_ahead(), strict=True
        ):
            if faults:
                raise VQTError(f"{faults[0]}; run `vqt-cache verify` on the store, then re-extract it")
            start, _ = self.images.shard_range(shard)
            here = np.flatnonzero(rows // self.images.shard_size == shard)
            at = rows[here] - start
            if len(at) == len(shard_features) and (at == np.arange(len(at))).all():
                at = slice(None)  # the whole shard in order (the usual case): a view, not a copy
            scales = None if shard_scales is None else shard_scales[at]
            yield here, shard_features[at], scales, {name: values[at] for name, values in probes.items()}

    def _read_ahead(self) -> Iterator[tuple[np.ndarray, np.ndarray | None, list[str], dict[str, np.ndarray]]]:
        """`read_shard` of each of the split's shards in order, READ_AHEAD of them read at once on threads (file
        reads, decoding and hashing release the GIL)."""

        def read(shard: int) -> tuple[np.ndarray, np.ndarray | None, list[str], dict[str, np.ndarray]]:
            probes: dict[str, np.ndarray] = {}
            return (*self.images.read_shard(shard, probes), probes)

        return read_ahead(read, self.shards(), READ_AHEAD)

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
        check_types(dict(self.group.attrs), SPLIT_ATTR_TYPES, where)
        n = self.num_samples
        if n < 1 or len(self.sources) != n:
            raise VQTError(f"{where} is damaged: its sample and source counts disagree; re-extract it")
        check_array(self.group, "rows", (n,), "int64", (n,), where)
        check_array(self.group, "labels", (n,), "int64", (n,), where)
        self._load_index()

    def nbytes_stored(self) -> int:
        """Bytes of the image rows this split reads (shared rows count for every split that reads them)."""
        per_row = self.images.nbytes_stored() / max(self.images.num_rows, 1)
        return round(per_row * len(np.unique(self.rows())))


class Store:
    """An opened feature store."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self.group, self.url = group, url
        # opened read-only, the checked image table and complete splits are kept: checking them reads every array's
        # metadata, and stage two asks for them several times (a writer's store changes, so it checks each time)
        self._checked: dict[str, Any] | None = {} if group.read_only else None

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def layout(self) -> str:
        return self.group.attrs["layout"]

    @property
    def forward_precision(self) -> str:
        """The frozen forward's arithmetic that made the features: "float32" or "bf16" (`schema.forward_precision`)."""
        return forward_precision(self.group.attrs)

    @property
    def images(self) -> Images:
        """The image table (its metadata checked against its arrays)."""
        if self._checked is not None and "images/" in self._checked:
            return self._checked["images/"]
        with self._metadata("the image table (images/)"):
            if "images" not in self.group.group_keys():
                raise VQTError(f"store {self.url} is damaged: it has no image table; re-extract it")
            images = Images(self.group["images"], self.layout, self.attrs["dtype"], self.attrs["format_version"])
            try:
                images.check_metadata(self.attrs["backbone"])
            except VQTError as exc:
                raise VQTError(f"store {self.url}: {exc}") from exc
        if self._checked is not None:
            self._checked["images/"] = images
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
        if self._checked is not None and name in self._checked:
            return self._checked[name]
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
        if self._checked is not None and split.complete:
            self._checked[name] = split
        return split

    def weights(self) -> dict[str, np.ndarray]:
        """The frozen backbone's tensors (trusted once `backbone_from_weights` has checked their fingerprint)."""
        with self._metadata("the weights (weights/)"):
            if "weights" not in self.group.group_keys():
                raise VQTError(f"store {self.url} is damaged: it has no weights group; re-extract it")
            arrays = dict(self.group["weights"].arrays())  # their metadata read at once
        out = {}
        for name, array in arrays.items():
            try:
                out[name] = read_whole(array)
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
                "rows_hash": rows_hash(rows, labels_array),
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

    def stored_bytes_per_image(self) -> int:
        """Bytes written per image, uncompressed: layers, final feature, valid flag and any probe arrays."""
        return stored_bytes(self.attrs["backbone"], self.layout, self.attrs["dtype"], bool(self.attrs.get("probes")))

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
            "precision": self.forward_precision,  # the frozen forward's
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


def open_store(url: str, mode: str = "r", storage_options: dict | None = None) -> Store:
    """Open an existing store read-only (or "r+"), checking its format and version."""
    group = open_group(url, mode, storage_options)
    check_format(dict(group.attrs), url)
    return Store(group, url)
