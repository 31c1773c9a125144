"""Stores on object storage against local disk (issue 7): extraction and training throughput, side by side.

The object store is moto's S3 server in its own process on 127.0.0.1, reached through s3fs exactly as a real
bucket would be (credentials and endpoint from the environment). It measures what the S3 protocol costs this code
(one HTTP request per chunk, request signing, s3fs/aiobotocore), not a real network: against AWS add the
round-trip latency per request, which the concurrent reads below hide and sequential reads would not.

ViT-B/16 geometry, random weights, CPU, kv float16 (7.3 MB per image):
- extract: the same images through `extract_shards` into a local store and into s3://;
- write / read: the store API alone (no backbone), MB/s;
- train: `train` T=1 from a local and an s3:// store, in memory (load + epochs) and streamed batch by batch.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from bench.extraction import extract_rate
from bench.synthetic import new_store, synthetic_dataset, synthetic_store
from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig, RunSpec, TrainConfig
from vqt_cache.run_folder import read_timing
from vqt_cache.store import open_store
from vqt_cache.training import train


@contextmanager
def moto_bucket(name: str = "vqt-bench") -> Iterator[str]:
    """An S3 emulator (moto server, its own process) on a free port of 127.0.0.1; yields s3://<name>."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import fsspec.config
        import s3fs

        fsspec.config.set_conf_env(fsspec.config.conf)  # pick up FSSPEC_S3_* set after fsspec was imported
        s3fs.S3FileSystem.clear_instance_cache()
        deadline = time.monotonic() + 30
        while True:
            try:
                s3fs.S3FileSystem().mkdir(name)
                break
            except Exception:  # the server is still starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"s3://{name}"
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        fsspec.config.conf.pop("s3", None)


def run(quick: bool = False) -> list[dict]:
    n_extract = 16 if quick else 64
    n_train = 32 if quick else 128
    tmp = tempfile.mkdtemp(prefix="vqt-bench-s3-")
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    rows: list[dict] = []
    try:
        with moto_bucket() as bucket:
            places = {"local disk": tmp, "s3 (moto)": bucket}
            rates = {
                where: _extract_rate(f"{root}/extract.zarr", backbone, n_extract) for where, root in places.items()
            }
            rows += _compare("extract kv fp16, img/s", rates)
            io = {where: _store_io(f"{root}/io.zarr", backbone, n_train) for where, root in places.items()}
            rows += _compare("write kv fp16, MB/s", {w: r[0] for w, r in io.items()})
            rows += _compare("read random batches, image by image, MB/s", {w: r[1] for w, r in io.items()})
            rows += _compare("read random batches, one call each, MB/s", {w: r[2] for w, r in io.items()})
            stores = {where: f"{root}/train.zarr" for where, root in places.items()}
            for url in stores.values():
                synthetic_store(url, backbone, "kv", n_train)
            for mode, budget in (("in memory", None), ("streamed", 0)):
                results = {where: _train(url, f"{tmp}/run-{where}-{mode}", budget) for where, url in stores.items()}
                rows += _compare(f"train T=1 {mode}: load + 3 epochs, s", {w: r[0] for w, r in results.items()})
                rows += _compare(f"train T=1 {mode}: epochs, img/s", {w: r[1] for w, r in results.items()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _compare(what: str, values: dict[str, float]) -> list[dict]:
    local, s3 = values["local disk"], values["s3 (moto)"]
    return [{"bench": "object_storage", "what": what, "local": local, "s3": s3, "s3_over_local": s3 / local}]


def _extract_rate(url: str, backbone, n: int) -> float:
    cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", batch_size=32, shard_size=32, workers=0, out=url)
    return extract_rate(url, backbone, synthetic_dataset(n), cfg)


def _store_io(url: str, backbone, n: int) -> tuple[float, float, float]:
    """MB/s of the store API alone (kv float16, batches of 32): write, then random batches read image by image
    and read with one call each (which Zarr fetches concurrently)."""
    dataset = synthetic_dataset(n)
    cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", shard_size=32, out=url)
    _, split = new_store(url, backbone, dataset, cfg)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((16, *split.row_shape), dtype=np.float32).astype(np.float16)
    start = time.perf_counter()
    for s in range(0, n, len(block)):
        split.images.write_images(s, block[: min(len(block), n - s)])
    write = n * block[0].nbytes / (time.perf_counter() - start) / 1e6
    features = open_store(url).images.features
    batches = np.array_split(rng.permutation(n), max(n // 32, 1))
    start = time.perf_counter()
    for batch in batches:
        [features[int(i)] for i in batch]
    one_by_one = n * block[0].nbytes / (time.perf_counter() - start) / 1e6
    start = time.perf_counter()
    for batch in batches:
        features.get_orthogonal_selection(np.sort(batch))
    together = n * block[0].nbytes / (time.perf_counter() - start) / 1e6
    return write, one_by_one, together


def _train(store: str, out: str, budget: int | None) -> tuple[float, float]:
    """(wall seconds of `train`, loading included; training img/s from timing.json)."""
    start = time.perf_counter()
    train(
        TrainConfig(
            store=store,
            runs=(RunSpec("vqt", 1, 0.5, 1e-3, 0),),
            epochs=3,
            warmup_epochs=1,
            batch_size=64,
            out=out,
            eval_every=3,
            checkpoint_every=3,
            memory_budget=budget,
        )
    )
    wall = time.perf_counter() - start
    timing = read_timing(out)
    return wall, timing["train_images"] / timing["train_seconds"]
