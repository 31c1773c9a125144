"""Extraction's host work per image (issues 24 and 32): what the CPU of a GPU machine must do for every image the
GPU extracts, with ViT-B/16 geometry and real hidden int8 rows (1.87 MB an image), the disk taken out of it (the
store lives in memory, under /dev/shm). The goal: <= 1 ms of CPU an image, and capacity that grows with threads
(>= 1.8x from 1 to 2 writers), so that a 16-core GPU host has room for 5,000 images a second.

- hashing a shard's rows for its checksum, with the hash of format 4 (blake3) and of format 3 (blake2b);
- zarr's own chunk writes (what extraction used before issue 32: every write runs on zarr's one event-loop thread,
  so more threads do not add up), on 4 threads;
- the floor: the same files (values and scales, temporary file and rename) written and hashed by a bare Python
  loop, with 1 and 2 threads, which is what the kernel and blake3 alone cost;
- extraction's writer as it runs (`ShardWriter`: each shard's chunks written by `ChunkWriter` and hashed, then
  marked complete, on one of its threads), with 1, 2 and 4 threads;
- for scale, int8 quantization on the CPU (on a GPU it runs on the device, before the copy to the host).

img/s is wall-clock on this machine's cores; ms CPU per image is the process's CPU time (every thread, the
kernel's included) per image.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from bench.synthetic import new_store, synthetic_dataset
from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig
from vqt_cache.extraction import ShardWriter
from vqt_cache.formats import WRITERS
from vqt_cache.quantize import quantize
from vqt_cache.store import hash_rows, row_checksum


def _timed(work, n: int) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": n / wall, "ms_cpu_per_image": 1e3 * cpu / n}


def write_shards(images, values: torch.Tensor, scales: torch.Tensor, n: int, writers: int) -> None:
    """Write n rows (the batch repeated) through extraction's writer, shard by shard as `extract_shards` does."""
    final, valid = np.zeros((images.shard_size, images.features.shape[-1]), np.float32), None
    with ShardWriter(images, writers) as writer:
        for shard in range(images.num_shards):
            start, stop = images.shard_range(shard)
            for at in range(start, stop, len(values)):
                writer.submit(shard, at, values[: stop - at], scales[: stop - at])
            valid = np.ones(stop - start, np.uint8)
            writer.finish(shard, final[: stop - start], valid, None)
        writer.wait()


def run(quick: bool = False) -> list[dict]:
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    batch = 32
    values, scales = quantize(torch.randn(batch, backbone.depth, backbone.tokens, backbone.dim), "int8", 64)
    n = 256 if quick else 1024
    features = torch.randn(batch, backbone.depth, backbone.tokens, backbone.dim)
    quantizing = _timed(lambda: [quantize(features, "int8", 64) for _ in range(min(n, 256) // batch)], min(n, 256))
    rows = [{"bench": "host", "what": "int8 quantization on the CPU (a GPU quantizes on the device)", **quantizing}]
    v, s = values.numpy(), scales.numpy()
    for name, digest in (("blake3, format 4", lambda: row_checksum(4)), ("blake2b, format 3", lambda: row_checksum(3))):

        def hashing(digest=digest) -> None:
            d = digest()
            for _ in range(n // batch):
                hash_rows(d, v, s)

        rows.append({"bench": "host", "what": f"hash the rows for the shard checksum ({name})", **_timed(hashing, n)})
    return rows + writer_rows((1, 2, WRITERS), n, backbone, values, scales, before=True)


def writer_rows(
    counts: tuple[int, ...], n: int, backbone=None, values=None, scales=None, before: bool = False
) -> list[dict]:
    """Extraction's writer with each number of threads in `counts` (and, `before`, zarr's own writes as extraction
    made them before issue 32) writing n ViT-B/16 hidden int8 rows into a store in memory."""
    if backbone is None:
        torch.manual_seed(0)
        backbone = load_backbone("vit_b16", weights="random")
        values, scales = quantize(torch.randn(32, backbone.depth, backbone.tokens, backbone.dim), "int8", 64)
    batch, v, s = len(values), values.numpy(), scales.numpy()
    rows = []
    tmp = tempfile.mkdtemp(prefix="vqt-bench-host-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", layout="hidden", dtype="int8")
    dataset = synthetic_dataset(n)
    try:

        def through_zarr(images) -> None:  # before issue 32: zarr's writes on WRITERS threads, no hashing
            whole = {"write_empty_chunks": True}

            def write(at: int) -> None:
                images.features.with_config(whole)[at : at + batch] = v
                images.scales.with_config(whole)[at : at + batch] = s

            with ThreadPoolExecutor(WRITERS) as pool:
                list(pool.map(write, range(0, n, batch)))

        def floor(threads: int):  # the same files and hash with nothing of zarr's or ours: the kernel's share
            def work(images) -> None:
                folder = images.features.store_path.store.root / images.features.store_path.path

                def part(lo: int) -> None:
                    digest = row_checksum()
                    for at in range(lo, n, threads):
                        for name, data in (("floor-values", v[at % batch]), ("floor-scales", s[at % batch])):
                            path = folder / name / f"{at}" / "0"
                            path.parent.mkdir(parents=True, exist_ok=True)
                            temporary = path.with_suffix(".partial")
                            with open(temporary, "wb") as handle:
                                handle.write(data)
                            os.replace(temporary, path)
                            digest.update(data.reshape(-1).view(np.uint8))

                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(part, range(threads)))

            return work

        cases = []
        if before:
            cases.append((f"zarr's own chunk writes alone (before), {WRITERS} threads", through_zarr, None))
            for threads in (1, 2):
                what = f"floor: the same files written and hashed by a bare Python loop, {threads} thread(s)"
                cases.append((what, floor(threads), None))
        for writers in counts:
            what = f"extraction's writer: chunk writes + blake3 hash + shard marks, {writers} thread(s)"
            cases.append((what, lambda images, w=writers: write_shards(images, values, scales, n, w), writers))
        one = None
        for what, work, writers in cases:
            path = f"{tmp}/{len(rows)}.zarr"
            _, split = new_store(path, backbone, dataset, cfg)
            timed = _timed(lambda work=work, images=split.images: work(images), n)
            row = {"bench": "host", "what": f"{what}, store in memory", **timed}
            if writers == counts[0]:
                one = row["images_per_s"]
            if writers is not None:
                row[f"x_{counts[0]}_thread"] = row["images_per_s"] / one
            rows.append(row)
            shutil.rmtree(path)  # memory: a full /dev/shm slows every later write
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
