"""Stage one: extraction throughput against a plain forward and against the disk, and store I/O per layout and
codec (issues 4 and 14).

ViT-B/16 geometry with random weights on CPU. Both timed loops run the same DataLoader over the same in-memory
images (decoding and preprocessing included in both), so the ratio isolates what extraction adds: capturing
K/V or LN1 outputs, casting or quantizing, and writing a real Zarr store on disk.

The disk: its sequential write bandwidth (1 GiB in 64 MiB blocks, fsync'd), measured in the same run, and what
extraction's writer (`ShardWriter`: shards written and hashed on WRITERS threads) sustains on the same
disk when fed real hidden int8 rows as fast as it takes them (a GPU's forward is faster than this disk), synced
at the end, with WRITERS threads and with one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from bench.host import write_shards
from bench.synthetic import new_store, synthetic_dataset
from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig
from vqt_cache.datasets import Dataset, ImageSplit
from vqt_cache.extraction import extract_shards
from vqt_cache.formats import CODECS, WRITERS
from vqt_cache.quantize import quantize


def extract_rate(url: str, backbone, dataset: Dataset, cfg: ExtractConfig) -> float:
    """images/s of `extract_shards` writing every image of the dataset into a new store at url, on the CPU."""
    attrs, split = new_store(url, backbone, dataset, cfg)
    start = time.perf_counter()
    extract_shards(
        backbone,
        split.images,
        dataset,
        split.shards(),
        attrs,
        cfg,
        torch.device("cpu"),
        lambda _n: None,
    )
    return len(dataset.split("train")) / (time.perf_counter() - start)


def run(quick: bool = False) -> list[dict]:
    n = 32 if quick else 64
    torch.manual_seed(0)
    backbone = load_backbone("vit_b16", weights="random")
    dataset = synthetic_dataset(n)
    tmp = tempfile.mkdtemp(prefix="vqt-bench-")
    rows = []
    try:
        cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", batch_size=32, shard_size=32, workers=0)
        attrs, _ = new_store(f"{tmp}/probe.zarr", backbone, dataset, cfg)
        loader = torch.utils.data.DataLoader(
            ImageSplit(dataset, dataset.split("train"), attrs["preprocessing"]),
            batch_size=cfg.batch_size,
            num_workers=0,
        )

        def plain_rate() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for images, _, _ in loader:
                    backbone.model.forward_features(images)
            return n / (time.perf_counter() - start)

        before = plain_rate()
        extracted = {}
        for layout, dtype in (("kv", "float16"), ("hidden", "float16"), ("hidden", "int8")):
            cfg_l = ExtractConfig(
                backbone="vit_b16",
                dataset="synthetic",
                layout=layout,
                dtype=dtype,
                batch_size=32,
                shard_size=32,
                workers=0,
            )
            extracted[layout, dtype] = extract_rate(f"{tmp}/{layout}-{dtype}.zarr", backbone, dataset, cfg_l)
        plain = (before + plain_rate()) / 2  # measured before and after the extractions: drift cancels
        what = "plain forward_features (mean of a run before and one after)"
        rows.append({"bench": "extract", "what": what, "images_per_s": plain, "ratio": 1.0})
        for (layout, dtype), ips in extracted.items():
            rows.append(
                {
                    "bench": "extract",
                    "what": f"extract {layout} {dtype} to disk",
                    "images_per_s": ips,
                    "ratio": ips / plain,
                }
            )
        rows += _disk(tmp, backbone, dataset, quick)
        rows += _store_io(tmp, backbone, dataset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def disk_write_MB_s(tmp: str, total: int = 2**30, block: int = 64 * 2**20) -> float:
    """Sequential write bandwidth of the disk under `tmp`: `total` bytes in `block`s, fsync'd, in MB/s."""
    data = os.urandom(block)
    path = f"{tmp}/disk-probe"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // block):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.unlink(path)
    return total / seconds / 1e6


def _disk(tmp: str, backbone, dataset, quick: bool) -> list[dict]:
    """The disk's bandwidth, and extraction's writer fed real hidden int8 rows as fast as it takes them."""
    disk = disk_write_MB_s(tmp, 2**29 if quick else 2**30)
    images = torch.stack([ImageSplit(dataset, dataset.split("train")[:16], _prep(backbone))[i][0] for i in range(16)])
    values, scales = quantize(backbone.forward_cache(images, layout="hidden")[1], "int8", 64)
    n = 256 if quick else 512
    rows = [{"bench": "extract", "what": "disk: sequential write, fsync'd", "MB_s": disk}]
    for writers in (WRITERS, 1):
        cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", layout="hidden", dtype="int8")
        _, split = new_store(f"{tmp}/writer-{writers}.zarr", backbone, synthetic_dataset(n), cfg)
        start = time.perf_counter()
        write_shards(split.images, values, scales, n, writers)
        os.sync()
        seconds = time.perf_counter() - start
        written = n * (values[0].nbytes + scales[0].nbytes) / 1e6
        rows.append(
            {
                "bench": "extract",
                "what": f"extraction's writer alone, hidden int8, {writers} writer thread(s) + hash, synced",
                "MB_s": written / seconds,
                "of_disk": written / seconds / disk,
                "images_per_s": n / seconds,
            }
        )
    return rows


def _store_io(tmp: str, backbone, dataset) -> list[dict]:
    """Write and random-batch read MB/s, and bytes per image, for each layout and codec (real ViT-B/16 outputs)."""
    rows = []
    images = torch.stack([ImageSplit(dataset, dataset.split("train")[:16], _prep(backbone))[i][0] for i in range(16)])
    outputs = {layout: backbone.forward_cache(images, layout=layout)[1].half().numpy() for layout in ("kv", "hidden")}
    n = len(dataset.split("train"))
    rng = np.random.default_rng(0)
    for layout, data in outputs.items():
        for codec in CODECS:
            cfg = ExtractConfig(backbone="vit_b16", dataset="synthetic", layout=layout, codec=codec, shard_size=32)
            _, split = new_store(f"{tmp}/{layout}-{codec}.zarr", backbone, dataset, cfg)
            rows_per_image = data.nbytes / len(data)
            start = time.perf_counter()
            for s in range(0, n, len(data)):
                split.images.write_images(s, data[: min(len(data), n - s)])
            write_s = time.perf_counter() - start
            order = rng.permutation(n)
            start = time.perf_counter()
            for batch in np.array_split(order, max(n // 32, 1)):  # stage two: random batches, read image by image
                np.stack([split.images.features[int(i)] for i in batch])
            read_s = time.perf_counter() - start
            stored = split.images.features.nbytes_stored()
            rows.append(
                {
                    "bench": "store_io",
                    "what": f"{layout} float16 {codec}",
                    "write_MB_s": n * rows_per_image / write_s / 1e6,
                    "random_read_MB_s": n * rows_per_image / read_s / 1e6,
                    "MB_per_image": stored / n / 1e6,
                    "compression": n * rows_per_image / stored,
                }
            )
    return rows


def _prep(backbone) -> dict:
    from vqt_cache.datasets import preprocessing

    return preprocessing(backbone.data_config, "timm")
