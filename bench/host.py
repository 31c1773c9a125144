"""Extraction's host work per image (issue 24): what the CPU of a GPU machine must do for every image the GPU
extracts, with ViT-B/16 geometry and real hidden int8 rows (1.87 MB an image), the disk taken out of it (the store
lives in memory, under /dev/shm). The goal is room for at least 500 images a second.

- hashing a shard's rows for its checksum, with the hash of format 4 (blake3) and of format 3 (blake2b);
- zarr's chunk writes alone, with extraction's WRITERS threads (zarr runs every write on one event-loop thread, so
  more threads do not add up);
- extraction's writer as it runs (`ShardWriter`: the writes, and the hash on a thread of its own);
- for scale, int8 quantization on the CPU (on a GPU it runs on the device, before the copy to the host).

img/s is wall-clock on this machine's cores; ms CPU per image is the process's CPU time (every thread) per image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch

from bench.synthetic import new_store, synthetic_dataset
from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig
from vqt_cache.extraction import WRITERS, ShardWriter
from vqt_cache.quantize import quantize
from vqt_cache.store import hash_rows, row_checksum


class _NoHash:
    def update(self, _data) -> None:
        pass


def _timed(work, n: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": n / wall, "ms_cpu_per_image": 1e3 * cpu / n}


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    batch = 32
    values, scales = quantize(torch.randn(batch, backbone.depth, backbone.tokens, backbone.dim), "int8", 64)
    n = 128 if quick else 512
    features = torch.randn(batch, backbone.depth, backbone.tokens, backbone.dim)
    quantizing = _timed(lambda: [quantize(features, "int8", 64) for _ in range(n // batch)], n)
    rows = [{"bench": "host", "what": "int8 quantization on the CPU (a GPU quantizes on the device)", **quantizing}]
    v, s = values.numpy(), scales.numpy()
    for name, digest in (("blake3, format 4", lambda: row_checksum(4)), ("blake2b, format 3", lambda: row_checksum(3))):

        def hashing(digest=digest) -> None:
            d = digest()
            for _ in range(n // batch):
                hash_rows(d, v, s)

        rows.append({"bench": "host", "what": f"hash the rows for the shard checksum ({name})", **_timed(hashing, n)})
    tmp = tempfile.mkdtemp(prefix="vqt-bench-host-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        for what, writers, checksum in (
            (f"zarr chunk writes alone, {WRITERS} threads", WRITERS, _NoHash),
            (f"extraction's writer: chunk writes on {WRITERS} threads + blake3 hash (format 4)", WRITERS, None),
            (f"extraction's writer: chunk writes on {WRITERS} threads + blake2b hash (format 3)", WRITERS, 3),
        ):
            cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", layout="hidden", dtype="int8", shard_size=n)
            _, split = new_store(f"{tmp}/{len(rows)}.zarr", backbone, synthetic_dataset(n), cfg)

            def write(split=split, writers=writers, checksum=checksum) -> None:
                digest = row_checksum(3) if checksum == 3 else checksum() if checksum else split.images.row_checksum()
                with ShardWriter(split.images, writers) as writer:
                    for at in range(0, n, batch):
                        writer.submit(at, values, scales, digest)
                    writer.wait()

            rows.append({"bench": "host", "what": f"{what}, store in memory", **_timed(write, n)})
            shutil.rmtree(f"{tmp}/{len(rows) - 1}.zarr")  # memory: a full /dev/shm slows every later write
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
