"""No silently wrong number (issue 23): a store holds one dataset, labels follow class names, every tensor read is
checked, a refusal writes nothing, and reports compare like with like.

Each test goes through the CLI on small data and asserts the promise: the refusal is one `error:` line naming the
reason, and the store or run folder is byte-identical afterwards; or the result is the right one.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqt_cache.backbones import load_backbone
from vqt_cache.datasets import reopen_dataset
from vqt_cache.store import default_store_path, open_store

from conftest import TINY_EXTRACT, error_line, make_imagefolder, run_cli, tiny_extract_args

TRAIN = ["--epochs", "2", "--warmup-epochs", "1", "--queries", "1"]


def contents(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: equal before and after means nothing was written."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def extract(dataset: str, root: Path, out: Path, splits: str | None, *options: str) -> tuple[int, str]:
    return run_cli(*tiny_extract_args(splits, "--root", str(root), "--out", str(out), *options, dataset=dataset))


def add_image(folder: Path, name: str, seed: int = 5) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / name)


def make_classfolder(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """A flat <root>/<class>/<image> folder of random PNGs."""
    for c in classes:
        for i in range(per_class):
            add_image(root / c, f"{i}.png", seed=hash((c, i)) % 1000)
    return root


# -- 1. a store holds one dataset ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        dict(classes=("cat", "dog", "owl")),  # the same classes in another folder
        dict(classes=("ant", "bee")),  # other classes
    ],
)
def test_a_split_of_another_folder_is_refused_and_the_store_is_unchanged(tmp_path, other):
    make_imagefolder(tmp_path / "a", per_class=2)
    make_imagefolder(tmp_path / "b", per_class=2, **other)
    out = tmp_path / "s.zarr"
    code, text = extract("imagefolder", tmp_path / "a", out, "train")
    assert code == 0, text
    before = contents(out)
    line = error_line(*extract("imagefolder", tmp_path / "b", out, "test"))
    assert "holds one dataset" in line and str(tmp_path / "a") in line
    assert contents(out) == before


def test_a_class_folder_that_gained_a_class_is_another_dataset(tmp_path):
    make_imagefolder(tmp_path / "a", per_class=2)
    out = tmp_path / "s.zarr"
    assert extract("imagefolder", tmp_path / "a", out, "train")[0] == 0
    before = contents(out)
    add_image(tmp_path / "a" / "test" / "yak", "0.png")
    line = error_line(*extract("imagefolder", tmp_path / "a", out, "test"))
    assert "3 classes differ from the 4" in line and "holds one dataset" in line
    assert contents(out) == before


def test_default_store_paths_name_the_folder_of_every_folder_kind():
    for kind in ("imagefolder", "classfolder", "hf"):
        assert default_store_path("c", kind, "vit", root="/data/food") == f"c/{kind}-food/vit.zarr"


# -- 4. a refusal writes nothing -------------------------------------------------------------------------------------


def test_a_refused_extract_leaves_the_store_unchanged(tmp_path):
    """A class folder gained an image: its carved train split differs, so the extract is refused; the new test split
    it would have written first is not written."""
    root = make_classfolder(tmp_path / "flat", ("cat", "dog"), 10)
    out = tmp_path / "s.zarr"
    code, text = extract("classfolder", root, out, "train,val", "--val-fraction", "0.25")
    assert code == 0, text
    before = contents(out)
    add_image(root / "cat", "new.png")
    line = error_line(*extract("classfolder", root, out, None, "--val-fraction", "0.25"))
    assert "lists other images" in line
    assert contents(out) == before
    assert sorted(open_store(str(out)).split_names()) == ["train", "val"]


def test_int8_features_beyond_float16_scales_are_refused_with_advice_that_works(tmp_path):
    torch.manual_seed(3)
    source = load_backbone(TINY_EXTRACT["backbone"], weights="random", **TINY_EXTRACT["model_kwargs"])
    state = source.model.state_dict()
    state["blocks.0.norm1.weight"] *= 1e8  # LN1 outputs of 1e8: finite in float32, a float16 scale of 8e5 is not
    weights = tmp_path / "huge.pth"
    torch.save(state, weights)

    def args(dtype: str, out: str) -> list[str]:
        chosen = tiny_extract_args("val200", "--layout", "hidden", "--dtype", dtype, "--out", str(tmp_path / out))
        chosen[chosen.index("--weights") + 1] = str(weights)
        return chosen

    line = error_line(*run_cli(*args("int8", "s.zarr")))
    assert "too large for int8" in line and "--dtype float32 into another --out" in line
    code, text = run_cli(*args("float32", "f32.zarr"))  # the advice works
    assert code == 0, text


# -- 2. labels follow names ------------------------------------------------------------------------------------------


def test_live_labels_follow_the_stores_class_names_after_the_training_folders_are_gone(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=3, classes=("ant", "bee", "cat", "dog"))
    out = tmp_path / "s.zarr"
    code, text = extract("imagefolder", root, out, "train,test")
    assert code == 0, text
    store = open_store(str(out))
    cached = dict(zip(store.split("test").sources, store.split("test").labels().tolist(), strict=True))
    shutil.move(root / "train", tmp_path / "elsewhere")  # the point of a cache
    shutil.rmtree(root / "test" / "ant")  # and one test class is gone: every later label would shift by one
    live = dict(reopen_dataset(store.attrs["dataset"]).split("test"))
    assert live and live == {source: label for source, label in cached.items() if "/ant/" not in source}
    # through the CLI: the live evaluation scores the remaining images with the store's labels
    run = tmp_path / "run"
    code, text = run_cli(
        "train", "--store", str(out), "--train-split", "train", "--eval-split", "none", *TRAIN, "--out", str(run)
    )
    assert code == 0, text
    code, text = run_cli("evaluate", str(run), "--split", "test", "--live", "--json")
    assert code == 0, text
    assert json.loads(text)["images"] == 9


def test_a_live_split_with_a_class_the_store_does_not_know_is_refused(tmp_path):
    root = make_imagefolder(tmp_path / "data", per_class=2)
    out = tmp_path / "s.zarr"
    assert extract("imagefolder", root, out, "train")[0] == 0
    run = tmp_path / "run"
    code, text = run_cli("train", "--store", str(out), "--eval-split", "none", *TRAIN, "--out", str(run))
    assert code == 0, text
    add_image(root / "test" / "zebra", "0.png")
    line = error_line(*run_cli("evaluate", str(run), "--split", "test", "--live"))
    assert "'zebra'" in line and "not one of the store's 3 classes" in line
    assert not (run / "eval" / "test.json").exists()


def test_class_listings_skip_hidden_and_empty_folders_and_refuse_a_linked_one(tmp_path):
    root = make_classfolder(tmp_path / "flat", ("cat", "dog"), 5)
    add_image(root / ".git", "0.png")  # hidden: no class
    (root / "empty").mkdir()  # no images: no class
    add_image(root / "dog", "._0.png")  # a hidden file (macOS's companion files): no image
    out = tmp_path / "s.zarr"
    code, text = extract("classfolder", root, out, "train")
    assert code == 0, text
    dataset = open_store(str(out)).attrs["dataset"]
    assert dataset["class_names"] == ["cat", "dog"]
    assert all("._" not in s for s in open_store(str(out)).split("train").sources)
    (root / "kitten").symlink_to(root / "cat")  # the same images under a second label
    line = error_line(*extract("classfolder", root, tmp_path / "t.zarr", "train"))
    assert "'cat' and 'kitten'" in line and "one folder" in line
    assert not (tmp_path / "t.zarr").exists()


# -- 3. everything read is checked -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_store) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    code, text = run_cli("train", "--store", tiny_store, *TRAIN, "--out", str(run))
    assert code == 0, text
    return run


def _altered(path: Path, name: str, change) -> None:
    """Rewrite a safetensors file with one tensor changed, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load(path.read_bytes())
    change(tensors[name])
    path.write_bytes(save(tensors, metadata=metadata))


@pytest.mark.parametrize(
    "damage",
    ["one value", "nan", "truncated", "empty"],
)
def test_an_altered_model_file_is_refused_and_never_skipped_as_done(trained, tiny_store, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    model = run / "model.safetensors"
    if damage == "one value":
        _altered(model, "head.bias", lambda t: t.__setitem__(3, t[3] + 1.0))
    elif damage == "nan":
        _altered(model, "queries", lambda t: t.view(-1).__setitem__(0, float("nan")))
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:-64])
    else:
        model.write_bytes(b"")
    image = tmp_path / "a.png"
    add_image(tmp_path, "a.png")
    for args in (
        ("evaluate", str(run), "--split", "val200"),
        ("predict", str(run), str(image)),
        ("export", str(run)),
        ("train", "--store", tiny_store, *TRAIN, "--out", str(run)),  # never "already done"
    ):
        line = error_line(*run_cli(*args))
        assert "model.safetensors is damaged" in line, args


@pytest.mark.parametrize("part", ["tensor", "class names", "nan"])
def test_an_altered_export_is_refused(trained, tmp_path, part):
    exported = tmp_path / "model.bin"  # any name: predict takes the file it was given
    code, text = run_cli("export", str(trained), "--out", str(exported))
    assert code == 0, text
    image = tmp_path / "a.png"
    add_image(tmp_path, "a.png")
    code, text = run_cli("predict", str(exported), str(image), "--json")
    assert code == 0, text
    if part == "tensor":
        _altered(exported, "queries", lambda t: t.view(-1).__setitem__(0, t.view(-1)[0] + 0.5))
    elif part == "nan":
        _altered(exported, "head.weight", lambda t: t.view(-1).__setitem__(0, float("nan")))
    else:
        from safetensors import safe_open
        from safetensors.torch import load, save

        with safe_open(str(exported), framework="pt") as f:
            metadata = f.metadata()
        meta = json.loads(metadata["vqt_cache"])
        meta["class_names"] = list(reversed(meta["class_names"]))
        tensors = load(exported.read_bytes())
        exported.write_bytes(save(tensors, metadata={**metadata, "vqt_cache": json.dumps(meta)}))
    line = error_line(*run_cli("predict", str(exported), str(image)))
    assert "model.bin is damaged" in line


def test_a_compressed_run_exports_its_compressed_head(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, text = run_cli("compress", str(run), "--keep", "0.5")
    assert code == 0, text
    image = tmp_path / "a.png"
    add_image(tmp_path, "a.png")
    code, text = run_cli("export", str(run / "compressed"))
    assert code == 0 and "the compressed head" in text, text
    code, text = run_cli("export", str(run))
    assert code == 0 and "export " in text and "for its compressed one" in text, text
    [from_folder] = json.loads(run_cli("predict", str(run / "compressed"), str(image), "--json")[1])
    exports = run / f"{run.name}.compressed.safetensors", run / f"{run.name}.safetensors"  # inside the run folder
    [from_export] = json.loads(run_cli("predict", str(exports[0]), str(image), "--json")[1])
    [full] = json.loads(run_cli("predict", str(exports[1]), str(image), "--json")[1])
    assert from_export["logits"] == pytest.approx(from_folder["logits"], abs=1e-5)
    assert full["logits"] != pytest.approx(from_folder["logits"], abs=1e-5)
    head = run / "compressed" / "model.safetensors"
    _altered(head, "head.bias", lambda t: t.__setitem__(0, t[0] + 1.0))
    line = error_line(*run_cli("predict", str(run / "compressed"), str(image)))
    assert "compressed/model.safetensors is damaged" in line


@pytest.mark.parametrize(
    "change, reason",
    [
        ("mean", "differ from the checksum recorded"),
        ("class name", "differ from the checksum recorded"),
        ("short class list", "10 classes but 9 class names"),
        ("short class list, no checksum", "10 classes but 9 class names"),  # a store from before the checksum
    ],
)
def test_an_altered_preprocessing_or_class_list_in_the_store_is_refused(tiny_store, trained, tmp_path, change, reason):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    attrs = meta["attributes"]
    if change == "mean":
        attrs["preprocessing"]["mean"][0] += 0.1
    elif change == "class name":
        attrs["dataset"]["class_names"][0] = "zero"
    else:
        attrs["dataset"]["class_names"] = attrs["dataset"]["class_names"][:-1]
    if change.endswith("no checksum"):
        del attrs["metadata_hash"]
    (store / "zarr.json").write_text(json.dumps(meta))
    image = tmp_path / "a.png"
    add_image(tmp_path, "a.png")
    for args in (
        ("verify", str(store)),
        ("evaluate", str(trained), "--store", str(store), "--split", "val200"),
        ("predict", str(trained), str(image), "--store", str(store)),
    ):
        line = error_line(*run_cli(*args))
        assert reason in line, args


def test_non_json_metadata_anywhere_in_a_store_is_one_line_naming_it(tiny_store, trained, tmp_path):
    for node in ("splits/train800", "splits", "images", "images/kv", "splits/val200/labels", "weights"):
        store = tmp_path / node.replace("/", "-") / "s.zarr"
        shutil.copytree(tiny_store, store)
        (store / node / "zarr.json").write_text("{not json")
        for args in (
            ("train", "--store", str(store), *TRAIN, "--out", str(tmp_path / "r" / node)),
            ("evaluate", str(trained), "--store", str(store), "--split", "val200"),
        ):
            line = error_line(*run_cli(*args))
            assert f"{node}/zarr.json cannot be read" in line, (node, args)


def test_several_unreadable_weights_are_one_line_and_no_asyncio_traceback(tiny_store, tmp_path):
    """zarr reads a group's members concurrently: the first failure is the sentence, and the others' unretrieved
    task exceptions (printed by asyncio at exit, so only a separate process shows them) are not printed."""
    import subprocess
    import sys

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    for member in sorted(p for p in (store / "weights").iterdir() if p.is_dir())[:6]:
        (member / "zarr.json").write_text("{not json")
    command = [sys.executable, "-m", "vqt_cache", "train", "--store", str(store), *TRAIN, "--out", str(tmp_path / "r")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    line = error_line(done.returncode, done.stdout + done.stderr)
    assert "zarr.json cannot be read" in line and "Task exception" not in done.stderr, done.stderr


def test_a_missing_weights_tensor_is_named(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    shutil.rmtree(store / "weights" / "blocks.1.mlp.fc2.weight")
    line = error_line(*run_cli("train", "--store", str(store), *TRAIN, "--out", str(tmp_path / "r")))
    assert "do not fit" in line and "blocks.1.mlp.fc2.weight" in line


def test_a_store_without_probes_says_how_to_add_to_it(tiny_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    line = error_line(*run_cli(*tiny_extract_args("train800", "--out", str(store), "--probes")))
    assert "extracted without --probes" in line and "leave out --probes" in line and "delete" not in line


def test_an_empty_checkpoint_is_named(trained, tiny_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("metrics.json", "model.safetensors"):
        (run / name).unlink()
    (run / "checkpoint-1.pt").write_bytes(b"")
    line = error_line(*run_cli("train", "--store", tiny_store, *TRAIN, "--out", str(run)))
    assert "checkpoint-1.pt is damaged" in line


# -- HF label columns ------------------------------------------------------------------------------------------------


def _hf_dataset(root: Path, labels: dict[str, list], feature=None) -> Path:
    hf = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def split(values: list) -> object:
        images = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in values]
        features = hf.Features({"img": hf.Image(), "y": feature}) if feature is not None else None
        return hf.Dataset.from_dict({"img": images, "y": values}, features=features)

    hf.DatasetDict({name: split(values) for name, values in labels.items()}).save_to_disk(str(root))
    return root


def _hf_extract(root: Path, out: Path, splits: str | None, *options: str) -> tuple[int, str]:
    return extract("hf", root, out, splits, "--image-column", "img", "--label-column", "y", *options)


@pytest.mark.parametrize(
    "splits, classes",
    [
        ({"train": ["owl", "cat", "owl", "cat"], "test": ["cat", "owl"]}, ["cat", "owl"]),  # by name, sorted
        ({"train": [True, False, True, False]}, ["False", "True"]),  # booleans: two classes
    ],
    ids=["strings", "booleans"],
)
def test_string_and_boolean_labels_are_classes(tmp_path, splits, classes):
    root = _hf_dataset(tmp_path / "d", splits)
    out = tmp_path / "s.zarr"
    code, text = _hf_extract(root, out, None)
    assert code == 0, text
    store = open_store(str(out))
    assert store.attrs["dataset"]["class_names"] == classes
    assert store.split("train").labels().tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("values", [[0.0, 1.5, 2.0, 1.0], [0.0, 1.0, 2.0, 1.0], [[0], [1], [0], [1]]])
def test_labels_that_are_not_classes_are_refused(tmp_path, values):
    root = _hf_dataset(tmp_path / "d", {"train": values})
    line = error_line(*_hf_extract(root, tmp_path / "s.zarr", None))
    assert "not classes" in line and "--label-column" in line
    assert not (tmp_path / "s.zarr").exists()


def test_the_label_column_cannot_be_the_image_column(tmp_path):
    root = _hf_dataset(tmp_path / "d", {"train": [0, 1, 0, 1]})
    args = tiny_extract_args(None, "--root", str(root), "--image-column", "img", "--label-column", "img", dataset="hf")
    line = error_line(*run_cli(*args, "--out", str(tmp_path / "s.zarr")))
    assert "both name column 'img'" in line


def test_a_second_hugging_face_dataset_never_lands_in_the_first_ones_store(tmp_path):
    """Default paths name the dataset's folder; two folders of one name, or one folder whose content was replaced,
    are refused by the store's recorded root and content fingerprint, the store unchanged."""
    first = _hf_dataset(tmp_path / "a" / "data", {"train": [0, 1, 0, 1]})
    second = _hf_dataset(tmp_path / "b" / "data", {"train": [1, 1, 0, 0]})

    def default_extract(root: Path) -> tuple[int, str]:
        args = tiny_extract_args(
            None, "--root", str(root), "--image-column", "img", "--label-column", "y", dataset="hf"
        )
        return run_cli(*args, "--cache-root", str(tmp_path / "cache"), "--json")

    code, text = default_extract(first)
    assert code == 0, text
    store = Path(json.loads(text)["store"])
    assert store.parent.name == "hf-data"
    before = contents(store)
    line = error_line(*default_extract(second))
    assert "holds one dataset" in line and "root" in line
    shutil.rmtree(first)
    _hf_dataset(first, {"train": [1, 0, 1, 1]})  # same folder, other content
    line = error_line(*default_extract(first))
    assert "the dataset's content differs" in line
    assert contents(store) == before


def test_an_unlabeled_test_split_does_not_block_the_others(tmp_path):
    hf = pytest.importorskip("datasets")
    labels = {"train": [0, 1, 0, 1, 0, 1], "validation": [0, 1], "test": [-1, -1, -1]}
    root = _hf_dataset(tmp_path / "d", labels, hf.ClassLabel(names=["no", "yes"]))
    out = tmp_path / "s.zarr"
    code, text = _hf_extract(root, out, "train,validation")
    assert code == 0, text
    code, text = _hf_extract(root, out, None)  # every split: the labeled ones
    assert code == 0, text
    assert sorted(open_store(str(out)).split_names()) == ["train", "trainval", "validation"]  # trainval: both
    line = error_line(*_hf_extract(root, out, "test"))
    assert "split 'test'" in line and "unlabeled" in line


# -- 6. readable results ---------------------------------------------------------------------------------------------


def test_results_are_readable_under_the_users_umask(tiny_store, tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        code, text = run_cli("train", "--store", tiny_store, *TRAIN, "--out", str(run))
        assert code == 0, text
        assert run_cli("evaluate", str(run), "--split", "val200")[0] == 0
        assert run_cli("export", str(run), "--out", str(tmp_path / "m.safetensors"))[0] == 0
    finally:
        os.umask(old)
    files = [p for p in [*run.rglob("*"), tmp_path / "m.safetensors"] if p.is_file() and p.name != ".lock"]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files
    ]


def test_epochs_are_numbered_from_one_everywhere(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    csv_epochs = [line.split(",")[0] for line in (trained / "metrics.csv").read_text().splitlines()[1:]]
    timing = json.loads((trained / "timing.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2] == [int(e) for e in csv_epochs]
    assert sorted(int(e) for e in timing["epoch_seconds"]) == [1, 2]


# -- 5. reports compare like with like -------------------------------------------------------------------------------


def test_a_report_with_a_missing_final_result_marks_it_and_averages_like_with_like(tmp_path):
    """Two tasks, test evaluated live; one final run's live result is missing (interrupted, or another part still
    running): the report shows it missing, and every mean is over the task all columns have."""
    from vqt_cache.config import ExtractConfig
    from vqt_cache.extraction import extract as run_extract

    from conftest import GOOD_PIPELINE, SMALL_PROTOCOL

    store = str(tmp_path / "s.zarr")
    splits = ("train", "val", "trainval")  # test is evaluated live
    run_extract(ExtractConfig(**TINY_EXTRACT, dataset="digits-small", splits=splits, out=store, workers=0))
    body = GOOD_PIPELINE.replace("STORE", store).replace("RUNS", str(tmp_path / "runs"))
    protocol = body[body.index("[protocol]\n") : body.index("final_seeds")]
    body = body.replace(protocol, "[protocol]\n" + SMALL_PROTOCOL).replace('name = "digits"', 'name = "digits-a"')
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'name = "two"\n{body}[[datasets]]\nname = "digits-b"\nqueries = [1]\nstore = "{store}"\n')
    code, text = run_cli("sweep", str(pipeline))
    assert code == 0, text
    [result] = (tmp_path / "runs").glob("two/digits-b/**/vqt-*/eval/test.json")
    result.unlink()
    code, text = run_cli("report", str(pipeline))
    assert code == 0 and "missing" in text, text
    [markdown] = (tmp_path / "runs").glob("**/results.md")
    md = markdown.read_text()
    assert "missing (1 seed without a result)" in md
    assert "left out: digits-b" in md
    from vqt_cache.report import write_report
    from vqt_cache.sweep import load_pipeline

    rows = {(r["dataset"], r["method"]): r["test_top1_mean"] for r in write_report(load_pipeline(pipeline))["rows"]}
    assert rows[("digits-b", "vqt")] is None and rows[("digits-b", "linear")] is not None
    a = [f"{100 * rows[('digits-a', method)]:.2f}" for method in ("vqt", "linear", "pooled")]
    means = f"| mean of tasks | {' | '.join(a)} |"
    assert means in md  # digits-a's own numbers: digits-b's linear probe is not averaged beside a VQT without it


def test_a_vtab_tasks_test_set_is_evaluated_live_from_the_root_the_store_recorded(tmp_path):
    """The store records the task's own folder as its root; live evaluation reopens the task there."""
    task = tmp_path / "vtab" / "eurosat"
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for i in range(30):
        add_image(task / "images", f"{i}.png", seed=i)
        lines["train800" if i < 20 else "val200" if i < 25 else "test"].append(f"images/{i}.png {i % 2}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    out = tmp_path / "s.zarr"
    code, text = extract("vtab1k/eurosat", tmp_path / "vtab", out, "train800,val200")
    assert code == 0, text
    assert open_store(str(out)).attrs["dataset"]["root"] == str(task)
    run = tmp_path / "run"
    assert run_cli("train", "--store", str(out), *TRAIN, "--out", str(run))[0] == 0
    code, text = run_cli("evaluate", str(run), "--split", "test", "--json")
    assert code == 0 and json.loads(text)["images"] == 5, text
