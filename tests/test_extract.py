"""Stage one: exact round trips, resume, idempotence, torchrun, and the store's self-description."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vqt_cache.backbones import load_backbone
from vqt_cache.config import ExtractConfig
from vqt_cache.datasets import ImageSplit, open_dataset
from vqt_cache.errors import VQTError
from vqt_cache.extraction import extract
from vqt_cache.store import open_store

from conftest import TINY_EXTRACT, make_imagefolder, run_cli, tiny_extract_args

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path, name="s.zarr", **overrides) -> ExtractConfig:
    args = dict(
        TINY_EXTRACT,
        dataset="digits",
        splits=("val200",),
        out=str(tmp_path / name),
        workers=0,
        batch_size=16,
        shard_size=32,
        layout="kv",  # pinned: tests compare kv chunks
        dtype="float16",
    )
    return ExtractConfig(**{**args, **overrides})


def captured_from_model(cfg: ExtractConfig, split: str):
    """K/V, LN1 outputs and final features taken straight from timm's attention, independent of vqt_cache code."""
    backbone = load_backbone(cfg.backbone, weights=cfg.weights, **cfg.model_kwargs)
    dataset = open_dataset(cfg.dataset)
    store = open_store(cfg.store_url)
    images = torch.stack([x for x, _, _ in ImageSplit(dataset, dataset.split(split), store.attrs["preprocessing"])])
    kv, hidden = [], []

    def record(attn, args, _out):
        x = args[0]
        B, N, _ = x.shape
        hidden.append(x)
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # as timm does
        kv.append(torch.stack([attn.k_norm(qkv[1]), qkv[2]], dim=1))  # (B, 2, H, N, dh)

    hooks = [blk.attn.register_forward_hook(record) for blk in backbone.blocks]
    finals = []
    with torch.no_grad():
        for batch in images.split(cfg.batch_size):  # the batches extraction uses, so results match bit for bit
            finals.append(backbone.model.forward_head(backbone.model.forward_features(batch), pre_logits=True))
    for h in hooks:
        h.remove()
    L = len(backbone.blocks)
    per_batch = lambda xs: torch.cat([torch.stack(xs[i : i + L], 1) for i in range(0, len(xs), L)])  # noqa: E731
    return per_batch(kv).numpy(), per_batch(hidden).numpy(), torch.cat(finals).numpy()


@pytest.mark.parametrize("layout", ["kv", "hidden"])
def test_fp32_round_trip_is_exact(tmp_path, layout):
    cfg = config(tmp_path, layout=layout, dtype="float32")
    extract(cfg)
    kv, hidden, final = captured_from_model(cfg, "val200")
    split = open_store(cfg.store_url).split("val200")
    stored = split.load()[0]
    np.testing.assert_array_equal(stored, kv if layout == "kv" else hidden)
    np.testing.assert_array_equal(split.final(), final)
    assert split.labels().tolist() == [label for _, label in open_dataset("digits").split("val200")]
    assert split.valid().all()


def test_fp16_round_trip_within_half_precision(tmp_path):
    cfg = config(tmp_path, layout="kv", dtype="float16")
    extract(cfg)
    kv, _, _ = captured_from_model(cfg, "val200")
    stored = open_store(cfg.store_url).split("val200").load()[0]
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, kv.astype(np.float16))  # exactly the model's values, rounded once


def _same_store(a: str, b: str) -> None:
    sa, sb = open_store(a), open_store(b)
    assert sa.split_names() == sb.split_names()
    for name in ["images", *(f"splits/{split}" for split in sa.split_names())]:
        ga, gb = sa.group[name], sb.group[name]
        assert sorted(ga.array_keys()) == sorted(gb.array_keys())
        for array in ga.array_keys():
            np.testing.assert_array_equal(ga[array][:], gb[array][:], err_msg=f"{name}/{array}")
        assert dict(ga.attrs) == dict(gb.attrs)
    assert sa.weights().keys() == sb.weights().keys()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [64, 40], ids=["between-shards", "inside-a-shard"])
def test_resume_after_interruption_equals_one_run(tmp_path, stop_after):
    reference = config(tmp_path, "ref.zarr")
    extract(reference)
    cfg = config(tmp_path, "resumed.zarr")

    def interrupt(_split, done, _total):
        if done >= stop_after:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(cfg, progress=interrupt)
    split = open_store(cfg.store_url).split("val200", require_complete=False)
    finished = stop_after // 32  # shards of 32 images: the interrupted one is redone whole
    assert split.incomplete_shards() == list(range(finished, 7))
    with pytest.raises(VQTError, match="incomplete"):
        open_store(cfg.store_url).split("val200")
    seen = []
    summary = extract(cfg, progress=lambda s, done, total: seen.append((done, total)))
    assert seen[-1] == (200 - 32 * finished, 200 - 32 * finished)  # only the missing shards
    assert not summary.nothing_to_do
    _same_store(reference.store_url, cfg.store_url)


def test_rerun_over_complete_store_does_nothing(tmp_path):
    cfg = config(tmp_path)
    extract(cfg)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.store_url).rglob("*") if p.is_file()}
    assert extract(cfg).nothing_to_do
    after = {p: p.stat().st_mtime_ns for p in Path(cfg.store_url).rglob("*") if p.is_file()}
    assert before == after
    code, out = run_cli(
        "extract",
        "--backbone",
        cfg.backbone,
        "--dataset",
        "digits",
        "--splits",
        "val200",
        "--weights",
        "random",
        "--out",
        cfg.store_url,
        "--shard-size",
        "32",
        "--workers",
        "0",
        "--layout",
        "kv",
        "--dtype",
        "float16",
        *[f"--model-arg={k}={v}" for k, v in cfg.model_kwargs.items()],
    )
    assert code == 0 and "nothing to do" in out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layout": "hidden"}, "layout 'kv'"),
        ({"dtype": "float32"}, "dtype 'float16'"),
        ({"model_kwargs": {**TINY_EXTRACT["model_kwargs"], "depth": 3}}, "different backbone"),
        ({"resample": "torch"}, "preprocessing"),
        ({"precision": "bf16"}, "extracted with --precision float32"),
    ],
)
def test_mismatch_with_existing_store_is_refused(tmp_path, change, message):
    extract(config(tmp_path))
    with pytest.raises(VQTError, match=message):
        extract(config(tmp_path, **change))
    assert open_store(config(tmp_path).store_url).split("val200").complete  # untouched


def test_a_bf16_forward_is_recorded_checked_and_resumed_as_such(tmp_path):
    """--precision bf16: the store records it (covered by its metadata checksum, shown by info), its rows are the
    bf16 forward's, it resumes only as bf16, and float32 stores record nothing (their attributes are unchanged)."""
    from vqt_cache.backbones import backbone_from_weights
    from vqt_cache.datasets import reopen_dataset

    cfg = config(tmp_path, precision="bf16")
    extract(cfg)
    store = open_store(cfg.store_url)
    assert store.attrs["precision"] == "bf16" == store.forward_precision
    extract(config(tmp_path, "f.zarr"))
    assert "precision" not in open_store(str(tmp_path / "f.zarr")).attrs
    split = store.split("val200")
    backbone = backbone_from_weights(store.attrs["backbone"], store.weights())
    items = [(source, 0) for source in split.sources[:4]]
    dataset = reopen_dataset(store.attrs["dataset"])
    images = torch.stack([x for x, _, _ in ImageSplit(dataset, items, store.attrs["preprocessing"])])
    _, fresh = backbone.forward_cache(images, layout=store.layout, dtype=torch.float16, precision="bf16")
    assert torch.equal(torch.from_numpy(np.stack([split.row(i) for i in range(4)])), fresh)
    with pytest.raises(VQTError, match="extracted with --precision bf16: pass it"):
        extract(config(tmp_path, precision="float32", splits=("train800",)))
    code, out = run_cli("info", cfg.store_url)
    assert code == 0 and "forward    bf16" in out
    code, out = run_cli("verify", cfg.store_url, "--recompute", "4")
    assert code == 0 and "no faults" in out, out
    open_store(cfg.store_url, mode="r+").group.attrs["precision"] = "float32"  # edited: no longer what was hashed
    code, out = run_cli("verify", cfg.store_url)
    assert code == 2 and "damaged: its attributes (" in out and "precision) differ" in out, out


def test_newer_format_version_is_refused(tmp_path):
    cfg = config(tmp_path)
    extract(cfg)
    open_store(cfg.store_url, mode="r+").group.attrs["format_version"] = 99
    with pytest.raises(VQTError, match="format_version 99.*upgrade"):
        open_store(cfg.store_url)


def test_a_store_of_the_previous_format_gets_one_sentence_and_is_left_alone(tmp_path):
    cfg = config(tmp_path)
    extract(cfg)
    open_store(cfg.store_url, mode="r+").group.attrs["format_version"] = 2  # each split's images apart
    before = sorted((p, p.stat().st_mtime_ns) for p in Path(cfg.store_url).rglob("*"))
    for args in (["info", cfg.store_url], ["train", "--store", cfg.store_url], tiny_extract_args("val200")):
        code, out = run_cli(*args, *(["--out", cfg.store_url] if args[0] == "extract" else []))
        assert code == 2 and "format_version 2" in out and "re-extract" in out and "Traceback" not in out
    assert sorted((p, p.stat().st_mtime_ns) for p in Path(cfg.store_url).rglob("*")) == before


def test_store_is_self_describing(tmp_path):
    cfg = config(tmp_path, splits=("val200", "test"), codec="zstd")
    extract(cfg)
    code, out = run_cli("info", cfg.store_url, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["backbone"]["timm_name"] == "vit_tiny_patch16_224"
    assert info["backbone"]["depth"] == 2 and info["backbone"]["tokens"] == 17
    assert info["preprocessing"]["resize"] == "squash" and info["preprocessing"]["input_size"] == [3, 32, 32]
    assert info["dataset"]["num_classes"] == 10 and info["codec"] == "zstd"
    assert {s["name"]: s["images"] for s in info["splits"]} == {"test": 797, "val200": 200}
    assert all(s["complete"] for s in info["splits"])
    assert info["versions"]["zarr"].startswith("3.")
    code, out = run_cli("info", cfg.store_url)
    assert code == 0 and "val200" in out and "vit_tiny_patch16_224" in out
    # the store alone rebuilds the frozen backbone, bit for bit
    weights = open_store(cfg.store_url).weights()
    model = load_backbone(cfg.backbone, weights=cfg.weights, **cfg.model_kwargs).model
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(weights[k], v.numpy())


def test_imagefolder_end_to_end_with_odd_image_modes(tmp_path):
    from PIL import Image

    root = make_imagefolder(tmp_path / "imgs")
    Image.new("L", (20, 20), 128).save(root / "train" / "cat" / "gray.png")
    Image.new("CMYK", (20, 20), (10, 20, 30, 40)).save(root / "train" / "cat" / "cmyk.jpg")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(root / "train" / "dog" / "rgba.png")
    cfg = ExtractConfig(**TINY_EXTRACT, dataset="imagefolder", root=str(root), out=str(tmp_path / "f.zarr"), workers=0)
    extract(cfg)
    store = open_store(cfg.store_url)
    assert store.split_names() == ["test", "train"]
    train = store.split("train")
    assert train.num_samples == 18 and train.valid().all()
    assert "train/cat/gray.png" in train.sources
    assert store.attrs["dataset"]["class_names"] == ["cat", "dog", "owl"]


@pytest.mark.slow
def test_kill_9_then_resume_equals_one_run(tmp_path):
    args = tiny_extract_args("train800", "--shard-size", "32", "--batch-size", "16")
    cmd = [sys.executable, "-m", "vqt_cache", *args]
    subprocess.run([*cmd, "--out", str(tmp_path / "ref.zarr")], check=True, capture_output=True, cwd=REPO)
    out = str(tmp_path / "killed.zarr")
    proc = subprocess.Popen([*cmd, "--out", out], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once some shards are done
        done = Path(out, "images", "shard_done", "c")
        if done.exists() and len(list(done.iterdir())) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not open_store(out).split("train800", require_complete=False).complete
    subprocess.run([*cmd, "--out", out], check=True, capture_output=True, cwd=REPO)
    _same_store(str(tmp_path / "ref.zarr"), out)


def test_two_process_torchrun_equals_one_process(tmp_path):
    args = tiny_extract_args("val200", "--shard-size", "32", "--batch-size", "16", "--json")  # 7 shards, 2 ranks
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "vqt_cache",
    ]
    result = subprocess.run(
        [*torchrun, *args, "--out", str(tmp_path / "two.zarr")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    subprocess.run(
        [sys.executable, "-m", "vqt_cache", *args, "--out", str(tmp_path / "one.zarr")],
        check=True,
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    _same_store(str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr"))


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def test_an_image_two_splits_list_is_stored_once_and_trains_the_same(tmp_path):
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.training import train

    small = dict(dtype="float32", shard_size=64, batch_size=32)
    shared = config(tmp_path, "shared.zarr", splits=("train800", "val200", "train800val200"), **small)
    alone = config(tmp_path, "alone.zarr", splits=("train800val200", "val200"), **small)
    extract(shared)
    extract(alone)
    a, b = open_store(shared.store_url), open_store(alone.store_url)
    assert a.images.num_images == 1000 and b.images.num_images == 1000  # val200 lies inside train800val200
    parts = np.concatenate([a.split("train800").rows(), a.split("val200").rows()])
    np.testing.assert_array_equal(a.split("train800val200").rows(), parts)
    # the features on disk: the very same bytes, whether the union was listed as a split of its own or not
    assert _bytes_under(Path(shared.store_url, "images", "kv")) == _bytes_under(Path(alone.store_url, "images", "kv"))
    assert len(list(Path(shared.store_url, "images", "kv", "c").iterdir())) == 1000  # one chunk per image
    for name in ("train800val200", "val200"):
        np.testing.assert_array_equal(a.split(name).load()[0], b.split(name).load()[0])
        np.testing.assert_array_equal(a.split(name).labels(), b.split(name).labels())

    results = {}
    for store in (shared, alone):
        cfg = TrainConfig(
            store=store.store_url,
            runs=(RunSpec("vqt", 2, 0.5, 0.0, 3),),
            train_split="train800val200",
            eval_split="val200",
            epochs=2,
            warmup_epochs=1,
            out=str(tmp_path / Path(store.store_url).stem),
        )
        [run] = train(cfg)
        results[store.store_url] = json.loads(Path(run.dir, "metrics.json").read_text())["epochs"]
    first, second = results.values()
    assert first == second  # losses and accuracies, epoch by epoch


def test_a_split_added_later_reuses_the_images_the_store_holds(tmp_path):
    cfg = config(tmp_path, splits=("val200",))
    extract(cfg)
    before = open_store(cfg.store_url).images.num_rows
    summary = extract(config(tmp_path, splits=("train800val200",)))
    store = open_store(cfg.store_url)
    assert [s.written for s in summary.splits] == [800]  # only the images val200 did not bring
    assert store.images.block_stops == [before, 224 + 800]  # the new block starts on a shard boundary (32)
    union = store.split("train800val200")
    np.testing.assert_array_equal(union.rows()[800:], np.arange(200))  # val200's rows, not copies of them
    kv, _, _ = captured_from_model(config(tmp_path, dtype="float16"), "train800val200")
    np.testing.assert_array_equal(union.load()[0], kv.astype(np.float16))
    assert extract(config(tmp_path, splits=("train800val200", "val200"))).nothing_to_do


def test_a_table_grown_but_not_committed_reads_as_before_and_the_next_writer_undoes_it(tmp_path):
    """An extract adding images grows the arrays first, then commits: a reader in between, or after a kill, sees
    the committed rows only, and the next extract shrinks the uncommitted growth back before it appends."""
    from vqt_cache.verify import verify

    cfg = config(tmp_path)
    extract(cfg)
    before = open_store(cfg.store_url).split("val200").load()[0]
    images = open_store(cfg.store_url, mode="r+").images
    images._resize(images.num_rows + 64)  # what a kill between growing and committing leaves
    np.testing.assert_array_equal(open_store(cfg.store_url).split("val200").load()[0], before)
    assert verify(cfg.store_url)["faults"] == []
    extract(config(tmp_path, splits=("val200", "train800")))
    store = open_store(cfg.store_url)
    assert store.images.block_stops == [200, 224 + 800] and store.images.features.shape[0] == 1024
    assert verify(cfg.store_url)["faults"] == []


def test_a_version_3_store_is_read_resumed_and_verified_with_its_own_checksums(tmp_path):
    """Format 4 changed the shard checksums' hash (blake2b -> blake3). A version-3 store (made here by rewriting a
    new store's checksums with blake2b and its version to 3) still opens, verifies, trains and resumes as version 3."""
    from vqt_cache.store import shard_checksum

    out = tmp_path / "s.zarr"
    code, text = run_cli(*tiny_extract_args("val200"), "--out", str(out))
    assert code == 0, text
    store = open_store(str(out), mode="r+")
    images = store.images
    for shard in range(images.num_shards):
        start, stop = images.shard_range(shard)
        digest = hashlib.blake2b(digest_size=32)
        digest.update(np.ascontiguousarray(images.features[start:stop]))
        final, valid = (images.group[k][start:stop] for k in ("final", "valid"))
        images.group["checksum"][shard] = np.frombuffer(shard_checksum(digest.digest(), final, valid, 3), np.uint8)
    attrs = store.attrs
    store.group.attrs.put({**attrs, "format_version": 3})
    assert run_cli("verify", str(out))[0] == 0
    code, text = run_cli(*tiny_extract_args("train800"), "--out", str(out))  # resumed: new shards as version 3
    assert code == 0, text
    assert open_store(str(out)).attrs["format_version"] == 3
    code, text = run_cli("verify", str(out))
    assert code == 0 and "no faults" in text, text
    images.group["checksum"][0] = np.frombuffer(shard_checksum(b"x", final[:0], valid[:0], 3), np.uint8)
    assert run_cli("verify", str(out))[0] == 1  # and its checksums are really checked


@pytest.mark.parametrize(
    "layout, dtype, codec", [("hidden", "int8", "none"), ("kv", "float16", "zstd"), ("hidden", "float32", "blosc")]
)
def test_chunks_written_without_zarr_are_the_bytes_zarr_writes(tmp_path, monkeypatch, layout, dtype, codec):
    """Extraction writes a local store's image chunks itself (store/chunks.py), on its writer threads; the store is
    byte for byte the one zarr's own writes make, so the format and its checks are unchanged."""
    from vqt_cache.store import chunks

    settings = dict(layout=layout, dtype=dtype, codec=codec, splits=("val200",))
    direct = config(tmp_path, "direct.zarr", **settings)
    put, written = chunks._put, []
    monkeypatch.setattr(chunks, "_put", lambda path, data: written.append(path) or put(path, data))
    extract(direct)
    arrays = [Path(path).relative_to(direct.store_url).parts[1] for path in written]
    assert arrays.count(layout) == 200 and arrays.count("scale") == (200 if dtype == "int8" else 0)
    assert arrays.count("shard_done") == 7  # and each shard's final features, valid flags, checksum and flag
    monkeypatch.setattr(chunks, "LocalStore", type("NoStoreIsThis", (), {}))  # every chunk through zarr
    through_zarr = config(tmp_path, "zarr.zarr", **settings)
    extract(through_zarr)
    files = {}
    for root in (direct.store_url, through_zarr.store_url):
        files[root] = {p.relative_to(root): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}
    a, b = files.values()
    assert a.keys() == b.keys() and len(a) > 200  # one chunk per image, and no temporary file left
    assert [name for name in a if a[name] != b[name]] == []


@pytest.mark.parametrize("compressors", [None, "zstd"])
def test_arrays_read_without_zarr_are_the_arrays_zarr_reads(tmp_path, compressors):
    """store/chunks.read_whole (the frozen weights of every stage-two command) reads any chunking as zarr does:
    edge chunks, a missing chunk (the fill value), 0-d and 1-d arrays, a compressed chunk."""
    import zarr

    from vqt_cache.store.chunks import read_whole

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    rng = np.random.default_rng(0)
    cases = {
        "edges": ((50, 70), (16, 32), np.float32),
        "flat": ((33,), (33,), np.float16),
        "cube": ((5, 6, 7), (2, 6, 3), np.int8),
    }
    for name, (shape, chunks, dtype) in cases.items():
        kind = "auto" if compressors else None
        array = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=3, compressors=kind)
        array[...] = (rng.standard_normal(shape) * 50).astype(dtype)
    group["edges"][16:32, 32:64] = 3  # a chunk of only the fill value: zarr writes no file for it
    group.create_array("scalar", shape=(), dtype=np.float64)[...] = 2.5
    for name in [*cases, "scalar"]:
        array = zarr.open_array(str(tmp_path / "g.zarr" / name), mode="r")
        found, expected = read_whole(array), array[...]
        assert found.dtype == expected.dtype and found.shape == expected.shape and np.array_equal(found, expected)
    assert not (tmp_path / "g.zarr" / "edges" / "c" / "1" / "1").exists()  # the missing chunk was read as such


@pytest.mark.parametrize(("photo", "resize"), [(0, "squash"), (1, "timm"), ("8x8", "squash")])
def test_torch_resampling_is_pillows_geometry_and_nearly_its_pixels(photo, resize):
    """--resample torch: the same resize and crop as Pillow's transform (timm's for "timm"); torch's 8-bit
    antialiased bicubic kernel is Pillow's up to rounding, so on real photographs (scikit-learn's two sample JPEGs,
    and one shrunk to 8x8 and upsampled as the digits are) every pixel is within one 8-bit level of Pillow's and
    99.5% or more are equal (measured: 99.46-99.96%)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from vqt_cache.datasets import build_transform, preprocessing

    image = Image.fromarray(load_sample_images().images[0 if photo == "8x8" else photo])
    if photo == "8x8":
        image = image.resize((8, 8), Image.BICUBIC)
    data_config = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.25,) * 3,
                   "crop_pct": 0.875, "crop_mode": "center"}  # fmt: skip
    pillow = build_transform(preprocessing(data_config, resize))(image)
    torch_resampled = build_transform(preprocessing(data_config, resize, "torch"))(image)
    assert pillow.shape == torch_resampled.shape == (3, 224, 224)
    levels = ((torch_resampled - pillow) * 0.25 * 255).abs()  # back to 8-bit levels
    assert levels.max() <= 1 + 1e-4 and (levels < 0.5).float().mean() > 0.99
