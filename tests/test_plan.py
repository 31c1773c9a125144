"""`vqt-cache plan` and the free-space check of extract: sizes before anything is written."""

import json
from pathlib import Path

import pytest

from vqt_cache import plan as plan_module
from vqt_cache.config import ExtractConfig
from vqt_cache.plan import plan_extract, plan_pipeline
from vqt_cache.store import image_bytes, open_store
from vqt_cache.sweep import load_pipeline

from conftest import GOOD_PIPELINE, TINY_EXTRACT, error_line, make_imagefolder, run_cli, tiny_extract_args

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train800", "val200", "train800val200")


def test_the_plan_of_an_extract_command_is_what_extract_writes(tmp_path):
    out = tmp_path / "s.zarr"
    cfg = ExtractConfig(**TINY_EXTRACT, dataset="digits", out=str(out), splits=SPLITS, layout="kv", dtype="float16")
    plan = plan_extract(cfg)
    assert [(s.name, s.images, s.cached, s.new_images) for s in plan.splits] == [
        ("train800", 800, True, 800),
        ("val200", 200, True, 200),
        ("train800val200", 1000, True, 0),  # its images are train800's and val200's, stored once
        ("test", 797, False, 0),
    ]
    assert not out.exists()  # nothing written
    code, text = run_cli(*tiny_extract_args(",".join(SPLITS)), "--out", str(out))
    assert code == 0, text
    store = open_store(str(out))
    layers = image_bytes(store.attrs["backbone"], "kv", "float16")
    chunks = [f for f in (out / "images" / "kv").rglob("*") if f.is_file() and f.name != "zarr.json"]
    on_disk = sum(f.stat().st_size for f in chunks)
    assert on_disk == 1000 * layers  # the plan's bytes per image, uncompressed, for each image once
    assert plan.total_bytes == 1000 * plan.bytes_per_image
    again = plan_extract(cfg)
    assert again.total_bytes == 0  # a complete store has nothing left to write


def test_a_pipeline_plan_caches_training_splits_and_evaluates_test_live(monkeypatch):
    plans = plan_pipeline(load_pipeline(REPO / "pipelines" / "vtab1k.toml"), "hidden", "int8")
    assert len(plans) == 19 and all(p.sizes_from == "published sizes" for p in plans)
    for p in plans:
        assert [(s.name, s.cached, s.new_images) for s in p.splits][:3] == [
            ("train800", True, 800),
            ("val200", True, 200),
            ("train800val200", True, 0),
        ]
        assert p.splits[3].name == "test" and not p.splits[3].cached
    total = sum(p.total_bytes for p in plans)
    assert total == 19 * 1000 * plans[0].bytes_per_image and total <= 40e9  # the goal for VTAB-1k
    from vqt_cache import estimate

    timed = []  # the forward's speed, once per architecture: fgvc's five datasets share ViT-B/16's
    monkeypatch.setattr(estimate, "forward_rate", lambda backbone, *_: timed.append(backbone.timm_name) or 100.0)
    code, out = run_cli("plan", str(REPO / "pipelines" / "fgvc.toml"), "--json")
    assert code == 0 and {p["dataset"] for p in json.loads(out)} >= {"fgvc/cub", "fgvc/nabirds"}
    assert len(json.loads(out)) == 5 and len(timed) == 1


def test_extract_refuses_a_store_that_cannot_fit_and_the_flag_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "free_space", lambda _url: 10**6)
    out = tmp_path / "s.zarr"
    line = error_line(*run_cli(*tiny_extract_args("val200"), "--out", str(out)))
    assert "but 1 MB are free" in line and "--no-space-check" in line  # sizes in the unit that shows them
    assert not out.exists()
    code, text = run_cli(*tiny_extract_args("val200"), "--out", str(out), "--no-space-check")
    assert code == 0, text
    code, text = run_cli("plan", "--dataset", "digits", "--splits", "val200", "--out", str(out))
    assert code == 0 and "to write: 0 B" in text


def test_new_stores_default_to_hidden_int8():
    code, out = run_cli("plan", "--dataset", "digits", "--json")
    [plan] = json.loads(out)
    assert code == 0 and (plan["layout"], plan["dtype"]) == ("hidden", "int8")


@pytest.mark.parametrize(
    "options",
    [
        ("--probes", "--dtype", "int8", "--layout", "hidden"),
        ("--dtype", "float32", "--layout", "hidden", "--codec", "zstd", "--shard-size", "16"),
        ("--probes", "--dtype", "float16", "--layout", "kv", "--val-fraction", "0.2", "--batch-size", "8"),
    ],
)
def test_plan_and_extract_agree_on_the_store_path_and_its_bytes(tmp_path, monkeypatch, options):
    """Plan takes every option of extract, with the same command line. The default path names the weights and
    model arguments; --probes adds its arrays; --val-fraction carves the split: plan sizes what extract writes,
    where extract writes it."""
    monkeypatch.chdir(tmp_path)
    if "--val-fraction" in options:  # an image folder without a validation split: its path names the folder
        splits, folder = "val", make_imagefolder(tmp_path / "images", per_class=8)
        args = tiny_extract_args(splits, *options, "--root", str(folder), dataset="imagefolder")[1:]
    else:
        splits = "val200"
        args = tiny_extract_args(splits, *options)[1:]
    code, text = run_cli("plan", *args, "--json")
    assert code == 0, text
    [planned] = json.loads(text)
    code, text = run_cli("extract", *args, "--json")
    assert code == 0, text
    [summary] = json.loads(text)["splits"]
    store = Path(planned["store"])
    assert store.name == "vit_tiny_patch16_224-random-depth=2-embed_dim=48-img_size=32-num_heads=3-patch_size=8.zarr"
    assert store.parent.name == ("imagefolder-images" if "--val-fraction" in options else "digits")
    assert bool(open_store(str(store)).attrs.get("probes")) == ("--probes" in options)
    import math

    import zarr

    images = zarr.open_group(str(store / "images"), mode="r")
    per_row = {  # every array with one row per image, uncompressed
        name: math.prod(a.shape[1:]) * a.dtype.itemsize
        for name, a in images.arrays()
        if name not in ("shard_done", "checksum")
    }
    if "--probes" in options:
        assert {"tokens", "class_tokens", "patch_mean"} <= set(per_row)
    assert sum(per_row.values()) == planned["bytes_per_image"]
    assert summary["bytes_written"] == summary["written"] * planned["bytes_per_image"]  # every array, probes too
    written = len(open_store(str(store)).split(splits).labels())
    assert [s["new_images"] for s in planned["splits"] if s["cached"]] == [written]


def test_a_pipeline_the_sweep_runs_is_planned_from_its_stores_when_the_dataset_cannot_be_opened(tmp_path, tiny_store):
    """A dataset name only its store knows (registered by the process that extracted it): plan reads the store,
    as the sweep does, instead of refusing the pipeline."""
    path = tmp_path / "own.toml"
    body = GOOD_PIPELINE.replace("STORE", tiny_store).replace("RUNS", str(tmp_path / "runs"))
    path.write_text(body.replace('name = "digits"', 'name = "my-own-data"'))
    code, text = run_cli("plan", str(path), "--json", "--no-time")
    assert code == 0, text
    [planned] = json.loads(text)
    assert planned["sizes_from"] == "store" and planned["store"] == tiny_store and planned["total_bytes"] == 0
    # sized by the store's own geometry (a tiny ViT), not by the pipeline's backbone name (vit_b16)
    from vqt_cache.store import open_store

    assert planned["bytes_per_image"] == open_store(tiny_store).stored_bytes_per_image()
    assert [(s["name"], s["images"], s["cached"]) for s in planned["splits"]] == [
        ("train800", 800, True),
        ("val200", 200, True),
    ]
    code, text = run_cli("plan", str(path))
    assert code == 0 and "my-own-data: not openable here; sizes are its store's" in text
    assert f"my-own-data: {tiny_store}" in text
    assert "plan: how long, measured on CPU" in text and "total: " in text  # timed on this device


def test_a_pipeline_whose_backbone_only_names_its_store_needs_the_store(tmp_path):
    path = tmp_path / "demo.toml"
    body = GOOD_PIPELINE.replace("STORE", str(tmp_path / "none.zarr")).replace("RUNS", str(tmp_path / "runs"))
    path.write_text('backbone = "tiny_vit_parity"\n' + body)
    line = error_line(*run_cli("plan", str(path)))
    assert "does not exist yet, and the pipeline's backbone 'tiny_vit_parity' is no model plan can size" in line
