"""The feature store: a self-describing Zarr v3 group (docs/design.md §5). No timm, no torch, no image code.

- `schema.py`: the format (what a store holds, its version and checksums) and the checks of what is read back;
- `tables.py`: the tables, read and written (`Images`, `Split`, `Store`, `open_store`);
- `create.py`: creating a store, resuming one, and where stores go (`default_store_path`, `found_at`).

The names below are the store's interface to the rest of the package.
"""

from vqt_cache.store.create import absolute_url, check_resumable, create_store, default_store_path, found_at
from vqt_cache.store.schema import (
    dequantized,
    describe_weights,
    forward_precision,
    hash_rows,
    image_bytes,
    key_source,
    probe_bytes,
    row_checksum,
    rows_hash,
    shard_checksum,
    stored_bytes,
)
from vqt_cache.store.tables import Images, Split, Store, open_store, read_ahead

__all__ = [
    "Images",
    "Split",
    "Store",
    "absolute_url",
    "check_resumable",
    "create_store",
    "default_store_path",
    "dequantized",
    "describe_weights",
    "forward_precision",
    "found_at",
    "hash_rows",
    "image_bytes",
    "key_source",
    "open_store",
    "read_ahead",
    "probe_bytes",
    "stored_bytes",
    "row_checksum",
    "rows_hash",
    "shard_checksum",
]
