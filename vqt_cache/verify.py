"""`vqt-cache verify`: re-read a store and say whether it can be trusted.

Checks the format, the frozen weights (they must decode and hash to the recorded fingerprint), every split's
metadata, rows and labels (against their recorded hash) and completion, and for each complete shard of the image
table that every chunk decodes, holds only finite values and matches the checksum recorded when it was written
over features, final features and valid flags (a deleted or truncated chunk, a silently altered byte). With
`recompute`, it also runs the frozen backbone (rebuilt from the store's own weights) again on a sample of images
and compares with what is stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from vqt_cache.backbones import backbone_from_weights
from vqt_cache.errors import VQTError
from vqt_cache.formats import forward_dtype
from vqt_cache.store import open_store


def verify(url: str, recompute: int = 0, seed: int = 0, progress=None) -> dict[str, Any]:
    """Returns {"url", "splits": [...], "checked": image shards, "faults": [...], "recomputed": n}; no faults means
    trustworthy."""
    if recompute < 0:
        raise VQTError(f"--recompute takes a number of images >= 0, got {recompute}")
    store = open_store(url)
    faults: list[str] = []
    splits = []
    backbone = None
    try:
        backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    except VQTError as exc:
        faults.append(f"weights: {exc}")
    try:
        images = store.images
        done = images.done()
    except VQTError as exc:
        return {"url": url, "splits": [], "checked": 0, "faults": [*faults, str(exc)], "recomputed": 0}
    for name in store.split_names():
        try:  # an interrupted creation, damaged metadata or rows, or an unreadable completion record is a fault
            split = store.split(name, require_complete=False)
            shards = split.shards()
        except VQTError as exc:
            faults.append(str(exc))
            continue
        missing = [s for s in shards if not done[s]]
        if missing:
            faults.append(f"split {name!r}: {len(missing)} of {len(shards)} shards incomplete; re-run extract")
        splits.append({"name": name, "shards": len(shards), "complete": not missing})
    checked = 0
    finished = [s for s in range(images.num_shards) if done[s]]
    for shard in finished:  # each image shard once, however many splits read it
        faults += images.read_shard(shard)[2]
        checked += 1
        if progress:
            progress("verify images", checked, len(finished))
    recomputed = _recompute(store, backbone, recompute, seed, faults) if recompute and not faults else 0
    return {"url": url, "splits": splits, "checked": checked, "faults": faults, "recomputed": recomputed}


def _recompute(store, backbone, n: int, seed: int, faults: list[str]) -> int:
    """Run the store's backbone again on n images per complete split and compare with the stored features."""
    from vqt_cache.datasets import ImageSplit, reopen_dataset

    attrs = store.attrs
    dataset = reopen_dataset(attrs["dataset"])
    # fp16 keeps ~3 significant digits; int8 is within half a step, 1/254 of a row's largest value; a bf16 forward
    # rounds differently on another device (CPU or GPU): each within 1.5% of a row's largest value from float32's
    # (tests/test_backbones.py holds 2.5%), so two within 5%
    tolerance = {"float32": 1e-4, "float16": 2e-3, "int8": 5e-3}[attrs["dtype"]]
    if store.forward_precision == "bf16":
        tolerance = max(tolerance, 5e-2)
    dtype = getattr(torch, forward_dtype(attrs["dtype"]))
    done = 0
    rng = np.random.default_rng(seed)
    for name in store.split_names():
        split = store.split(name, require_complete=False)
        if not split.complete:
            continue
        rows = np.flatnonzero(split.valid())
        sample = np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))
        items = [(split.sources[r], 0) for r in sample]
        images = torch.stack([x for x, _, _ in ImageSplit(dataset, items, attrs["preprocessing"])])
        _, layers = backbone.forward_cache(images, layout=store.layout, dtype=dtype, precision=store.forward_precision)
        for row, fresh in zip(sample, layers.float(), strict=True):
            stored = torch.from_numpy(split.row(int(row))).float()
            scale = max(stored.abs().max().item(), 1.0)
            error = (stored - fresh).abs().max().item() / scale
            if error > tolerance:
                faults.append(
                    f"split {name!r} row {row} ({split.sources[row]}): stored features differ from a "
                    f"fresh forward by {error:.2e} (relative), more than {tolerance:g}"
                )
            done += 1
    return done
