"""The bad-input matrix: every command × missing paths, wrong types, malformed TOML, out-of-range values, permission
denied, a store from a newer format_version, and artifacts whose checksum, hash or version is missing, null or of
another type (fail closed: never "nothing to check").

Each case must end in one `error:` sentence that names the culprit, exit code 2 and no traceback, and must leave
every store and run folder it was pointed at byte-identical. docs/troubleshooting.md's table is these cases' own
messages, compared whole (`pytest tests/test_bad_input.py --update-docs`, or `make docs`, rewrites it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from vqt_cache import datasets
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.files import write_bytes
from vqt_cache.store import open_store
from vqt_cache.training import train

from conftest import GOOD_PIPELINE, error_line, run_cli, tiny_extract_args


@dataclass
class World:
    """What the cases point at: a store, one from a newer format, a finished run, pipeline files, images."""

    tmp: Path
    store: Path
    newer: Path
    run: Path
    image: Path
    not_image: Path
    damaged: Path  # stores, run folders and exports with a checksum, hash or version taken out or retyped

    @property
    def guarded(self) -> tuple[Path, ...]:
        """What no bad input may change."""
        return self.store, self.newer, self.run, self.damaged

    def pipeline(self, name: str, body: str) -> Path:
        path = self.tmp / f"{name}.toml"
        path.write_text(body.replace("STORE", str(self.store)).replace("RUNS", str(self.tmp / "runs")))
        return path


def _listing(root: Path, files: bool = True) -> list[tuple[str, int]]:
    """Paths under root with their modification times: every file, or (cheaper) every folder, whose time changes
    when a file in it is created, deleted or replaced (zarr and vqt-cache write by rename)."""
    found = []
    for folder, _, names in os.walk(root):
        found.append((folder, os.stat(folder).st_mtime_ns))
        found += [(f"{folder}/{n}", os.stat(f"{folder}/{n}").st_mtime_ns) for n in names] if files else []
    return sorted(found)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_store):
    tmp = tmp_path_factory.mktemp("bad-input")
    store, newer = tmp / "store.zarr", tmp / "newer.zarr"
    shutil.copytree(tiny_store, store)
    shutil.copytree(tiny_store, newer)
    open_store(str(newer), mode="r+").group.attrs["format_version"] = 99
    [run] = train(
        TrainConfig(
            store=str(store), runs=(RunSpec("vqt", 1),), epochs=2, warmup_epochs=1, batch_size=128, out=str(tmp / "run")
        )
    )
    image = tmp / "digit.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    not_image = tmp / "notes.png"
    not_image.write_text("not an image")
    w = World(tmp, store, newer, Path(run.dir), image, not_image, _damaged(tmp / "damaged", store, Path(run.dir)))
    for name, body in PIPELINES.items():
        w.pipeline(name, body)
    before = [_listing(p) for p in w.guarded]
    yield w
    assert [_listing(p) for p in w.guarded] == before, "a bad input changed a file that was stored"


def _edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _edit_export(path: Path, change) -> None:
    """Rewrite an export's header: change(file metadata, export metadata) edits them in place."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    meta = json.loads(raw["vqt_cache"])
    change(raw, meta)
    path.write_bytes(save(load(path.read_bytes()), metadata={**raw, "vqt_cache": json.dumps(meta)}))


def _damaged(root: Path, store: Path, run: Path) -> Path:
    """Copies of the store, the run and its export, each with one checksum, hash or version field taken out, nulled
    or retyped (and, where the field guarded it, what it guarded edited: a check skipped would go unnoticed)."""
    from vqt_cache.export import export_run

    root.mkdir()
    stores = {
        "no-metadata-hash": lambda a: (a.pop("metadata_hash"), a["preprocessing"].update(std=[0.2, 0.2, 0.2])),
        "null-metadata-hash": lambda a: a.update(metadata_hash=None),
        "string-version": lambda a: a.update(format_version="4"),
        "no-weights-checksum": lambda a: a["backbone"].pop("checksum"),
    }
    for name, change in stores.items():
        shutil.copytree(store, root / f"{name}.zarr")
        _edit_json(root / f"{name}.zarr" / "zarr.json", lambda meta, change=change: change(meta["attributes"]))
    shutil.copytree(store, root / "null-rows-hash.zarr")
    _edit_json(root / "null-rows-hash.zarr/splits/val200/zarr.json", lambda m: m["attributes"].update(rows_hash=None))
    runs = {
        "no-checksums": lambda m: m.pop("checksums"),
        "checksums-a-list": lambda m: m.update(checksums=[]),
        "no-config-checksum": lambda m: m["checksums"].pop("config.json"),
        "null-model-checksum": lambda m: m["checksums"].update({"model.safetensors": None}),
    }
    for name, change in runs.items():
        shutil.copytree(run, root / name)
        _edit_json(root / name / "metrics.json", change)
    _edit_json(root / "no-config-checksum" / "config.json", lambda c: c["recipe"].update(lr=0.1))
    exported = export_run(run, root / "run.safetensors")
    exports = {
        "version-1": lambda raw, meta: (meta.update(version=1), raw.pop("checksum")),
        "no-checksum": lambda raw, meta: raw.pop("checksum"),
        "string-version": lambda raw, meta: meta.update(version="2"),
    }
    for name, change in exports.items():
        shutil.copy(exported, root / f"{name}.safetensors")
        _edit_export(root / f"{name}.safetensors", change)
    exported.unlink()
    return root


PIPELINES = {
    "good": GOOD_PIPELINE,
    "syntax": "name = \n",
    "unknown-key": GOOD_PIPELINE + 'colour = "red"\n',
    "wrong-type": GOOD_PIPELINE.replace("epochs = 2", 'epochs = "two"'),
    "out-of-range": GOOD_PIPELINE.replace("warmup_epochs = 1", "warmup_epochs = 5"),
    "bad-lr": GOOD_PIPELINE.replace("lr = [0.5]", "lr = [-0.5]"),
    "bad-precision": GOOD_PIPELINE.replace("[protocol]", '[protocol]\nprecision = "fp8"'),
    "no-datasets": "[grid]\nlr = [0.5]\n",
    "missing-store": GOOD_PIPELINE.replace('store = "STORE"', 'store = "STORE-gone"'),
    "missing-split": GOOD_PIPELINE.replace('final_eval = "train800"', 'final_eval = "nosuch"'),
    "selects-on-test": GOOD_PIPELINE.replace('select_eval = "val200"', 'select_eval = "train800"'),
    "duplicate-seed": GOOD_PIPELINE.replace("final_seeds = [1]", "final_seeds = [1, 1]"),
}

# (case id, command line with {placeholders} filled from the World, what the error sentence must contain)
CASES = [
    # extract
    ("extract/missing-required", "extract --dataset digits", "Missing option '--backbone'"),
    ("extract/unknown-option", "extract --backbone vit_b16 --dataset digits --batch 3", "No such option: --batch"),
    ("extract/wrong-type", "EXTRACT --batch-size many", "Invalid value for '--batch-size'"),
    ("extract/out-of-range-batch", "EXTRACT --batch-size 0", "batch size and shard size must be at least 1"),
    ("extract/out-of-range-shard", "EXTRACT --shard-size -4", "batch size and shard size must be at least 1"),
    ("extract/unknown-dataset", "EXTRACT --dataset mnist", "unknown dataset 'mnist'"),
    ("extract/missing-root", "EXTRACT --dataset cub --root {tmp}/nowhere", "nowhere does not exist"),
    ("extract/missing-weights", "extract --backbone vit_b16 --dataset digits --weights {tmp}/w.pth", "w.pth"),
    ("extract/unknown-backbone", "extract --backbone resnet50 --dataset digits --weights random", "resnet50"),
    ("extract/bad-model-arg", "EXTRACT --model-arg depth", "KEY=VALUE"),
    ("extract/newer-format", "EXTRACT --out {newer}", "format_version 99"),
    ("extract/other-backbone", "EXTRACT --out {store} --layout hidden", "layout"),
    ("extract/out-is-a-run-folder", "EXTRACT --out {run}", "not a vqt-cache store"),
    ("extract/out-is-a-folder-of-files", "EXTRACT --out {tmp}", "not a vqt-cache store"),
    ("extract/unknown-device", "EXTRACT --device tpu", "unknown device 'tpu'"),
    ("extract/unavailable-device", "EXTRACT --device cuda:7", "device 'cuda:7' is not available"),
    ("extract/val-fraction-out-of-range", "EXTRACT --val-fraction 1.5", "between 0 and 1"),
    ("extract/val-fraction-beside-a-val-split", "EXTRACT --val-fraction 0.1", "has a validation split (val200)"),
    ("extract/columns-not-hf", "EXTRACT --image-column img", "apply to --dataset hf only"),
    ("extract/unknown-precision", "EXTRACT --precision fp16", "unknown precision 'fp16'"),
    ("extract/other-precision", "EXTRACT --out {store} --precision bf16", "extracted with --precision"),
    # info
    ("info/missing-store", "info {tmp}/nowhere.zarr", "no store at"),
    ("info/not-a-store", "info {run}", "no store at"),
    ("info/newer-format", "info {newer}", "format_version 99"),
    # train
    ("train/missing-store", "train --store {tmp}/nowhere.zarr", "no store at"),
    ("train/no-store-found", "train --cache-root {tmp}/empty", "no store under"),
    ("train/wrong-type", "train --store {store} --epochs ten", "Invalid value for '--epochs'"),
    ("train/wrong-list", "train --store {store} --lr 0.5,fast", "--lr takes comma-separated numbers"),
    ("train/out-of-range-epochs", "train --store {store} --epochs 0", "need epochs >= 1"),
    ("train/out-of-range-dropout", "train --store {store} --dropout 1.5", "dropout must be in [0, 1)"),
    ("train/out-of-range-lr", "train --store {store} --lr -1", "learning rate must be > 0"),
    ("train/out-of-range-queries", "train --store {store} --queries -2", "T must be >= 0"),
    (
        "train/out-of-range-budget",
        "train --store {store} --memory-budget -1 --out {tmp}/r",
        "memory budget must be >= 0",
    ),
    ("train/infinite-lr", "train --store {store} --lr inf --out {tmp}/r", "learning rate must be > 0"),
    ("train/nan-lr", "train --store {store} --lr nan --out {tmp}/r", "learning rate must be > 0"),
    ("train/infinite-wd", "train --store {store} --wd inf --out {tmp}/r", "weight decay >= 0"),
    ("train/unknown-precision", "train --store {store} --precision fp8 --out {tmp}/r", "unknown precision 'fp8'"),
    ("train/negative-seed", "train --store {store} --seed -1 --out {tmp}/r", "a seed must be in"),
    ("train/huge-seed", "train --store {store} --seed 99999999999999999999 --out {tmp}/r", "a seed must be in"),
    ("train/nan-budget", "train --store {store} --memory-budget nan --out {tmp}/r", "memory budget must be >= 0"),
    ("train/infinite-budget", "train --store {store} --memory-budget inf --out {tmp}/r", "memory budget must be >= 0"),
    ("train/out-not-a-run-folder", "train --store {store} --out {tmp}", "no config.json"),
    ("train/out-is-a-store", "train --store {store} --out {store}", "no config.json"),
    ("train/unknown-method", "train --store {store} --method prompt", "unknown method 'prompt'"),
    ("train/missing-split", "train --store {store} --eval-split test", "no split 'test'"),
    ("train/newer-format", "train --store {newer}", "format_version 99"),
    (
        "train/other-config-in-out",
        "train --store {store} --epochs 3 --warmup-epochs 1 --out {run}",
        "pass --epochs 2 to finish or reuse it",
    ),
    # evaluate
    ("evaluate/missing-run", "evaluate {tmp}/nowhere", "not a finished run folder"),
    ("evaluate/not-a-run-folder", "evaluate {store}", "not a finished run folder"),
    ("evaluate/missing-split", "evaluate {run} --split nosuch", "no split 'nosuch'"),
    ("evaluate/newer-format", "evaluate {run} --store {newer}", "format_version 99"),
    ("evaluate/unknown-precision", "evaluate {run} --precision half", "unknown precision 'half'"),
    # predict
    ("predict/missing-image", "predict {run} {tmp}/nowhere.png", "nowhere.png"),
    ("predict/not-an-image", "predict {run} {not_image}", "notes.png"),
    ("predict/missing-run", "predict {tmp}/nowhere {image}", "not a finished run folder"),
    ("predict/missing-argument", "predict {run}", "Missing argument 'images'"),
    # demo
    ("demo/wrong-type", "demo --epochs many", "Invalid value for '--epochs'"),
    ("demo/out-of-range", "demo --epochs 0 --root {tmp}/demo", "the demo needs --epochs >= 2"),
    # sweep
    ("sweep/missing-file", "sweep {tmp}/nowhere.toml", "nowhere.toml does not exist"),
    ("sweep/malformed-toml", "sweep {tmp}/syntax.toml", "is not valid TOML"),
    ("sweep/unknown-key", "sweep {tmp}/unknown-key.toml", "unknown key colour"),
    ("sweep/wrong-type", "sweep {tmp}/wrong-type.toml", "[protocol] epochs: Input should be a valid integer"),
    ("sweep/out-of-range", "sweep {tmp}/out-of-range.toml", "0 <= warmup < epochs"),
    ("sweep/out-of-range-lr", "sweep {tmp}/bad-lr.toml", "learning rate must be > 0"),
    ("sweep/no-datasets", "sweep {tmp}/no-datasets.toml", "lists no [[datasets]]"),
    ("sweep/unknown-precision", "sweep {tmp}/bad-precision.toml", "unknown precision 'fp8'"),
    ("sweep/missing-store", "sweep {tmp}/missing-store.toml", "no store at"),
    ("sweep/missing-split", "sweep {tmp}/missing-split.toml", "no split 'nosuch'"),
    ("sweep/duplicate-seed", "sweep {tmp}/duplicate-seed.toml", "final_seeds lists 1 twice"),
    ("sweep/selects-on-reported-split", "sweep {tmp}/selects-on-test.toml", "'train800' is also its final_eval"),
    ("sweep/bad-part", "sweep {tmp}/good.toml --part 3/2", "need 0 <= i < n"),
    ("sweep/wrong-part", "sweep {tmp}/good.toml --part half", "--part takes i/n"),
    # report
    ("report/missing-file", "report {tmp}/nowhere.toml", "nowhere.toml does not exist"),
    ("report/malformed-toml", "report {tmp}/syntax.toml", "is not valid TOML"),
    ("report/never-ran", "report {tmp}/good.toml", "has no finished runs"),
    # compress
    ("compress/missing-run", "compress {tmp}/nowhere", "not a finished run folder"),
    ("compress/out-of-range", "compress {run} --keep 1.5", "--keep must be in (0, 1]"),
    ("compress/wrong-type", "compress {run} --keep most", "Invalid value for '--keep'"),
    ("compress/nan-lasso", "compress {run} --lasso nan", "--lasso must be a finite number >= 0"),
    ("compress/keeps-nothing", "compress {run} --keep 0.0001", "keeps none of the run's"),
    # export
    ("export/missing-run", "export {tmp}/nowhere", "not a finished run folder"),
    ("export/out-not-an-export", "export {run} --out {image}", "not a vqt-cache export"),
    # verify
    ("verify/missing-store", "verify {tmp}/nowhere.zarr", "no store at"),
    ("verify/newer-format", "verify {newer}", "format_version 99"),
    ("verify/out-of-range", "verify {store} --recompute -1", "--recompute takes a number of images >= 0"),
    ("verify/wrong-type", "verify {store} --recompute some", "Invalid value for '--recompute'"),
    # fail closed: a checksum, hash or version that is missing, null or of another type is damage
    (
        "damaged/store-no-metadata-hash",
        "train --store {damaged}/no-metadata-hash.zarr --out {tmp}/r",
        "metadata_hash is missing",
    ),
    ("damaged/store-null-metadata-hash", "info {damaged}/null-metadata-hash.zarr", "metadata_hash is null"),
    ("damaged/store-string-version", "verify {damaged}/string-version.zarr", "format_version is a string ('4')"),
    (
        "damaged/store-no-weights-checksum",
        "evaluate {run} --split val200 --store {damaged}/no-weights-checksum.zarr",
        "weights checksum is missing",
    ),
    ("damaged/split-null-rows-hash", "train --store {damaged}/null-rows-hash.zarr --out {tmp}/r", "rows_hash is null"),
    ("damaged/run-no-checksums", "evaluate {damaged}/no-checksums --split val200", "table of checksums is missing"),
    ("damaged/run-checksums-a-list", "predict {damaged}/checksums-a-list {image}", "table of checksums is a list"),
    ("damaged/run-no-config-checksum", "export {damaged}/no-config-checksum", "checksum of config.json is missing"),
    (
        "damaged/run-null-model-checksum",
        "train --store {store} --queries 1 --epochs 2 --warmup-epochs 1 --out {damaged}/null-model-checksum",
        "checksum of model.safetensors is null",
    ),
    ("damaged/export-version-1", "predict {damaged}/version-1.safetensors {image}", "export of version 1"),
    ("damaged/export-no-checksum", "predict {damaged}/no-checksum.safetensors {image}", "checksum is missing"),
    ("damaged/export-string-version", "predict {damaged}/string-version.safetensors {image}", "version is a string"),
    # the command itself
    ("vqt-cache/unknown-command", "frobnicate", "No such command 'frobnicate'"),
]


def _argv(template: str, world: World) -> list[str]:
    words = template.format(**vars(world)).split()
    if words[0] == "EXTRACT":  # the tiny random backbone on digits, into a fresh folder unless --out says otherwise
        words = tiny_extract_args("val200", "--out", str(world.tmp / "fresh.zarr"), *words[1:])
    return words


@pytest.fixture(scope="module")
def messages(world) -> dict[str, tuple[int, str, bool]]:
    """Every case's (exit code, output, whether it changed what was stored), run once and in order: the page below
    is made of them, and a case's message may name what the earlier ones left in the folder. The datasets the tests
    register are hidden, as a user's process would not have them."""
    found = {}
    with mock.patch.dict(datasets._REGISTERED, clear=True):
        for case, template, _ in CASES:
            before = [_listing(p, files=False) for p in world.guarded]
            code, out = run_cli(*_argv(template, world))
            found[case] = (code, out, [_listing(p, files=False) for p in world.guarded] != before)
    return found


@pytest.mark.parametrize(("case", "needle"), [(c[0], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence(messages, case, needle):
    code, out, changed = messages[case]
    assert needle in error_line(code, out), out
    assert not changed, "a bad input changed what was stored"


# -- permission denied: a real refusal by the operating system ----------------------------------------------------
# root may read and write anything, so as root the command runs without the capabilities that let it.


def _without_privileges(*args: str) -> subprocess.Popen:
    """`vqt-cache ARGS` started in a process that the file permissions bind (its output is read later)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without util-linux setpriv to drop the file-permission override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    command = [*prefix, sys.executable, "-m", "vqt_cache", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def locked(world, messages):
    """A read-only folder, an unreadable store and an unreadable pipeline file (made after the other cases ran:
    their messages list the test folder's entries)."""
    root = world.tmp / "locked"
    root.mkdir()
    shutil.copytree(world.store, root / "store.zarr")
    (root / "pipeline.toml").write_text(GOOD_PIPELINE)
    (root / "readonly").mkdir()
    modes = {root / "readonly": 0o555, root / "pipeline.toml": 0o000, root / "store.zarr": 0o000}
    for path, mode in modes.items():
        path.chmod(mode)
    yield root
    for path in modes:
        path.chmod(0o755)


# (case id, command line: {locked} is the locked folder, the rest as in CASES)
PERMISSION_CASES = [
    ("permission/info-unreadable-store", "info {locked}/store.zarr"),
    ("permission/verify-unreadable-store", "verify {locked}/store.zarr"),
    ("permission/train-unreadable-store", "train --store {locked}/store.zarr --out {locked}/run"),
    ("permission/train-read-only-out", "train --store {store} --out {locked}/readonly/run"),
    ("permission/extract-read-only-out", "EXTRACT --out {locked}/readonly/s.zarr"),
    ("permission/sweep-unreadable-pipeline", "sweep {locked}/pipeline.toml"),
]


@pytest.fixture(scope="module")
def refusals(world, locked) -> dict[str, tuple[int, str]]:
    """Every permission case's (exit code, output), the processes run side by side (each is mostly start-up)."""
    started = {
        case: _without_privileges(*_argv(template.replace("{locked}", str(locked)), world))
        for case, template in PERMISSION_CASES
    }
    return {case: (proc.communicate(timeout=300)[0], proc.returncode)[::-1] for case, proc in started.items()}


@pytest.mark.parametrize("case", [c for c, _ in PERMISSION_CASES])
def test_permission_denied_is_one_sentence(refusals, locked, case):
    code, out = refusals[case]
    line = error_line(code, out)
    assert "Permission denied" in line and str(locked) in line, out


# -- docs/troubleshooting.md: the table of every case above, made of their own messages --------------------------

PAGE = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
TABLE = re.compile(r"(<!-- bad-input -->\n)(.*?)(<!-- /bad-input -->)", re.S)


def _shown(template: str) -> str:
    """A case's command line as the page shows it: the test's files by their short names."""
    short = {"tmp": "tmp", "store": "store.zarr", "newer": "newer.zarr", "run": "run", "image": "digit.png"}
    short |= {"damaged": "damaged"}
    shown = template.replace("{tmp}/", "").replace("{locked}", "locked").replace("{not_image}", "notes.png")
    return shown.format(**short).replace("EXTRACT", "extract ...")


def bad_input_table(messages: dict, refusals: dict, tmp: Path) -> str:
    """The page's table: case, command and the `error:` line each case printed, its folder shortened to `tmp`."""
    rows = ["| case | command | `error:` line |", "| --- | --- | --- |"]
    printed = {case: out for case, (_, out, _) in messages.items()} | {c: out for c, (_, out) in refusals.items()}
    for case, template in [(c, t) for c, t, _ in CASES] + PERMISSION_CASES:
        [line] = [x for x in printed[case].splitlines() if x.startswith("error: ")]
        line = line.removeprefix("error: ").replace(f"{tmp}/", "").replace(str(tmp), "tmp").replace("|", "\\|")
        rows.append(f"| `{case}` | `{_shown(template)}` | {line} |")
    return "\n".join(rows) + "\n"


def test_the_troubleshooting_page_is_the_messages(request, world, messages, refusals):
    """Every case has its row, and each row's message is the one the case prints, whole."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the page records a machine without CUDA ('this machine has 0 CUDA devices')")
    table = bad_input_table(messages, refusals, world.tmp)
    page = PAGE.read_text()
    if request.config.getoption("--update-docs"):
        write_bytes(PAGE, TABLE.sub(lambda m: m[1] + table + m[3], page).encode())  # whole or not at all
        return
    [written] = [m[2] for m in TABLE.finditer(page)]
    differ = [(old, new) for old, new in zip(written.splitlines(), table.splitlines(), strict=False) if old != new]
    assert written == table, (
        f"docs/troubleshooting.md's table differs from the messages (`make docs` rewrites it): first {differ[:1]}"
        if differ
        else "docs/troubleshooting.md's table has other rows than the cases (`make docs` rewrites it)"
    )
