"""Every GPU figure in one call (issue 24): `python -m bench gpu` on the machine with the GPU, under 8 minutes.

A VTAB-1k-sized task is made on disk (JPEG images in VTAB-1k's image-folder release layout: train800, val200,
train800val200 and a test set of 10,000 images, 10 classes), then measured through the command line as a user
runs it, each command in a fresh process on the first CUDA device (the CPU where there is none):

- extraction: `vqt-cache extract` of ViT-B/16 (random weights, hidden int8, the default) over the 1,000 training
  images, as it is and with `--precision bf16 --resample torch`, beside their bounds: a plain forward of
  preprocessed batches already on the device (float32, bf16 autocast), the data loader alone (decoding and
  preprocessing with the same workers; Pillow's resampling, torch's), the disk's sequential write bandwidth, and
  extraction's writer with 1 and 8 threads into a store in memory (the host's room for extraction, disk aside);
- stage two: `vqt-cache train` of one run (T = 1, 100 epochs on train800) and of a 20-run grid (5 lrs × 4 wds,
  batch 128), with the eager and the batched query path: ms per step (from timing.json), the epochs' seconds, and
  the command's seconds outside its epochs (start, imports, store, saving);
- live evaluation: `vqt-cache evaluate --live` of 5 runs over the test set, against the plain forward;
- the protocol: `vqt-cache sweep` of the task (20-point grid × 100 epochs, 5 seeds × 100 epochs, the live test).

A torch profiler trace of a few training steps of the grid is summarised (top kernels by device time, and the
share of the steps' wall time the device spent idle, waiting on the host) in bench/gpu_profile.md.
`--quick` (the CPU smoke run of the tests) uses a tiny ViT, a few images and 2 epochs: its figures are not results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.extraction import disk_write_MB_s
from bench.host import writer_rows
from vqt_cache.files import write_text
from vqt_cache.run_folder import read_timing

PROFILE = Path(__file__).parent / "gpu_profile.md"
TASK = "eurosat"  # a 10-class VTAB-1k task: its layout, with our own images
WORKERS = 8  # image decoding processes (the H200 machine has 16 cores)
WRITERS = 8  # extraction's writer threads there
VIT_B16 = ["--backbone", "vit_b16", "--weights", "random"]
TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--model-arg", "img_size=32"]
TINY += ["--model-arg", "patch_size=8", "--model-arg", "depth=2", "--model-arg", "embed_dim=48"]
TINY += ["--model-arg", "num_heads=3"]
GRID = ["--lr", "1.0,0.5,0.25,0.1,0.05", "--wd", "0.01,0.001,0.0001,0"]


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def vqt(*args: str) -> tuple[float, str]:
    """`vqt-cache ARGS` in a fresh process: (wall seconds, its standard output)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vqt_cache", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"vqt-cache {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def make_task(root: Path, train: int, val: int, test: int, size: int = 256) -> None:
    """A VTAB-1k task in its image-folder layout: smooth random JPEGs (about the size of real ones), 10 classes."""
    folder = root / TASK
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for i in range(train + val + test):
        coarse = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / "images" / f"{i}.jpg", quality=90)
        split = "train800" if i < train else "val200" if i < train + val else "test"
        lines[split].append(f"images/{i}.jpg {i % 10}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")


def forward_rates(quick: bool, device: torch.device, root: Path, workers: int) -> dict[str, float]:
    """img/s of a plain forward on batches already on the device (float32, and bf16 as extract --precision bf16
    runs it), and of the data loader alone (Pillow's resampling, and torch's)."""
    from vqt_cache.backbones import forward_autocast, load_backbone
    from vqt_cache.datasets import ImageSplit, open_dataset, preprocessing

    kwargs = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3) if quick else {}
    backbone = load_backbone("vit_tiny_patch16_224" if quick else "vit_b16", weights="random", **kwargs)
    model = backbone.model.to(device).eval()
    batch = torch.randn(32 if quick else 128, *backbone.data_config["input_size"], device=device)
    rates = {}
    for precision in ("float32", "bf16"):
        with torch.no_grad(), forward_autocast(device, precision):
            for _ in range(2):
                model.forward_features(batch)
            _sync(device)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < (1 if quick else 8):
                model.forward_features(batch)
                n += len(batch)
            _sync(device)
            rates[f"forward {precision}"] = n / (time.perf_counter() - start)
    dataset = open_dataset(f"vtab1k/{TASK}", root)
    items = dataset.split("test")
    for resample in ("pillow", "torch"):
        loader = torch.utils.data.DataLoader(
            ImageSplit(dataset, items, preprocessing(backbone.data_config, dataset.resize, resample)),
            batch_size=32,
            num_workers=workers,
        )
        start = time.perf_counter()
        for _ in loader:
            pass
        rates[f"loader {resample}"] = len(items) / (time.perf_counter() - start)
    return rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_rows(store: str, runs: Path, model: list[str], device: str, epochs: int, quick: bool) -> list[dict]:
    """One run and a 20-run grid through `vqt-cache train`, with each query path."""
    rows = []
    cases = (("1 run", [], 64), ("20-run grid", GRID, 128))
    for name, extra, batch in cases[1:] if quick else cases:  # the smoke run: the grid alone
        for path in ("eager", "batched"):
            out = runs / f"{name.replace(' ', '-')}-{path}"
            args = ["train", "--store", store, "--queries", "1", "--epochs", str(epochs), "--device", device]
            args += ["--warmup-epochs", str(max(epochs // 10, 1)), "--batch-size", str(batch), "--query-path", path]
            wall, _ = vqt(*args, *extra, "--out", str(out), "--json")
            folders = sorted(p.parent for p in out.glob("**/timing.json"))
            timing = read_timing(folders[0])
            steps = epochs * -(-timing["train_images"] // epochs // batch)
            rows.append(
                {
                    "bench": "gpu",
                    "what": f"train {name}, T=1, {epochs} epochs on {timing['train_images'] // epochs}, batch "
                    f"{batch}, {path} path",
                    "ms_per_step": 1e3 * timing["train_seconds"] / steps,
                    "epochs_s": timing["train_seconds"],
                    "outside_epochs_s": wall - timing["train_seconds"],
                    "wall_s": wall,
                }
            )
    return rows


def profile_grid(store: str, out: Path, device: str) -> tuple[list[dict], str]:
    """A 20-run grid's training steps under the torch profiler, for each query path: rows of aten operator calls
    per step (and, on a GPU, the device's idle share of the steps' wall time), and a summary with the top kernels."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.training import train

    lrs, wds = (1.0, 0.5, 0.25, 0.1, 0.05), (0.01, 0.001, 0.0001, 0.0)
    runs = tuple(RunSpec("vqt", 1, lr, wd, 0) for lr in lrs for wd in wds)
    on_device = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    active = 3
    rows, lines = [], [f"# Profile of a 20-run grid's training steps, T=1, batch 128 ({device_name()})", ""]
    for path in ("eager", "batched"):
        cfg = TrainConfig(
            store=store, runs=runs, epochs=6, warmup_epochs=1, batch_size=128, device=device, out=str(out / path),
            query_path=path, eval_split="none", checkpoint_every=100,
        )  # fmt: skip
        steps = schedule(wait=1, warmup=1, active=active, repeat=1)  # `train` reports progress once per step
        started: list[float] = []
        with profile(activities=activities, schedule=steps) as prof:

            def step(*_, prof=prof, started=started) -> None:
                prof.step()
                started.append(time.perf_counter())

            train(cfg, progress=step)
        wall = (started[2 + active] - started[2]) if len(started) > 2 + active else float("nan")
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / active
        row = {"bench": "gpu", "what": f"profiled step, 20-run grid, T=1, batch 128, {path} path", "aten_ops": ops}
        key = "self_device_time_total" if on_device else "self_cpu_time_total"
        lines += [f"## {path} query path: {ops:,.0f} aten operator calls per step, {1e3 * wall / active:.1f} ms", ""]
        if on_device:
            busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
            row["device_idle"] = 1 - busy / wall
            lines += [
                f"Device busy {busy:.3f} s of {wall:.3f} s: idle, waiting on the host, {row['device_idle']:.0%}.",
                "",
            ]
        rows.append(row)
        lines += ["```", events.table(sort_by=key, row_limit=15), "```", ""]
    return rows, "\n".join(lines)


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TINY if quick else VIT_B16
    workers = 0 if quick else WORKERS
    epochs = 2 if quick else 100
    train, val, test = (40, 10, 32) if quick else (800, 200, 10_000)
    tmp = Path(tempfile.mkdtemp(prefix="vqt-bench-gpu-"))
    rows: list[dict] = []
    try:
        make_task(tmp / "data", train, val, test, size=64 if quick else 256)
        bounds = forward_rates(quick, torch.device(device), tmp / "data", workers)
        store = str(tmp / "task.zarr")
        extract_args = ["extract", *model, "--dataset", f"vtab1k/{TASK}", "--root", str(tmp / "data")]
        extract_args += ["--splits", "train800,val200,train800val200", "--workers", str(workers)]
        extract_args += ["--writers", str(WRITERS)]
        extract_args += ["--device", device, "--batch-size", "128", "--json"]
        disk = disk_write_MB_s(str(tmp), 2**28 if quick else 2**30)
        measured = {
            "plain forward, float32, batches on the device": "forward float32",
            "plain forward, bf16 autocast, batches on the device": "forward bf16",
            f"data loader alone, {workers} workers": "loader pillow",
            f"data loader alone, {workers} workers, torch resampling": "loader torch",
        }
        rows += [{"bench": "gpu", "what": what, "img_s": bounds[key]} for what, key in measured.items()]
        for name, options, forward in (
            ("task.zarr", [], "forward float32"),
            ("task-bf16.zarr", ["--precision", "bf16", "--resample", "torch"], "forward bf16"),
        ):  # the first store serves the rest of the benchmark
            wall, out = vqt(*extract_args, *options, "--out", str(tmp / name))
            summary = json.loads(out)
            written = sum(s["written"] for s in summary["splits"])
            seconds = sum(s["seconds"] for s in summary["splits"])
            image_mb = summary["splits"][0]["bytes_written"] / max(summary["splits"][0]["written"], 1) / 1e6
            bound = min(bounds[forward], disk / image_mb)
            rows.append(
                {
                    "bench": "gpu",
                    "what": f"extract hidden int8 {' '.join(options)}, {written} images, {workers} workers",
                    "img_s": written / seconds,
                    "of_bound": written / seconds / bound,
                    "wall_s": wall,
                }
            )
        rows.append({"bench": "gpu", "what": "disk: sequential write, fsync'd", "MB_s": disk, "img_s": disk / image_mb})
        host = writer_rows((1, WRITERS), 64 if quick else 2048)  # the host's room for extraction, disk aside
        rows += [{"bench": "gpu", "what": r["what"], "img_s": r["images_per_s"]} for r in host]
        runs = tmp / "runs"
        rows += train_rows(store, runs, model, device, epochs, quick)
        finals = sorted(p.parent for p in (runs / "20-run-grid-batched").glob("*/timing.json"))[:5]
        wall, out = vqt("evaluate", *map(str, finals), "--split", "test", "--live", "--device", device,
                        "--workers", str(workers), "--json")  # fmt: skip
        images = json.loads(out)[0]["images"]
        rows.append(
            {
                "bench": "gpu",
                "what": f"evaluate 5 runs live over {images} test images, {workers} workers",
                "img_s": images / wall,
                "of_forward": images / wall / bounds["forward float32"],
                "wall_s": wall,
            }
        )
        pipeline = tmp / "protocol.toml"
        pipeline.write_text(
            f'name = "protocol"\nruns_root = "{tmp / "protocol"}"\nbaselines = []\n[protocol]\nepochs = {epochs}\n'
            f'warmup_epochs = {max(epochs // 10, 1)}\n[[datasets]]\nname = "vtab1k/{TASK}"\nstore = "{store}"\n'
            "queries = [1]\n"
        )  # the sweep runs on the first GPU where there is one (device auto); the live test reads the store's root
        wall, _ = vqt("sweep", str(pipeline))
        rows.append(
            {
                "bench": "gpu",
                "what": f"sweep of one task: 20-grid + 5 seeds × {epochs} epochs, live test of {test}",
                "wall_s": wall,
            }
        )
        profiled, summary = profile_grid(store, tmp / "profile", device)
        rows += profiled
        if not quick:
            write_text(PROFILE, summary)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{**row, "device": device_name()} for row in rows]
