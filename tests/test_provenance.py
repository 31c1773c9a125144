"""Where a store's weights came from is recorded and shown (issue 16): random with its seed, a file with its path and
sha256; default store paths say what makes two stores differ."""

import hashlib
import json
from pathlib import Path

import torch

from vqt_cache.backbones import load_backbone
from vqt_cache.store import open_store

from conftest import TINY_EXTRACT, make_imagefolder, run_cli, tiny_extract_args

KWARGS_IN_NAME = "depth=2-embed_dim=48-img_size=32-num_heads=3-patch_size=8"


def extract(*options: str, dataset: str = "digits", splits: str | None = "val200") -> str:
    code, out = run_cli(*tiny_extract_args(splits, *options, dataset=dataset), "--json")
    assert code == 0, out
    return json.loads(out)["store"]


def test_random_weights_are_recorded_shown_and_named(tmp_path):
    store = extract("--cache-root", str(tmp_path))
    assert store == str(tmp_path / "digits" / f"{TINY_EXTRACT['backbone']}-random-{KWARGS_IN_NAME}.zarr")
    assert open_store(store).attrs["backbone"]["weights"] == {"source": "random", "seed": 0}
    code, out = run_cli("info", store)
    assert code == 0 and "weights    random (seed 0)" in out
    code, out = run_cli("train", "--store", store, "--train-split", "val200", "--eval-split", "val200",
                        "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 0, out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["store"]["weights"] == {"source": "random", "seed": 0}


def test_a_weights_file_is_recorded_with_its_path_and_sha256(tmp_path):
    torch.manual_seed(3)
    source = load_backbone(TINY_EXTRACT["backbone"], weights="random", **TINY_EXTRACT["model_kwargs"])
    path = tmp_path / "my-weights.pth"
    torch.save(source.model.state_dict(), path)
    args = [a for a in tiny_extract_args("val200") if a != "random"]
    args[args.index("--weights") + 1 : args.index("--weights") + 1] = [str(path)]
    code, out = run_cli(*args, "--cache-root", str(tmp_path), "--json")
    assert code == 0, out
    store = json.loads(out)["store"]
    assert Path(store).name == f"{TINY_EXTRACT['backbone']}-my-weights-{KWARGS_IN_NAME}.zarr"
    recorded = open_store(store).attrs["backbone"]["weights"]
    assert recorded == {"source": "file", "path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    code, out = run_cli("info", store)
    assert code == 0 and f"file {path}" in out


def test_image_folders_of_different_names_get_different_default_stores(tmp_path):
    stores = []
    for name in ("birds", "flowers"):
        root = make_imagefolder(tmp_path / name, per_class=1)
        stores.append(extract("--root", str(root), "--cache-root", str(tmp_path / "cache"), dataset="imagefolder",
                              splits=None))  # fmt: skip
    assert [Path(s).parent.name for s in stores] == ["imagefolder-birds", "imagefolder-flowers"]


def test_a_run_finds_its_store_from_any_directory_and_follows_a_moved_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = extract("--out", "s.zarr")  # relative, as typed
    code, out = run_cli("train", "--store", store, "--train-split", "val200", "--eval-split", "val200",
                        "--epochs", "2", "--warmup-epochs", "1", "--out", "run")  # fmt: skip
    assert code == 0, out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["store"]["url"] == str(tmp_path / "s.zarr")  # recorded absolute
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out = run_cli("evaluate", str(tmp_path / "run"), "--split", "val200")
    assert code == 0, out
    (tmp_path / "s.zarr").rename(tmp_path / "moved.zarr")
    code, out = run_cli("compress", str(tmp_path / "run"), "--store", str(tmp_path / "moved.zarr"), "--keep", "0.5")
    assert code == 0, out
