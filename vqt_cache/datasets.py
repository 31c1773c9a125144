"""Dataset adapters: each turns a dataset's native layout into named splits of (image source, label).

A split is a fixed, ordered list; its order is recorded in the store (as the source list and its hash), so a
cache row always maps back to the same file. Images are decoded here and nowhere else; the only image code
stage one runs is `ImageSplit` with the backbone's preprocessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from vqt_cache.dataset_catalog import DATASETS, FAMILIES, family
from vqt_cache.errors import VQTError, first_line
from vqt_cache.errors import recorded as required
from vqt_cache.formats import DEFAULT_RESAMPLE, HF_COLUMNS, RESAMPLERS
from vqt_cache.images import UnsupportedImage, to_rgb
from vqt_cache.recipe import EVAL_SPLITS

# VTAB-1k: task -> (folder names used by the common image-folder releases, number of classes, group)
VTAB_TASKS: dict[str, tuple[tuple[str, ...], int, str]] = {
    "caltech101": (("caltech101",), 102, "natural"),
    "cifar100": (("cifar100", "cifar"), 100, "natural"),
    "dtd": (("dtd",), 47, "natural"),
    "oxford_flowers102": (("oxford_flowers102",), 102, "natural"),
    "oxford_iiit_pet": (("oxford_iiit_pet",), 37, "natural"),
    "svhn": (("svhn",), 10, "natural"),
    "sun397": (("sun397",), 397, "natural"),
    "patch_camelyon": (("patch_camelyon",), 2, "specialized"),
    "eurosat": (("eurosat",), 10, "specialized"),
    "resisc45": (("resisc45",), 45, "specialized"),
    "diabetic_retinopathy": (("diabetic_retinopathy",), 5, "specialized"),
    "clevr_count": (("clevr_count",), 8, "structured"),
    "clevr_dist": (("clevr_dist",), 6, "structured"),
    "dmlab": (("dmlab",), 6, "structured"),
    "kitti": (("kitti",), 4, "structured"),
    "dsprites_loc": (("dsprites_loc",), 16, "structured"),
    "dsprites_ori": (("dsprites_ori",), 16, "structured"),
    "smallnorb_azi": (("smallnorb_azi",), 18, "structured"),
    "smallnorb_ele": (("smallnorb_ele",), 9, "structured"),
}
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")

# VPT's FGVC release: task -> image folder below the task root ({train,val,test}.json hold paths relative to it)
FGVC_TASKS: dict[str, str] = {
    "cub": "images",
    "nabirds": "images",
    "oxfordflower": "",
    "stanforddogs": "Images",
    "stanfordcars": "",
}

# Images per split of the official releases, for `vqt-cache plan` when a dataset is not on disk (yet).
# VTAB-1k: train800 and val200 everywhere, train800val200 is their union, and these test sets.
VTAB_TEST_SIZES = {
    "caltech101": 6084,
    "cifar100": 10000,
    "dtd": 1880,
    "oxford_flowers102": 6149,
    "oxford_iiit_pet": 3669,
    "svhn": 26032,
    "sun397": 21750,
    "patch_camelyon": 32768,
    "eurosat": 5400,
    "resisc45": 6300,
    "diabetic_retinopathy": 42670,
    "clevr_count": 15000,
    "clevr_dist": 15000,
    "dmlab": 22735,
    "kitti": 711,
    "dsprites_loc": 73728,
    "dsprites_ori": 73728,
    "smallnorb_azi": 12150,
    "smallnorb_ele": 12150,
}
# VPT's FGVC release: (train, val, test), three disjoint sets
FGVC_SIZES = {
    "cub": (5394, 600, 5794),
    "nabirds": (21536, 2393, 24633),
    "oxfordflower": (1020, 1020, 6149),
    "stanforddogs": (10800, 1200, 8580),
    "stanfordcars": (7329, 815, 8041),
}


def published_sizes(name: str) -> tuple[dict[str, int], dict[str, tuple[str, ...]]] | None:
    """Images per split of a dataset's official release, and which splits are unions of others; None if unknown."""
    family, _, task = name.partition("/")
    if family == "vtab1k" and task in VTAB_TEST_SIZES:
        sizes = {"train800": 800, "val200": 200, "train800val200": 1000, "test": VTAB_TEST_SIZES[task]}
        return sizes, {"train800val200": ("train800", "val200")}
    if family == "fgvc" and task in FGVC_SIZES:
        return dict(zip(("train", "val", "test"), FGVC_SIZES[task], strict=True)), {}
    return None


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class BadImage(Exception):
    """An image file that cannot be decoded; the message names the file."""


VALIDATION_NAMES = ("val", "valid", "validation")  # a split of one of these names beside train gets a trainval
TRAINVAL = "trainval"


@dataclass
class Dataset:
    """Named splits of (source, label) plus how to turn a source into an RGB image.

    A source is a path relative to `root`, read from disk, or, with a `loader`, any string the loader turns into
    an image (an index into arrays in memory, a key into a database). Your own data is a Dataset too::

        Dataset("leaves", None, ["healthy", "sick"], {"train": [("0", 0), ...], "val": [...]}, loader=my_loader)

    and `register_dataset` makes it a name that `extract` (and `--dataset` on the command line) accepts.
    """

    name: str
    root: Path | None
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]]
    resize: str = "timm"  # "timm": the backbone's resize + center crop; "squash": straight to the input size
    loader: Callable[[str], Image.Image] | None = field(default=None, repr=False)
    validation: dict[str, Any] | None = None  # how `with_validation` carved the val split, if it did
    columns: dict[str, str] | None = None  # a Hugging Face dataset's image and label columns
    fingerprint: str | None = None  # a Hugging Face dataset's content hash (of its splits' `hf_content`)
    split_fingerprints: dict[str, str] | None = None  # each split's `hf_content`: what live evaluation checks
    unusable: dict[str, str] = field(default_factory=dict)  # split -> why it cannot be used (said when asked for)

    def __post_init__(self) -> None:
        """A dataset with a train and a validation split also has their union, `trainval`: the split the paper's
        protocols train their final runs on, after selecting on the validation split."""
        val = next((name for name in VALIDATION_NAMES if name in self.splits and name not in self.unusable), None)
        if val and "train" in self.splits and "train" not in self.unusable and TRAINVAL not in self.splits:
            self.splits = {**self.splits, TRAINVAL: [*self.splits["train"], *self.splits[val]]}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load_image(self, source: str) -> Image.Image:
        """Decode one image as upright 8-bit RGB (`images.to_rgb`: every mode, EXIF orientation); BadImage if unreadable
        or of a mode with no 8-bit meaning."""
        if self.loader is not None:
            return self.loader(source)
        path = self.root / source
        if not path.is_file():  # a FIFO would block the decoder forever, a folder or symlink loop fail obscurely
            if path.is_symlink() or path.exists():
                raise BadImage(f"image {path} is not a regular file")
            raise BadImage(f"image {path} does not exist")
        try:
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
        except FileNotFoundError as exc:
            raise BadImage(f"image {path} does not exist") from exc
        except Image.DecompressionBombError as exc:
            raise BadImage(f"image {path} is larger than PIL's decompression-bomb limit ({exc})") from exc
        except UnidentifiedImageError as exc:
            empty = path.stat().st_size == 0
            raise BadImage(f"image {path} is {'an empty file' if empty else 'not in a readable image format'}") from exc
        except UnsupportedImage as exc:
            raise BadImage(f"image {path} is not supported: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImage(f"cannot read image {path}: {exc}") from exc

    def image_key(self, source: str) -> str:
        """An image's identity in a store: its source and a digest of its content (the file's bytes, or the
        decoded pixels of an in-memory dataset); a file that cannot be read is keyed as missing."""
        if self.loader is not None:
            try:
                content = np.asarray(self.loader(source)).tobytes()
            except Exception:  # extraction says what is wrong with it
                content = None
        else:
            path = self.root / source
            try:
                content = path.read_bytes() if path.is_file() else None
            except OSError:  # unreadable: extraction says what is wrong with it
                content = None
        digest = "missing" if content is None else hashlib.blake2b(content, digest_size=16).hexdigest()
        return f"{source}#{digest}"

    def describe(self) -> dict[str, Any]:
        """What identifies the dataset in a store: its kind, where it is (absolute), its class names, how its
        images are resized, and (where they apply) its columns, content fingerprint and carved validation split."""
        described = {
            "name": self.name,
            "root": str(Path(self.root).resolve()) if self.root else None,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "resize": self.resize,
        }
        if self.columns is not None:
            described["columns"] = self.columns
        if self.fingerprint is not None:
            described["fingerprint"] = self.fingerprint
            described["split_fingerprints"] = self.split_fingerprints
        return described if self.validation is None else {**described, "validation": self.validation}

    def split(self, name: str) -> list[tuple[str, int]]:
        if name in self.unusable:
            raise VQTError(self.unusable[name])
        if name not in self.splits:
            raise VQTError(f"dataset {self.name!r} has no split {name!r} (it has {', '.join(self.splits)})")
        items = self.splits[name]
        if not items:
            raise VQTError(f"split {name!r} of dataset {self.name!r} is empty")
        return items


CARVE_SEED = 0


def with_validation(dataset: Dataset, fraction: float, seed: int = CARVE_SEED, source: str = "train") -> Dataset:
    """The dataset with a validation split carved out of its `source` split, for a dataset that has none: a seeded,
    class-stratified share `fraction` of it (scikit-learn's train_test_split). The splits become `train` (the
    rest), `val` (the carved images) and `trainval` (all of `source`, for the final runs); the others stay. The
    description records how (`validation`), so stage two and live evaluation carve the very same split again."""
    if not 0 < fraction < 1:
        raise VQTError(f"--val-fraction must be between 0 and 1, got {fraction:g}")
    have = [name for name in EVAL_SPLITS if name in dataset.splits]  # the validation splits stage two looks for
    if have:
        raise VQTError(f"dataset {dataset.name!r} has a validation split ({have[0]}) already: leave out --val-fraction")
    if source not in dataset.splits or "trainval" in dataset.splits:
        raise VQTError(
            f"--val-fraction carves the validation split out of a {source!r} split (into train, val and trainval); "
            f"dataset {dataset.name!r} has {', '.join(dataset.splits)}"
        )
    items = dataset.split(source)
    rest, carved = _stratified(items, fraction, seed, f"a validation split from {dataset.name!r} {source}")
    splits = {name: split for name, split in dataset.splits.items() if name != source}
    splits |= {"train": rest, "val": carved, "trainval": items}
    carving = {"from": source, "fraction": fraction, "seed": seed}
    return dataclasses.replace(dataset, splits=splits, validation=carving)


def _stratified(items: list[tuple[str, int]], fraction: float, seed: int, what: str) -> tuple[list, list]:
    """(the rest, a seeded class-stratified share `fraction`) of items, each in the items' order."""
    from sklearn.model_selection import train_test_split

    try:
        rest, share = train_test_split(
            np.arange(len(items)), test_size=fraction, random_state=seed, stratify=[label for _, label in items]
        )
    except ValueError as exc:
        raise VQTError(
            f"cannot carve {fraction:g} of {len(items)} images as {what}, stratified by class: {exc}"
        ) from None
    return [items[i] for i in sorted(rest)], [items[i] for i in sorted(share)]


def reopen_dataset(recorded: dict[str, Any], root: str | Path | None = None) -> Dataset:
    """The dataset a store was extracted from, from its recorded description (`Dataset.describe`): opened by name
    (at `root` if given, else the recorded root), with its validation split carved again if it was carved, and its
    labels numbered by the store's recorded class names (`relabelled`), whatever folders are present now."""
    dataset = open_dataset(recorded["name"], root if root is not None else recorded["root"], recorded.get("columns"))
    if (
        dataset.fingerprint is not None
        and required(recorded, "fingerprint", str, "the store's dataset record", "re-extract it into a new store")
        != dataset.fingerprint
    ):
        then = recorded.get("split_fingerprints") or {}
        now = dataset.split_fingerprints or {}
        changed = sorted(n for n in then.keys() | now.keys() if then.get(n) != now.get(n))
        raise VQTError(
            f"the {recorded['name']!r} dataset at {dataset.root} has changed since the store was extracted ("
            + (f"split {changed[0]!r} differs" if changed else "its content differs")
            + "): its features would not be the store's; restore the dataset, or extract it into a new store"
        )
    carving = recorded.get("validation")
    if carving:
        dataset = with_validation(dataset, carving["fraction"], carving["seed"], carving["from"])
    return relabelled(dataset, recorded["class_names"])


def relabelled(dataset: Dataset, class_names: list[str]) -> Dataset:
    """The dataset with its labels numbered as `class_names` numbers them (a store's classes): labels follow names,
    not the folders present now. A class missing now is simply absent; a split that holds a class not among
    `class_names` is kept out (asking for it says why)."""
    if dataset.class_names == list(class_names):
        return dataset
    index = {name: label for label, name in enumerate(class_names)}
    splits, unusable = {}, dict(dataset.unusable)
    for name, items in dataset.splits.items():
        unknown = sorted({dataset.class_names[label] for _, label in items} - index.keys())
        if unknown:
            unusable[name] = (
                f"split {name!r} of {dataset.name!r} has images of class {unknown[0]!r}, which is not one of the "
                f"store's {len(class_names)} classes, so no run trained on that store can classify them"
            )
            continue
        splits[name] = [(source, index[dataset.class_names[label]]) for source, label in items]
    return dataclasses.replace(dataset, class_names=list(class_names), splits=splits, unusable=unusable)


def index_hash(items: list[tuple[str, int]]) -> str:
    """sha256 of a split's ordered (image key, label) list: the identity of a split's rows."""
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _check_labels(items: list[tuple[str, int]], num_classes: int, where: str) -> None:
    for source, label in items:
        if not 0 <= label < num_classes:
            raise VQTError(f"label {label} of {source} in {where} is outside 0..{num_classes - 1}")


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise VQTError(f"{what} {path} does not exist")
    return path


def _read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped); one sentence when it is not UTF-8."""
    try:
        return _require(path, "split file").read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise VQTError(f"split file {path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    except IsADirectoryError as exc:
        raise VQTError(f"split file {path} is a folder") from exc


def _read_rows(path: Path, columns: int) -> list[list[str]]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=columns - 1)
        if len(parts) != columns:
            raise VQTError(f"line {number} of {path} should have {columns} fields: {line!r}")
        rows.append(parts)
    return rows


def _int(value: str, path: Path) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise VQTError(f"{path} has a non-integer label or id {value!r}") from exc


def cub(root: Path) -> Dataset:
    """CUB-200-2011 native layout: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt."""
    _require(root, "dataset root")
    paths = {i: p for i, p in _read_rows(root / "images.txt", 2)}
    labels = {
        i: _int(c, root / "image_class_labels.txt") - 1 for i, c in _read_rows(root / "image_class_labels.txt", 2)
    }
    is_train = {i: t == "1" for i, t in _read_rows(root / "train_test_split.txt", 2)}
    classes = [name for _, name in _read_rows(root / "classes.txt", 2)]
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for image_id, rel in paths.items():  # images.txt order
        if image_id not in labels or image_id not in is_train:
            raise VQTError(f"image id {image_id} of {root / 'images.txt'} has no label or no train/test entry")
        splits["train" if is_train[image_id] else "test"].append((f"images/{rel}", labels[image_id]))
    for name, items in splits.items():
        _check_labels(items, len(classes), f"CUB split {name}")
    return Dataset("cub", root, classes, splits)


def fgvc(task: str, root: Path) -> Dataset:
    """VPT's FGVC release: {train,val,test}.json map image paths (relative to the image folder) to labels."""
    if task not in FGVC_TASKS:
        raise VQTError(f"unknown FGVC task {task!r}: use one of {', '.join(FGVC_TASKS)}")
    _require(root, "dataset root")
    splits = {}
    for split in ("train", "val", "test"):
        path = root / f"{split}.json"
        try:
            mapping = json.loads(_read_text(path))
        except json.JSONDecodeError as exc:
            raise VQTError(f"split file {path} is not valid JSON: {exc}") from exc
        if not isinstance(mapping, dict) or not all(isinstance(label, int | str) for label in mapping.values()):
            raise VQTError(f"split file {path} must be a JSON object mapping image paths to labels")
        prefix = f"{FGVC_TASKS[task]}/" if FGVC_TASKS[task] else ""
        splits[split] = [(prefix + rel, _int(str(label), path)) for rel, label in mapping.items()]
    num_classes = 1 + max(label for items in splits.values() for _, label in items)
    for name, items in splits.items():
        _check_labels(items, num_classes, f"FGVC split {name}")
    return Dataset(f"fgvc/{task}", root, _folder_names(splits, num_classes), splits)


def vtab1k(task: str, root: Path) -> Dataset:
    """VTAB-1k image-folder release: <root>/<task>/{train800,val200,train800val200,test}.txt, `<path> <label>`."""
    if task not in VTAB_TASKS:
        raise VQTError(f"unknown VTAB-1k task {task!r}: use one of {', '.join(VTAB_TASKS)}")
    folders, num_classes, _ = VTAB_TASKS[task]
    _require(root, "dataset root")
    # <root>/<task>/, or the task's own folder (what a store records as the dataset's root)
    here = (root / "train800.txt").is_file() and not any((root / f).is_dir() for f in folders)
    task_root = root if here else next((root / f for f in folders if (root / f).is_dir()), root / folders[0])
    _require(task_root, f"VTAB-1k task folder for {task}:")
    splits = {}
    for split in VTAB_SPLITS:
        path = task_root / f"{split}.txt"
        splits[split] = [(rel, _int(label, path)) for rel, label in _read_rows(path, 2)]
        _check_labels(splits[split], num_classes, str(path))
    return Dataset(f"vtab1k/{task}", task_root, _folder_names(splits, num_classes), splits, resize="squash")


def imagefolder(root: Path) -> Dataset:
    """torchvision-style <root>/<split>/<class>/<image>; classes from the sorted class folders of all splits."""
    _require(root, "dataset root")
    split_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not split_dirs:
        raise VQTError(f"image folder {root} has no split folders (expected <root>/<split>/<class>/<image>)")
    folders = {split_dir: _class_folders(split_dir) for split_dir in split_dirs}
    flat = [d.name for d, found in folders.items() if not found and any(_is_image(f) for f in d.iterdir())]
    if flat and all(not found for found in folders.values()):
        names = ", ".join(flat[:3]) + (", ..." if len(flat) > 3 else "")
        raise VQTError(
            f"image folder {root} holds images right inside its folders ({names}): that is <root>/<class>/<image>, "
            "which --dataset classfolder reads; imagefolder reads <root>/<split>/<class>/<image>"
        )
    classes = sorted({c.name for found in folders.values() for c in found})
    index = {c: i for i, c in enumerate(classes)}
    splits = {split_dir.name: _class_images(found, index, root) for split_dir, found in folders.items()}
    return Dataset("imagefolder", root, classes, splits)


def _is_image(path: Path) -> bool:
    """An image file by its name: a known suffix, not hidden (macOS's ._name.jpg companions are not images)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    """The class folders of `folder`, in name order. Hidden folders (.git) and folders without images are no
    classes; two names for one folder (a link to another class's folder) are refused: its images would be stored
    twice, under two labels."""
    found = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    found = [d for d in found if any(_is_image(f) for f in d.iterdir())]
    seen: dict[Path, Path] = {}
    for d in found:
        real = d.resolve()
        if real in seen:
            raise VQTError(
                f"class folders {seen[real].name!r} and {d.name!r} of {folder} are one folder ({real}); its images "
                "would count for two classes: remove the link"
            )
        seen[real] = d
    return found


def _class_images(class_dirs: list[Path], index: dict[str, int], root: Path) -> list[tuple[str, int]]:
    """(path relative to root, label) of every image in the class folders, in name order."""
    return [(str(f.relative_to(root)), index[c.name]) for c in class_dirs for f in sorted(c.iterdir()) if _is_image(f)]


CLASSFOLDER_TEST_FRACTION = 0.2


def classfolder(root: Path) -> Dataset:
    """A flat <root>/<class>/<image> folder: its images split into train and test (a seeded, class-stratified
    fifth, CARVE_SEED), the same on every run; `extract --val-fraction` carves a validation split out of train."""
    _require(root, "dataset root")
    class_dirs = _class_folders(root)
    if not class_dirs:
        raise VQTError(f"class folder {root} has no class folders with images (expected <root>/<class>/<image>)")
    classes = [d.name for d in class_dirs]
    items = _class_images(class_dirs, {c: i for i, c in enumerate(classes)}, root)
    train, test = _stratified(items, CLASSFOLDER_TEST_FRACTION, CARVE_SEED, f"the test split of {root}")
    return Dataset("classfolder", root, classes, {"train": train, "test": test})


def _folder_names(splits: dict[str, list[tuple[str, int]]], num_classes: int) -> list[str]:
    """Class names from the release's own folders, where every class's images share one folder of their own
    (CUB's 001.Black_footed_Albatross, Stanford Dogs' n02085620-Chihuahua); else the class numbers."""
    folders: dict[int, set[str]] = {}
    for items in splits.values():
        for source, label in items:
            folders.setdefault(label, set()).add(Path(source).parent.name)
    names = [next(iter(folders.get(c, {""}))) if len(folders.get(c, ())) == 1 else "" for c in range(num_classes)]
    if all(names) and len(set(names)) == num_classes:
        return names
    return [str(c) for c in range(num_classes)]


class _HFImages:
    """The image of row `index` of split `split` ("split:index" sources) of a Hugging Face dataset (picklable, so
    DataLoader workers get it)."""

    def __init__(self, splits: dict, column: str) -> None:
        self.splits, self.column = splits, column

    def __call__(self, source: str) -> Image.Image:
        split, _, index = source.rpartition(":")
        value = self.splits[split][int(index)][self.column]
        if isinstance(value, dict) and value.get("bytes") is not None:  # an Image feature left undecoded
            import io

            value = Image.open(io.BytesIO(value["bytes"]))
        if not isinstance(value, Image.Image):
            raise BadImage(f"row {source} of column {self.column!r} is a {type(value).__name__}, not an image")
        try:
            return to_rgb(value)
        except UnsupportedImage as exc:
            raise BadImage(f"row {source} of column {self.column!r} is not supported: {exc}") from exc


def hf_dataset(root: Path, image_column: str = HF_COLUMNS["image"], label_column: str = HF_COLUMNS["label"]) -> Dataset:
    """A Hugging Face `datasets` dataset on local disk: a `save_to_disk` folder, or parquet/arrow files (a folder of
    them, split by file name as the hub lays them out, or one file: split "train"). Needs `pip install
    vqt-cache[hf]`. Class names come from a ClassLabel label column, else the labels are numbered."""
    try:
        import datasets as hf
    except ImportError:
        raise VQTError("--dataset hf needs the Hugging Face datasets package: pip install 'vqt-cache[hf]'") from None
    hf.disable_progress_bars()
    _require(root, "dataset root")
    try:
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = hf.load_from_disk(str(root))
        else:
            suffix = (
                root.suffix
                if root.is_file()
                else next((f.suffix for f in sorted(root.rglob("*.*")) if f.suffix in (".parquet", ".arrow")), None)
            )
            if suffix not in (".parquet", ".arrow"):
                raise VQTError(f"{root} is neither a saved Hugging Face dataset nor parquet or arrow files")
            builder = {".parquet": "parquet", ".arrow": "arrow"}[suffix]
            loaded = hf.load_dataset(builder, data_files=str(root)) if root.is_file() else hf.load_dataset(str(root))
    except VQTError:
        raise
    except Exception as exc:  # datasets raises many types for a folder it cannot read
        raise VQTError(f"cannot read the Hugging Face dataset at {root}: {first_line(exc)}") from exc
    splits = dict(loaded) if isinstance(loaded, hf.DatasetDict) else {"train": loaded}
    if image_column == label_column:
        raise VQTError(f"--image-column and --label-column both name column {image_column!r}; name the label column")
    for name, split in splits.items():
        missing = [c for c in (image_column, label_column) if c not in split.column_names]
        if missing:
            raise VQTError(
                f"split {name!r} of {root} has no column {missing[0]!r} (it has {', '.join(split.column_names)}); "
                "name the columns with --image-column and --label-column"
            )
    classes, items, unusable = _hf_labels(splits, label_column, root)
    loader = _HFImages(splits, image_column)
    columns = {"image": image_column, "label": label_column}
    contents = {name: hf_content(split, image_column, label_column) for name, split in sorted(splits.items())}
    fingerprint = hashlib.sha256(json.dumps(contents).encode())
    return Dataset(
        "hf",
        root,
        classes,
        items,
        loader=loader,
        columns=columns,
        fingerprint=fingerprint.hexdigest(),
        split_fingerprints=contents,
        unusable=unusable,
    )


_HF_CONTENT: dict[tuple[str, str, str], str] = {}  # (datasets' own fingerprint, columns) -> content hash, per process


def hf_content(split: Any, image_column: str, label_column: str) -> str:
    """blake3 of a Hugging Face split's content, in row order: each label (as JSON) and each image's encoded bytes
    (or, for an image kept as a path, that path). Saving the same rows again gives the same hash; another row, label
    or image gives another. Computed once per process and split (keyed by the split's own fingerprint)."""
    import blake3
    import pyarrow as pa

    key = (split._fingerprint, image_column, label_column)
    if key in _HF_CONTENT:
        return _HF_CONTENT[key]
    digest = blake3.blake3()
    for table in split.select_columns([image_column, label_column]).with_format("arrow").iter(batch_size=1024):
        labels = table.column(label_column).to_pylist()
        images = table.column(image_column).combine_chunks()
        names = [f.name for f in images.type] if pa.types.is_struct(images.type) else []
        if "bytes" in names:  # an Image feature: each image's encoded bytes, or its path when kept as a file
            fields = dict(zip(names, images.flatten(), strict=True))
            encoded = fields["bytes"].to_pylist()
            paths = fields["path"].to_pylist() if "path" in fields else [None] * len(encoded)
            payloads = [b if b is not None else f"path:{p}".encode() for b, p in zip(encoded, paths, strict=True)]
        else:  # decoded arrays or anything else: its values as JSON
            payloads = [json.dumps(v, default=str).encode() for v in images.to_pylist()]
        for label, payload in zip(labels, payloads, strict=True):
            entry = json.dumps(label, default=str).encode()
            digest.update(len(entry).to_bytes(8, "little") + entry + len(payload).to_bytes(8, "little"))
            digest.update(payload)
    _HF_CONTENT[key] = digest.hexdigest()
    return _HF_CONTENT[key]


HF_UNLABELED = -1  # the Hugging Face convention for a row without a label (an unlabeled test split)


def _hf_labels(splits: dict, column: str, root: Path) -> tuple[list[str], dict[str, list], dict[str, str]]:
    """Class names, each split's (source, label) items and the splits that cannot be used, from a label column of
    ClassLabel, integer, boolean (classes "False", "True") or string values (classes in sorted order); any other
    type (floats, lists) is refused: it is not a class."""
    import datasets as hf

    features = {name: split.features[column] for name, split in splits.items()}
    kinds = {name: _label_kind(feature, hf) for name, feature in features.items()}
    odd = next((name for name, kind in kinds.items() if kind is None), None)
    if odd is not None or len(set(kinds.values())) > 1:
        name = odd or next(iter(kinds))
        raise VQTError(
            f"label column {column!r} of split {name!r} of {root} holds {features[name]} values, not classes: "
            "use a column of ClassLabel, integer, boolean or string labels (name it with --label-column)"
        )
    kind = next(iter(kinds.values()))
    values = {name: list(split[column]) for name, split in splits.items()}
    unlabeled = {name: sum(v is None or v == HF_UNLABELED for v in vs) for name, vs in values.items()}
    if kind == "string":
        classes = sorted({v for vs in values.values() for v in vs if v is not None})
        index = {c: i for i, c in enumerate(classes)}
        numbered = {name: [HF_UNLABELED if v is None else index[v] for v in vs] for name, vs in values.items()}
    else:
        numbered = {name: [HF_UNLABELED if v is None else int(v) for v in vs] for name, vs in values.items()}
        if kind == "classlabel":
            classes = list(features[next(iter(features))].names)
        elif kind == "boolean":
            classes = ["False", "True"]
        else:
            classes = [str(c) for c in range(1 + max((v for vs in numbered.values() for v in vs), default=-1))]
    items, unusable = {}, {}
    for name, labels in numbered.items():
        if unlabeled[name]:
            whole = unlabeled[name] == len(labels)
            unusable[name] = (
                f"split {name!r} of {root} is unlabeled (label {HF_UNLABELED} or none in "
                + ("every row" if whole else f"{unlabeled[name]} of {len(labels)} rows")
                + "): it can be neither trained nor evaluated on; use the other splits (extract: leave it out of "
                "--splits; evaluate: another --split)"
            )
            continue
        items[name] = [(f"{name}:{i}", label) for i, label in enumerate(labels)]
        _check_labels(items[name], len(classes), f"split {name} of {root}")
    if not items:
        raise VQTError(f"no split of {root} is labeled: {next(iter(unusable.values()))}")
    return classes, items, unusable


def _label_kind(feature: Any, hf: Any) -> str | None:
    """The kind of a label column's feature: "classlabel", "integer", "boolean" or "string"; None for anything
    that is not a class (floats, lists, images)."""
    if isinstance(feature, hf.ClassLabel):
        return "classlabel"
    dtype = getattr(feature, "dtype", None) if isinstance(feature, hf.Value) else None
    if dtype == "bool":
        return "boolean"
    if dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        return "integer"
    if dtype in ("string", "large_string"):
        return "string"
    return None


def digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, no download), split like VTAB-1k: 800/200/rest.

    The split is a fixed seeded permutation; images are upscaled to the backbone's input by its preprocessing.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = (data.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    order = np.random.default_rng(0).permutation(len(pixels))
    items = [(f"digits:{i}", int(data.target[i])) for i in order]
    splits = {"train800": items[:800], "val200": items[800:1000], "train800val200": items[:1000], "test": items[1000:]}

    def load(source: str) -> Image.Image:
        return Image.fromarray(pixels[int(source.split(":")[1])], mode="L").convert("RGB")

    return Dataset("digits", None, [str(d) for d in range(10)], splits, resize="squash", loader=load)


# the built-in adapters, one per name of the torch-free catalog (dataset_catalog.DATASETS): family -> a function of
# (task after the slash, root folder, a Hugging Face dataset's columns)
ADAPTERS: dict[str, Callable[[str, Path, dict[str, str]], Dataset]] = {
    "cub": lambda task, root, columns: cub(root),
    "fgvc": lambda task, root, columns: fgvc(task, root),
    "vtab1k": lambda task, root, columns: vtab1k(task, root),
    "imagefolder": lambda task, root, columns: imagefolder(root),
    "classfolder": lambda task, root, columns: classfolder(root),
    "hf": lambda task, root, columns: hf_dataset(root, columns["image"], columns["label"]),
    "digits": lambda task, root, columns: digits(),
}
BUILT_IN = tuple(DATASETS)

# datasets a user added by name (`register_dataset`): name -> a function of the root folder (or None)
_REGISTERED: dict[str, Callable[[Path | None], Dataset]] = {}


def register_dataset(name: str, make: Callable[[Path | None], Dataset]) -> None:
    """Make `name` a dataset that `open_dataset` (so `extract`, and live evaluation) opens by calling
    `make(root)`, root being the folder given to extract (or None). Registration lasts for this process."""
    if family(name) in FAMILIES:
        raise VQTError(f"dataset name {name!r} is built in; register yours under another name")
    _REGISTERED[name] = make


def list_datasets() -> list[str]:
    """The dataset names `open_dataset` accepts: the built-in families, then the registered ones."""
    return [*DATASETS, *sorted(_REGISTERED)]


def open_dataset(name: str, root: str | Path | None = None, columns: dict[str, str] | None = None) -> Dataset:
    """`cub`, `fgvc/<task>`, `vtab1k/<task>`, `imagefolder`, `classfolder`, `digits` or a registered name -> Dataset.

    root defaults to data/downloads/<name> for the built-in folders. columns: a Hugging Face dataset's image and
    label columns (`HF_COLUMNS` by default; for `hf` only).
    """
    if columns is not None and columns != HF_COLUMNS and name != "hf":
        raise VQTError("--image-column and --label-column apply to --dataset hf only")
    if name in _REGISTERED:
        dataset = _REGISTERED[name](Path(root) if root is not None else None)
        if not isinstance(dataset, Dataset):
            raise VQTError(f"the function registered for dataset {name!r} returned {type(dataset).__name__}")
        return dataset
    adapter = ADAPTERS.get(family(name))
    if adapter is None:
        raise VQTError(f"unknown dataset {name!r}: use {', '.join(list_datasets())}")
    path = Path(root) if root is not None else Path("data/downloads") / name
    return adapter(name.partition("/")[2], path, {**HF_COLUMNS, **(columns or {})})


def open_extracted(name: str, root: str | None, columns: dict[str, str], val_fraction: float | None) -> Dataset:
    """The dataset an extract command (or its plan) reads: opened, with a validation split carved out of train when
    `val_fraction` is given."""
    dataset = open_dataset(name, root, columns)
    return dataset if val_fraction is None else with_validation(dataset, val_fraction)


def preprocessing(data_config: dict[str, Any], resize: str, resample: str = DEFAULT_RESAMPLE) -> dict[str, Any]:
    """The recorded preprocessing: the backbone's timm data config plus the dataset's resize mode and, where it is
    not Pillow's, the library that resamples the images ("resample": "torch")."""
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items() if k in keys}
    if resample not in RESAMPLERS:
        raise VQTError(f"unknown resample {resample!r}: use one of {', '.join(RESAMPLERS)}")
    return {**config, "resize": resize, **({"resample": resample} if resample != DEFAULT_RESAMPLE else {})}


def build_transform(prep: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised (3, H, W) tensor, exactly as recorded in `prep`.

    The geometry is timm's (or a squash to the input size). Pillow resamples the image, unless `prep` records
    "resample": "torch": then the decoded 8-bit pixels become a tensor first and torch resamples them with its 8-bit
    antialiased kernel (several times Pillow's speed on this CPU; each pixel within one level of Pillow's, more than
    99% equal)."""
    size = tuple(prep["input_size"][1:])
    pillow = prep.get("resample", DEFAULT_RESAMPLE) == DEFAULT_RESAMPLE
    if prep["resize"] == "squash":
        interpolation = transforms.InterpolationMode(prep["interpolation"])
        geometry = [transforms.Resize(size, interpolation=interpolation, antialias=True)]
        normalize = transforms.Normalize(prep["mean"], prep["std"])
    else:
        from timm.data import create_transform

        timm_eval = create_transform(
            input_size=(3, *size),
            interpolation=prep["interpolation"],
            mean=tuple(prep["mean"]),
            std=tuple(prep["std"]),
            crop_pct=prep["crop_pct"],
            crop_mode=prep["crop_mode"],
        )
        if pillow:
            return timm_eval
        *geometry, _to_tensor, normalize = timm_eval.transforms  # resize and crop, to tensor, normalize
    if pillow:
        return transforms.Compose([*geometry, transforms.ToTensor(), normalize])
    from torchvision.transforms import v2  # its resize keeps 8-bit pixels 8-bit (torch's fast antialiased kernel)

    on_tensors = []
    for step in geometry:
        if type(step) is transforms.Resize:
            on_tensors.append(v2.Resize(step.size, step.interpolation, step.max_size, antialias=True))
        elif type(step) is transforms.CenterCrop:
            on_tensors.append(v2.CenterCrop(step.size))
        else:
            raise VQTError(f"--resample torch does not support crop mode {prep['crop_mode']!r}; use --resample pillow")
    to_float = v2.ToDtype(torch.float32, scale=True)  # uint8 -> [0, 1], as ToTensor scales
    # (resized, the pixels are channels-last in memory: normalising them in place is 3x slower than a copy first)
    return transforms.Compose([v2.PILToTensor(), *on_tensors, to_float, torch.Tensor.contiguous, normalize])


class ImageSplit(torch.utils.data.Dataset):
    """Decoded, preprocessed images of a slice of one split; a bad image yields (zeros, False)."""

    def __init__(self, dataset: Dataset, items: list[tuple[str, int]], prep: dict[str, Any]) -> None:
        self.dataset, self.items, self.prep = dataset, items, prep
        self.transform = build_transform(prep)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, str]:
        try:
            return self.transform(self.dataset.load_image(self.items[i][0])), True, ""
        except BadImage as exc:
            return torch.zeros(self.prep["input_size"]), False, str(exc)
