"""Bad input to `vqt-cache extract`: one clear sentence naming the culprit, exit code 2, nothing stored is lost."""

import numpy as np
import pytest
from PIL import Image

from vqt_cache.store import open_store

from conftest import error_line, make_imagefolder, run_cli, tiny_extract_args


def extract_cli(dataset: str, root, out, *extra: str) -> tuple[int, str]:
    options = ["--root", str(root), "--out", str(out), "--shard-size", "4", "--batch-size", "4", *extra]
    return run_cli(*tiny_extract_args(None, *options, dataset=dataset))


def assert_one_sentence(code: int, out: str, *needles: str) -> None:
    line = error_line(code, out)  # one sentence, on one line
    for needle in needles:
        assert needle in line, out


def make_vtab(root, task="patch_camelyon", n=6, labels=None):
    task_root = root / task
    (task_root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(task_root / "images" / f"{i}.png")
        lines.append(f"images/{i}.png {labels[i] if labels else i % 2}")
    for split in ("train800", "val200", "train800val200", "test"):
        (task_root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return task_root


def test_unknown_dataset(tmp_path):
    assert_one_sentence(*extract_cli("mnist", tmp_path, tmp_path / "s.zarr"), "unknown dataset 'mnist'")


def test_missing_root(tmp_path):
    assert_one_sentence(*extract_cli("cub", tmp_path / "nowhere", tmp_path / "s.zarr"), "nowhere does not exist")


def test_missing_split_file(tmp_path):
    (make_vtab(tmp_path) / "test.txt").unlink()
    code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, tmp_path / "s.zarr")
    assert_one_sentence(code, out, "test.txt does not exist")


def test_label_out_of_range(tmp_path):
    make_vtab(tmp_path, labels=[0, 1, 0, 7, 1, 0])
    code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, tmp_path / "s.zarr")
    assert_one_sentence(code, out, "label 7 of images/3.png", "outside 0..1")


def test_empty_split(tmp_path):
    (make_vtab(tmp_path) / "val200.txt").write_text("")
    code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, tmp_path / "s.zarr")
    assert_one_sentence(code, out, "split 'val200'", "is empty")


def test_unknown_split(tmp_path):
    make_vtab(tmp_path)
    code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, tmp_path / "s.zarr", "--splits", "train")
    assert_one_sentence(code, out, "no split 'train'")


def test_unknown_option_values(tmp_path):
    make_vtab(tmp_path)
    for option, value in (("--layout", "qkv"), ("--dtype", "int4"), ("--codec", "lzma"), ("--on-bad-image", "x")):
        code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, tmp_path / "s.zarr", option, value)
        assert_one_sentence(code, out, repr(value))
    assert not (tmp_path / "s.zarr").exists()


BAD_IMAGES = {
    "zero-byte": b"",
    "garbage": b"this is not an image at all",
    "truncated": None,  # the first 100 bytes of a real PNG
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_fails_naming_the_file_and_keeps_finished_shards(tmp_path, kind):
    root = make_imagefolder(tmp_path / "imgs", per_class=4, classes=("a", "b"), splits=("train",))
    bad = root / "train" / "b" / "2.png"  # 7th of 8 images: the first shard (4 images) is finished before it
    bad.write_bytes(BAD_IMAGES[kind] if BAD_IMAGES[kind] is not None else bad.read_bytes()[:100])
    out_path = tmp_path / "s.zarr"
    code, out = extract_cli("imagefolder", root, out_path)
    assert_one_sentence(code, out, "b/2.png", "--on-bad-image skip")
    split = open_store(str(out_path)).split("train", require_complete=False)
    assert split.shards() == [0, 1] and split.incomplete_shards() == [1]
    # fixed image, same command: resumes and completes
    Image.new("RGB", (20, 20), (5, 6, 7)).save(bad)
    code, out = extract_cli("imagefolder", root, out_path)
    assert code == 0, out
    assert open_store(str(out_path)).split("train").complete


def test_bad_image_skip_is_recorded(tmp_path):
    root = make_imagefolder(tmp_path / "imgs", per_class=4, classes=("a", "b"), splits=("train",))
    (root / "train" / "a" / "1.png").write_bytes(b"")
    out_path = tmp_path / "s.zarr"
    code, out = extract_cli("imagefolder", root, out_path, "--on-bad-image", "skip")
    assert code == 0, out
    assert "skipped unreadable image train/a/1.png" in " ".join(out.split())
    split = open_store(str(out_path)).split("train")
    assert split.valid().tolist() == [True, False, True, True, True, True, True, True]
    assert not split.row(1).any()  # a skipped row stays zero
    code, out = run_cli("info", str(out_path), "--json")
    assert '"train/a/1.png"' in out


def test_unwritable_output_is_one_sentence(tmp_path):
    make_vtab(tmp_path)
    code, out = extract_cli("vtab1k/patch_camelyon", tmp_path, "/proc/vqt-cache-test/s.zarr")
    assert "/proc/vqt-cache-test" in error_line(code, out)
