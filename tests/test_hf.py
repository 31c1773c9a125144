"""Hugging Face `datasets` from local disk (issue 16): a saved dataset or parquet files extract like any folder."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from vqt_cache.store import open_store

from conftest import error_line, run_cli, tiny_extract_args

hf = pytest.importorskip("datasets")


def saved(root: Path) -> hf.DatasetDict:
    from PIL import Image

    rng = np.random.default_rng(0)
    features = hf.Features({"img": hf.Image(), "fine": hf.ClassLabel(names=["ant", "bee", "cat"])})

    def split(n: int) -> hf.Dataset:
        images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]
        return hf.Dataset.from_dict({"img": images, "fine": [i % 3 for i in range(n)]}, features=features)

    data = hf.DatasetDict({"train": split(12), "test": split(6)})
    data.save_to_disk(str(root / "saved"))
    (root / "parquet" / "data").mkdir(parents=True)
    (root / "arrow" / "data").mkdir(parents=True)
    for name, part in data.items():
        part.to_parquet(str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
        [arrow] = (root / "saved" / name).glob("*.arrow")  # the raw arrow file, without save_to_disk's json
        shutil.copy(arrow, root / "arrow" / "data" / f"{name}-00000-of-00001.arrow")
    return data


@pytest.mark.parametrize("layout", ["saved", "parquet", "arrow"])
def test_a_hugging_face_dataset_on_disk_extracts_with_its_class_names(tmp_path, layout):
    data = saved(tmp_path)
    out = tmp_path / "s.zarr"
    options = ("--root", str(tmp_path / layout), "--out", str(out), "--image-column", "img", "--label-column", "fine")
    code, text = run_cli(*tiny_extract_args(None, *options, "--val-fraction", "0.25", dataset="hf"))
    assert code == 0, text
    store = open_store(str(out))
    assert store.attrs["dataset"]["class_names"] == ["ant", "bee", "cat"]
    assert store.attrs["dataset"]["columns"] == {"image": "img", "label": "fine"}
    assert sorted(store.split_names()) == ["test", "train", "trainval", "val"]
    assert store.split("test").labels().tolist() == data["test"]["fine"]
    assert len(store.split("val").labels()) == 3  # a quarter of 12, one per class
    # live evaluation opens the dataset again, with the recorded columns and the carved validation split
    run = tmp_path / "run"
    code, text = run_cli("train", "--store", str(out), "--epochs", "2", "--warmup-epochs", "1", "--out", str(run))
    assert code == 0, text
    code, cached = run_cli("evaluate", str(run), "--split", "test", "--json")
    code_live, live = run_cli("evaluate", str(run), "--split", "test", "--live", "--json")
    assert code == code_live == 0 and '"images": 6' in live


def test_missing_columns_are_named(tmp_path):
    saved(tmp_path)
    args = tiny_extract_args(None, "--root", str(tmp_path / "saved"), "--out", str(tmp_path / "s.zarr"), dataset="hf")
    line = error_line(*run_cli(*args))
    assert "no column 'image'" in line and "img, fine" in line and "--image-column" in line


def _resave(root: Path, change=None) -> None:
    """Load a saved dataset and save it again at the same path (changed by `change`, if given)."""
    data = hf.load_from_disk(str(root))
    data = change(data) if change else data
    data.save_to_disk(str(root.with_name("resaved")))
    del data
    shutil.rmtree(root)
    root.with_name("resaved").rename(root)


def test_a_dataset_saved_again_unchanged_is_the_same_dataset_and_a_changed_one_is_not(tmp_path):
    """Identity by content, not by save: re-saving keeps the store usable; two more test rows are noticed by
    extract and by live evaluation, which name the split."""
    saved(tmp_path)
    root, out, run = tmp_path / "saved", tmp_path / "s.zarr", tmp_path / "run"
    options = ("--root", str(root), "--out", str(out), "--image-column", "img", "--label-column", "fine")
    code, text = run_cli(*tiny_extract_args("train", *options, dataset="hf"))
    assert code == 0, text
    code, text = run_cli("train", "--store", str(out), "--epochs", "2", "--warmup-epochs", "1", "--eval-split", "none",
                         "--out", str(run))  # fmt: skip
    assert code == 0, text
    _resave(root)
    code, text = run_cli(*tiny_extract_args("train", *options, dataset="hf"))
    assert code == 0 and "nothing to do" in text, text
    code, text = run_cli("evaluate", str(run), "--split", "test", "--live", "--json")
    assert code == 0 and '"images": 6' in text, text

    def two_more(data):
        data["test"] = hf.concatenate_datasets([data["test"], data["test"].select([0, 1])])
        return data

    _resave(root, two_more)
    line = error_line(*run_cli("evaluate", str(run), "--split", "test", "--live"))
    assert "has changed since the store was extracted (split 'test' differs)" in line
    line = error_line(*run_cli(*tiny_extract_args("test", *options, dataset="hf")))
    assert "the dataset's content differs" in line
