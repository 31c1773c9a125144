"""No selection on test, ever (issue 16): a store without a validation split is refused by `train` unless one is
carved at extraction (`--val-fraction`: seeded, stratified, recorded in the store), and a pipeline never selects on
the split it reports."""

import json
from collections import Counter
from pathlib import Path

import pytest

from vqt_cache.datasets import digits, with_validation
from vqt_cache.errors import VQTError
from vqt_cache.store import open_store

from conftest import error_line, make_imagefolder, run_cli, tiny_extract_args


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A train/test image folder with no validation split, as CUB's native layout or most folders are."""
    return make_imagefolder(tmp_path_factory.mktemp("images"), per_class=8)


def extract(folder: Path, out: Path, *options: str) -> None:
    args = tiny_extract_args(None, "--root", str(folder), "--out", str(out), *options, dataset="imagefolder")
    code, text = run_cli(*args)
    assert code == 0, text


def test_a_store_without_a_validation_split_is_never_evaluated_on_test(folder, tmp_path):
    store = tmp_path / "plain.zarr"
    extract(folder, store)
    assert open_store(str(store)).split_names() == ["test", "train"]
    args = ["--store", str(store), "--epochs", "2", "--warmup-epochs", "1"]
    line = error_line(*run_cli("train", *args, "--out", str(tmp_path / "run")))
    assert "no validation split" in line and "--val-fraction" in line
    assert not (tmp_path / "run").exists()
    # named explicitly, a split is what the user asked for
    code, out = run_cli("train", *args, "--eval-split", "none", "--out", str(tmp_path / "no-eval"))
    assert code == 0, out
    # carving one later changes train: the advice is a new store, not "leave out --val-fraction"
    options = ("--root", str(folder), "--out", str(store), "--val-fraction", "0.25")
    line = error_line(*run_cli(*tiny_extract_args(None, *options, dataset="imagefolder")))
    assert "extract with --val-fraction into a new --out" in line, line


def test_imagefolder_on_a_flat_class_folder_points_at_classfolder(folder, tmp_path):
    """<root>/<class>/<image> given as imagefolder: the advice names classfolder, not an empty split."""
    options = ("--root", str(folder / "train"), "--out", str(tmp_path / "s.zarr"))
    args = tiny_extract_args(None, *options, dataset="imagefolder")
    line = error_line(*run_cli(*args))
    assert "which --dataset classfolder reads" in line, line


def test_val_fraction_carves_a_seeded_stratified_validation_split_that_training_selects_on(folder, tmp_path):
    store = tmp_path / "carved.zarr"
    extract(folder, store, "--val-fraction", "0.25")
    opened = open_store(str(store))
    assert sorted(opened.split_names()) == ["test", "train", "trainval", "val"]
    assert opened.attrs["dataset"]["validation"] == {"from": "train", "fraction": 0.25, "seed": 0}
    splits = {name: opened.split(name) for name in ("train", "val", "trainval")}
    sources = {name: set(split.sources) for name, split in splits.items()}
    assert not sources["train"] & sources["val"] and sources["train"] | sources["val"] == sources["trainval"]
    assert Counter(splits["val"].labels().tolist()) == {0: 2, 1: 2, 2: 2}  # a quarter of each class's 8
    # stage two takes it as the validation split; a re-extraction carves the same images
    code, out = run_cli(
        "train",
        "--store",
        str(store),
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--json",
    )
    assert code == 0, out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["splits"] == {"train": "train", "eval": "val"}
    again = tmp_path / "again.zarr"
    extract(folder, again, "--val-fraction", "0.25")
    assert open_store(str(again)).split("val").sources == splits["val"].sources
    # live evaluation opens the dataset again and carves the same val split: the same accuracy as from the cache
    code, cached = run_cli("evaluate", str(tmp_path / "run"), "--split", "val", "--json")
    code_live, live = run_cli("evaluate", str(tmp_path / "run"), "--split", "val", "--live", "--json")
    assert code == code_live == 0
    assert json.loads(live)["images"] == 6 and json.loads(live)["top1"] == json.loads(cached)["top1"]


def test_val_fraction_is_refused_where_it_cannot_apply():
    with pytest.raises(VQTError, match="has a validation split"):
        with_validation(digits(), 0.1)  # val200 exists
    with pytest.raises(VQTError, match="between 0 and 1"):
        with_validation(digits(), 1.5)


def test_a_pipeline_never_selects_on_the_split_it_reports(tiny_store, tmp_path):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f'name = "p"\nruns_root = "{tmp_path}"\n[protocol]\nselect_eval = "test"\n'
        f'[[datasets]]\nname = "digits"\nstore = "{tiny_store}"\nqueries = [1]\n'
    )
    line = error_line(*run_cli("sweep", str(pipeline)))
    assert "select_eval 'test' is also its final_eval split" in line and "p.toml" in line


def test_a_flat_class_folder_gets_a_seeded_stratified_test_split(tmp_path):
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    make_imagefolder(tmp_path / "tmp", per_class=10, classes=("cat", "dog"), splits=("x",))
    for name in ("cat", "dog"):
        for f in (tmp_path / "tmp" / "x" / name).iterdir():
            f.rename(root / name / f.name)
    from vqt_cache.datasets import open_dataset

    first, again = open_dataset("classfolder", root), open_dataset("classfolder", root)
    assert first.splits == again.splits and first.class_names == ["cat", "dog"]
    assert Counter(label for _, label in first.split("test")) == {0: 2, 1: 2}
    assert not {s for s, _ in first.split("train")} & {s for s, _ in first.split("test")}
    store = tmp_path / "pets.zarr"
    options = ("--root", str(root), "--out", str(store), "--val-fraction", "0.25")
    code, out = run_cli(*tiny_extract_args(None, *options, dataset="classfolder"))
    assert code == 0, out
    assert sorted(open_store(str(store)).split_names()) == ["test", "train", "trainval", "val"]


def test_fgvc_classes_are_named_after_their_folders(tmp_path):
    from vqt_cache.datasets import open_dataset

    root = tmp_path / "dogs"
    root.mkdir()
    mapping = {"n02085620-Chihuahua/a.jpg": 0, "n02085782-Japanese_spaniel/b.jpg": 1}  # as VPT releases them
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(json.dumps(mapping))
    assert open_dataset("fgvc/stanforddogs", root).class_names == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]


def test_every_layout_with_a_validation_split_has_trainval(tmp_path):
    """The paper's final step trains on train + val: an image folder with its own val split offers `trainval`, as a
    carved one does (and FGVC's release, and any Dataset with train and val)."""
    from vqt_cache.datasets import Dataset, open_dataset

    root = make_imagefolder(tmp_path / "imgs", per_class=3, splits=("train", "val", "test"))
    data = open_dataset("imagefolder", root)
    assert data.split("trainval") == data.split("train") + data.split("val")
    assert "trainval" not in open_dataset("imagefolder", make_imagefolder(tmp_path / "plain", per_class=3)).splits
    mine = Dataset("mine", None, ["a"], {"train": [("0", 0)], "validation": [("1", 0)]}, loader=lambda s: None)
    assert mine.splits["trainval"] == [("0", 0), ("1", 0)]
    store = tmp_path / "s.zarr"
    options = ("--root", str(root), "--out", str(store))
    code, out = run_cli(*tiny_extract_args("train,val,trainval", *options, dataset="imagefolder"))
    assert code == 0, out
    assert len(open_store(str(store)).split("trainval").sources) == 2 * 3 * 3
