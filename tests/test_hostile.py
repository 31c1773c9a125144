"""A hostile user's trials: nothing a user owns is deleted, every file is whole or absent, a diverged run is never a
result, stage two trusts nothing it has not checked, a checkpoint belongs to one run, one writer per run folder.

Each test asserts the promise (the data still there, the file whole, the run marked diverged, one `error:` line and
exit 2), not the wording. Faults are injected at a chosen point: a kill -9 inside a chosen file's write, a full disk
on a chosen file, a damaged byte in a chosen array.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.store import open_store
from vqt_cache.training import train

from conftest import GOOD_PIPELINE, error_line, make_imagefolder, run_cli, tiny_extract_args

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--epochs", "4", "--warmup-epochs", "1", "--batch-size", "128", "--queries", "1", "--json"]


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path under root with its size and modification time (the folder itself included)."""
    found = [(str(root), 0, os.stat(root).st_mtime_ns)] if root.exists() else []
    for folder, _, names in os.walk(root):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            found.append((os.path.join(folder, name), stat.st_size, stat.st_mtime_ns))
    return sorted(found)


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    """A private copy of the session's tiny store (digits train800/val200, kv float16)."""
    copy = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


@pytest.fixture(scope="module")
def finished(tiny_store, tmp_path_factory) -> Path:
    [result] = train(
        TrainConfig(
            store=tiny_store,
            runs=(RunSpec("vqt", 1),),
            epochs=2,
            warmup_epochs=1,
            out=str(tmp_path_factory.mktemp("finished") / "run"),
        )
    )
    return Path(result.dir)


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def train_cli(store: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run_cli("train", "--store", str(store), "--out", str(out), *TRAIN, *extra)


# -- 1. nothing a user owns is ever deleted -------------------------------------------------------------------------


def _user_folder(tmp: Path, name: str = "thesis", **_) -> Path:
    folder = tmp / name
    folder.mkdir(parents=True)
    (folder / "chapter1.tex").write_text("precious")
    (folder / "figures").mkdir()
    (folder / "figures" / "plot.pdf").write_bytes(b"%PDF")
    return folder


def _dataset_root(tmp: Path, **_) -> Path:
    return make_imagefolder(tmp / "images", per_class=2)


def _cache_root(tmp: Path, tiny_store: str, **_) -> Path:
    for name in ("a.zarr", "b.zarr"):
        shutil.copytree(tiny_store, tmp / "cache" / "digits" / name)
    return tmp / "cache"


def _run_folder(tmp: Path, finished: Path, **_) -> Path:
    shutil.copytree(finished, tmp / "run")
    return tmp / "run"


def _foreign_zarr(tmp: Path, **_) -> Path:
    group = zarr.open_group(tmp / "other.zarr", mode="w")
    group.create_array("x", shape=(4,), dtype="int32")[:] = [1, 2, 3, 4]
    return tmp / "other.zarr"


def _damaged_store(tmp: Path, tiny_store: str, **_) -> Path:
    shutil.copytree(tiny_store, tmp / "damaged.zarr")
    meta = tmp / "damaged.zarr" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    return tmp / "damaged.zarr"


def _a_file(tmp: Path, **_) -> Path:
    (tmp / "notes.txt").write_text("precious")
    return tmp / "notes.txt"


TARGETS = {
    "user-folder": _user_folder,
    "dataset-root": _dataset_root,
    "cache-root-with-two-stores": _cache_root,
    "run-folder": _run_folder,
    "foreign-zarr-store": _foreign_zarr,
    "store-with-damaged-zarr-json": _damaged_store,
    "a-file": _a_file,
}


@pytest.mark.parametrize("what", sorted(TARGETS))
def test_extract_refuses_what_it_did_not_create(tmp_path, tiny_store, finished, what):
    target = TARGETS[what](tmp_path, tiny_store=tiny_store, finished=finished)
    before = listing(target)
    error_line(*run_cli(*tiny_extract_args("val200", "--out", str(target))))
    assert listing(target) == before
    if what == "store-with-damaged-zarr-json":
        error_line(*run_cli("info", str(target)))  # info calls it unreadable; re-running extract did not wipe it


def test_extract_creates_in_an_empty_folder_and_resumes_only_its_own(tmp_path):
    (tmp_path / "empty").mkdir()
    assert run_cli(*tiny_extract_args("val200", "--out", str(tmp_path / "empty")))[0] == 0
    assert open_store(str(tmp_path / "empty")).split("val200").complete
    code, out = run_cli(*tiny_extract_args("val200", "--out", str(tmp_path / "empty"), "--dtype", "float32"))
    assert "dtype" in error_line(code, out)


def test_an_interrupted_creation_is_redone(tmp_path):
    """A store killed between its creation marker and its weights is this tool's own: the next run completes it."""
    out = tmp_path / "s.zarr"
    assert run_cli(*tiny_extract_args("val200", "--out", str(out)))[0] == 0
    group = zarr.open_group(out, mode="r+")
    group.attrs["creating"] = True
    shutil.rmtree(out / "weights" / "blocks.0.attn.qkv.weight")
    assert "interrupted" in error_line(*run_cli("train", "--store", str(out)))
    assert run_cli(*tiny_extract_args("val200", "--out", str(out)))[0] == 0
    assert run_cli("verify", str(out))[0] == 0


@pytest.mark.parametrize("what", ["user-folder", "dataset-root", "a-file"])
def test_train_refuses_an_out_it_did_not_create(tmp_path, tiny_store, finished, what):
    target = TARGETS[what](tmp_path, tiny_store=tiny_store, finished=finished)
    before = listing(target)
    error_line(*train_cli(Path(tiny_store), target))
    error_line(*train_cli(Path(tiny_store), target, "--lr", "0.5,0.1"))  # several runs: target as their parent
    assert listing(target) == before


def test_several_runs_are_not_written_inside_a_run_folder(tiny_store, run):
    before = listing(run)
    assert "run folder" in error_line(*train_cli(Path(tiny_store), run, "--lr", "0.5,0.1"))
    assert listing(run) == before


def test_report_replaces_only_its_own_files(tmp_path, tiny_store):
    pipeline = write_tiny_pipeline(tmp_path, tiny_store)
    assert run_cli("sweep", str(pipeline))[0] == 0
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my own table")
    before = listing(out)
    assert "results.csv" in error_line(*run_cli("report", str(pipeline), "--out", str(out)))
    assert listing(out) == before
    shared = tmp_path / "reports"
    assert run_cli("report", str(pipeline), "--out", str(shared))[0] == 0
    assert run_cli("report", str(pipeline), "--out", str(shared))[0] == 0  # its own files: replaced


def test_demo_refuses_a_foreign_store_path_before_pretraining(tmp_path):
    target = _user_folder(tmp_path / "data" / "cache" / "digits", name="tiny_vit_parity.zarr")
    before = listing(target)
    error_line(*run_cli("demo", "--root", str(tmp_path / "data")))
    assert listing(target) == before and not (tmp_path / "data" / "demo").exists()


def test_compress_refuses_foreign_files_in_compressed(run):
    (run / "compressed").mkdir()
    (run / "compressed" / "notes.txt").write_text("mine")
    error_line(*run_cli("compress", str(run)))
    assert (run / "compressed" / "notes.txt").read_text() == "mine"


# -- 2. every file is whole or absent --------------------------------------------------------------------------------

KILL_INSIDE = """
import os, signal, sys, tempfile
from vqt_cache import cli, files
target, real = sys.argv[1], files.write_bytes

def write_bytes(path, data):
    if os.path.basename(str(path)) == target:  # half the bytes on the disk, then die as kill -9 would
        handle, _ = tempfile.mkstemp(prefix=f".{target}.tmp-", dir=os.path.dirname(str(path)))
        os.write(handle, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)

files.write_bytes = write_bytes
sys.argv = ["vqt-cache", *sys.argv[2:]]
cli.main()
"""


@pytest.mark.faults
@pytest.mark.parametrize("target", ["config.json", "checkpoint-2.pt", "model.safetensors", "metrics.json"])
def test_kill_9_inside_a_write_leaves_no_half_file_and_the_rerun_finishes(tiny_store, tmp_path, target):
    args = ["train", "--store", tiny_store, *TRAIN, "--checkpoint-every", "2"]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE, target, *args, "--out", str(tmp_path / "killed")],
        cwd=REPO,
        capture_output=True,
    )
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / target).exists()  # never half a file under the real name
    assert run_cli(*args, "--out", str(tmp_path / "killed"))[0] == 0
    assert run_cli(*args, "--out", str(tmp_path / "clean"))[0] == 0
    for name in ("metrics.json", "model.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


@pytest.mark.faults
def test_kill_9_inside_a_report_write_keeps_the_previous_report_whole(tiny_store, tmp_path):
    pipeline = write_tiny_pipeline(tmp_path, tiny_store)
    assert run_cli("sweep", str(pipeline))[0] == 0
    report = tmp_path / "runs" / "tiny" / "results.md"
    before = report.read_bytes()
    killed = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE, "results.md", "report", str(pipeline)], cwd=REPO, capture_output=True
    )
    assert killed.returncode == -9 and report.read_bytes() == before
    assert run_cli("report", str(pipeline))[0] == 0 and report.read_bytes() == before


def test_a_damaged_metrics_json_is_trained_again(tiny_store, run):
    (run / "metrics.json").write_text('{"complete": tr')
    code, out = run_cli("train", "--store", tiny_store, "--out", str(run), "--epochs", "2", "--warmup-epochs", "1")
    assert code == 0, out
    assert json.loads((run / "metrics.json").read_text())["complete"] is True


@pytest.mark.parametrize("target", ["model.safetensors", "checkpoint-2.pt"])
def test_full_disk_inside_a_write_names_the_file_and_the_rerun_finishes(tiny_store, tmp_path, monkeypatch, target):
    real = os.fsync

    def full(fd):  # the disk fills up while this one file is being written
        if f".{target}.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    line = error_line(*train_cli(Path(tiny_store), tmp_path / "run", "--checkpoint-every", "2"))
    assert "No space left on device" in line and target in line
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert [p.name for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name] == []
    monkeypatch.setattr(os, "fsync", real)
    assert train_cli(Path(tiny_store), tmp_path / "run", "--checkpoint-every", "2")[0] == 0


# -- 3. a diverged run is never a result -----------------------------------------------------------------------------


def test_a_diverged_run_is_marked_and_has_no_model(tiny_store, tmp_path):
    code, out = train_cli(Path(tiny_store), tmp_path / "run", "--lr", "1e20")
    assert code == 1 and "diverged" in out and "Traceback" not in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["diverged"] and metrics["final"] == {}
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert "diverged" in error_line(*run_cli("evaluate", str(tmp_path / "run"), "--split", "val200"))
    assert train_cli(Path(tiny_store), tmp_path / "run", "--lr", "1e20")[0] == 1  # skipped, and still no result


def test_a_diverged_run_does_not_disturb_the_others_of_its_pass(tiny_store, tmp_path):
    code, out = train_cli(Path(tiny_store), tmp_path / "pass", "--lr", "1e20,0.5")
    assert code == 0, out
    assert train_cli(Path(tiny_store), tmp_path / "alone", "--lr", "0.5")[0] == 0
    name = RunSpec("vqt", 1, 0.5).name
    together = json.loads((tmp_path / "pass" / name / "metrics.json").read_text())["epochs"]
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())["epochs"]
    assert [e["eval_top1"] for e in together] == [e["eval_top1"] for e in alone]
    np.testing.assert_allclose([e["train_loss"] for e in together], [e["train_loss"] for e in alone], rtol=1e-6)


def test_selection_never_picks_a_diverged_run_and_the_report_says_diverged(tmp_path, tiny_store):
    pipeline = write_tiny_pipeline(tmp_path, tiny_store, lrs="[1e20, 0.5]", baselines='["linear"]')
    assert run_cli("sweep", str(pipeline))[0] == 0
    report = (tmp_path / "runs" / "tiny" / "results.md").read_text()
    assert "| 0.5 |" in report and "1e+20" not in report
    everything_diverges = write_tiny_pipeline(tmp_path / "b", tiny_store, lrs="[1e20]")
    code, out = run_cli("sweep", str(everything_diverges))
    assert code == 0 and "Traceback" not in out, out
    rows = (tmp_path / "b" / "runs" / "tiny" / "results.csv").read_text()
    assert "selection" in rows and "diverged" in (tmp_path / "b" / "runs" / "tiny" / "results.md").read_text()


# -- 4. stage two trusts nothing it has not checked ------------------------------------------------------------------


def _array(store: Path, name: str) -> zarr.Array:
    group = zarr.open_group(store, mode="r+")
    return group["splits/train800/labels"] if name == "labels" else group["images"][name]


def _delete_chunk(store: Path) -> None:
    (store / "images" / "kv" / "c" / "5" / "0" / "0" / "0" / "0" / "0").unlink()


def _truncate_chunk(store: Path) -> None:
    path = store / "images" / "kv" / "c" / "5" / "0" / "0" / "0" / "0" / "0"
    path.write_bytes(path.read_bytes()[:100])


def _alter(name: str, value):
    def alter(store: Path) -> None:
        array = _array(store, name)
        array[3] = value(array[3])

    return alter


def _edit_metadata(key: str, value):
    def edit(store: Path) -> None:
        path = store / "images" / "kv" / "zarr.json"
        meta = json.loads(path.read_text())
        meta[key] = value
        path.write_text(json.dumps(meta))

    return edit


def _truncate_weights(store: Path) -> None:
    path = next((store / "weights" / "blocks.0.attn.qkv.weight" / "c").rglob("*"))
    while path.is_dir():
        path = next(path.iterdir())
    path.write_bytes(path.read_bytes()[:50])


def _drop_root_attr(store: Path) -> None:
    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs)
    del attrs["dataset"]
    group.attrs.put(attrs)


def _drop_array(store: Path) -> None:
    shutil.rmtree(store / "images" / "valid")


def _recorded(change):
    """A change whose shard checksums are recomputed: data that is consistent, but wrong in another way."""

    def apply(store: Path) -> None:
        from vqt_cache.store import hash_rows, rows_hash, shard_checksum

        change(store)
        s = open_store(str(store), mode="r+")
        images = s.images
        for shard in range(images.num_shards):
            start, stop = images.shard_range(shard)
            rows = images.row_checksum()
            hash_rows(rows, images.features[start:stop])
            final, valid = (images.group[k][start:stop] for k in ("final", "valid"))
            checksum = shard_checksum(rows.digest(), final, valid, images.version)
            images.group["checksum"][shard] = np.frombuffer(checksum, np.uint8)
        split = s.group["splits/train800"]
        split.attrs["rows_hash"] = rows_hash(split["rows"][:], split["labels"][:])

    return apply


def _labels_beyond(store: Path) -> None:
    _array(store, "labels")[7] = 12


def _nothing_valid(store: Path) -> None:
    _array(store, "valid")[:] = 0


DAMAGE = {
    "missing-feature-chunk": _delete_chunk,
    "truncated-feature-chunk": _truncate_chunk,
    "altered-label": _alter("labels", lambda v: (v + 1) % 10),
    "altered-valid-flag": _alter("valid", lambda v: 0),
    "altered-final-feature": _alter("final", lambda v: v + 1),
    "zarr-json-other-dtype": _edit_metadata("data_type", "float32"),
    "zarr-json-other-shape": _edit_metadata("shape", [799, 2, 2, 3, 17, 16]),
    "truncated-weights-chunk": _truncate_weights,
    "root-attribute-missing": _drop_root_attr,
    "array-missing": _drop_array,
    "labels-beyond-num-classes": _recorded(_labels_beyond),
    "every-row-invalid": _recorded(_nothing_valid),
}
VERIFY_CATCHES = set(DAMAGE) - {"labels-beyond-num-classes", "every-row-invalid"}  # consistent, but unusable


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_stage_two_refuses_a_damaged_store(store, tmp_path, damage):
    DAMAGE[damage](store)
    before = listing(store)
    line = error_line(*train_cli(store, tmp_path / "run"))
    assert "re-extract" in line or "no valid images" in line  # refused for the damage, not for something else
    assert not (tmp_path / "run" / "metrics.json").exists()
    if damage in VERIFY_CATCHES:
        code, out = run_cli("verify", str(store))
        assert code in (1, 2) and "Traceback" not in out and ("fault" in out or "error:" in out)
    assert listing(store) == before


# -- 5. a checkpoint belongs to one run ------------------------------------------------------------------------------


def interrupt_after_first_checkpoint(store: str, out: Path, *extra: str) -> None:
    """`train` stopped by Ctrl-C just after its first checkpoint (at epoch 2) was written."""
    from vqt_cache.run_folder import RunFolder

    original = RunFolder.save_checkpoint

    def stop_after(self, epochs_done, state):
        original(self, epochs_done, state)
        raise KeyboardInterrupt

    RunFolder.save_checkpoint = stop_after
    try:
        assert train_cli(Path(store), out, "--checkpoint-every", "2", *extra)[0] == 130
    finally:
        RunFolder.save_checkpoint = original


def test_a_checkpoint_of_another_configuration_is_refused(tiny_store, tmp_path):
    for lr in ("0.5", "0.1"):
        interrupt_after_first_checkpoint(tiny_store, tmp_path / lr, "--lr", lr)
    shutil.copy(tmp_path / "0.5" / "checkpoint-2.pt", tmp_path / "0.1" / "checkpoint-2.pt")
    line = error_line(*train_cli(Path(tiny_store), tmp_path / "0.1", "--lr", "0.1", "--checkpoint-every", "2"))
    assert "checkpoint-2.pt" in line
    assert (tmp_path / "0.1" / "checkpoint-2.pt").exists()


def test_a_folder_whose_config_was_removed_is_not_resumed(tiny_store, tmp_path):
    interrupt_after_first_checkpoint(tiny_store, tmp_path / "run")
    (tmp_path / "run" / "config.json").unlink()
    before = listing(tmp_path / "run")
    assert "config.json" in error_line(*train_cli(Path(tiny_store), tmp_path / "run", "--epochs", "20"))
    assert listing(tmp_path / "run") == before


# -- 6. one writer per run folder ------------------------------------------------------------------------------------


@pytest.mark.faults
def test_concurrent_trainers_of_one_folder_train_it_once(tiny_store, tmp_path):
    args = [sys.executable, "-m", "vqt_cache", "train", "--store", tiny_store, "--out", str(tmp_path / "run"), *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode()[-500:] for _, e in outputs]
    skipped = sorted(json.loads(out)[0]["skipped"] for out, _ in outputs)
    assert skipped == [False, True]


# -- 7. one line, never a traceback: damaged run folders, data, option values ---------------------------------------


def _truncate(name: str):
    def apply(run: Path) -> None:
        (run / name).write_bytes((run / name).read_bytes()[:40])

    return apply


def _empty(name: str):
    return lambda run: (run / name).write_bytes(b"")


def _wrong_shapes(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    tensors["queries"] = tensors["queries"][:, :0]
    save_file(tensors, run / "model.safetensors")


def _json(name: str, value):
    return lambda run: (run / name).write_text(json.dumps(value))


def _config_without(key: str):
    def apply(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        del config[key]
        (run / "config.json").write_text(json.dumps(config))

    return apply


def _config_lr_a_string(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    config["run"]["lr"] = "0.5"
    (run / "config.json").write_text(json.dumps(config))


RUN_DAMAGE = {
    "config-lr-a-string": _config_lr_a_string,
    "truncated-model": _truncate("model.safetensors"),
    "empty-model": _empty("model.safetensors"),
    "wrong-tensor-shapes": _wrong_shapes,
    "config-without-model": _config_without("model"),
    "config-not-json": _truncate("config.json"),
    "metrics-a-list": _json("metrics.json", [1, 2]),
    "metrics-null": _json("metrics.json", None),
}


@pytest.mark.parametrize("damage", sorted(RUN_DAMAGE))
@pytest.mark.parametrize("command", ["evaluate", "predict", "compress"])
def test_a_damaged_run_folder_is_one_sentence(run, tmp_path, damage, command):
    RUN_DAMAGE[damage](run)
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    extra = {"evaluate": ["--split", "val200"], "predict": [str(image)], "compress": []}[command]
    damaged = {"config": "config.json", "metrics": "metrics.json"}.get(damage.split("-")[0], "model.safetensors")
    assert damaged in error_line(*run_cli(command, str(run), *extra))  # the sentence names the damaged file


@pytest.mark.parametrize(
    "checkpoint", ["checkpoint-999.pt", "checkpoint-2.pt"], ids=["stray-epoch", "truncated-checkpoint"]
)
def test_a_stray_or_truncated_checkpoint_is_named(tiny_store, tmp_path, checkpoint):
    assert train_cli(Path(tiny_store), tmp_path / "run")[0] == 0
    (tmp_path / "run" / "metrics.json").unlink()  # not complete any more: the next train resumes or restarts it
    (tmp_path / "run" / checkpoint).write_bytes(b"PK\x03\x04 not a checkpoint")
    assert checkpoint in error_line(*train_cli(Path(tiny_store), tmp_path / "run"))
    assert (tmp_path / "run" / checkpoint).exists()


def test_a_fifo_given_to_predict_is_refused_without_blocking(finished, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert "not a regular file" in error_line(*run_cli("predict", str(finished), str(fifo)))


def test_a_symlink_loop_is_a_bad_image(finished, tmp_path):
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    assert "loop.png" in error_line(*run_cli("predict", str(finished), str(loop)))


def test_a_decompression_bomb_can_be_skipped(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "images", per_class=2)
    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(root / "train" / "cat" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60×60 = 3,600 > 2 × 1,000: a "bomb" for this test
    args = tiny_extract_args(None, "--root", str(root), "--out", str(tmp_path / "s.zarr"), dataset="imagefolder")
    assert "decompression-bomb" in error_line(*run_cli(*args))
    code, out = run_cli(*args, "--on-bad-image", "skip")
    assert code == 0 and "huge.png" in out


def _vtab(root: Path, text: bytes) -> Path:
    task = root / "dtd"
    (task / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(task / "images" / "0.png")
    for split in ("train800", "val200", "train800val200", "test"):
        (task / f"{split}.txt").write_bytes(text)
    return root


@pytest.mark.parametrize(
    ("text", "works"),
    [(b"images/0.png 0\n\xff\xfe\n", False), ("\ufeffimages/0.png 0\n".encode(), True)],
    ids=["not-utf8", "byte-order-mark"],
)
def test_split_file_encodings(tmp_path, text, works):
    root = _vtab(tmp_path / "vtab", text)
    args = tiny_extract_args("test", "--root", str(root), "--out", str(tmp_path / "s.zarr"), dataset="vtab1k/dtd")
    code, out = run_cli(*args)
    if works:
        assert code == 0, out
    else:
        assert "UTF-8" in error_line(code, out)


@pytest.mark.parametrize("content", ["[1, 2]", "null", '{"a.jpg": [1]}'])
def test_fgvc_json_that_is_not_a_mapping(tmp_path, content):
    root = tmp_path / "cub"
    root.mkdir()
    for split in ("train", "val", "test"):
        (root / f"{split}.json").write_text(content)
    args = tiny_extract_args(None, "--root", str(root), "--out", str(tmp_path / "s.zarr"), dataset="fgvc/cub")
    assert "train.json" in error_line(*run_cli(*args))  # names the file that is not a mapping


# -- 8. fp16 overflow is caught where it happens ---------------------------------------------------------------------


def test_fp16_overflow_stops_extraction_and_names_the_row(tmp_path):
    from safetensors.torch import save_file

    from vqt_cache.backbones import load_backbone

    from conftest import TINY_EXTRACT

    backbone = load_backbone(TINY_EXTRACT["backbone"], weights="random", **TINY_EXTRACT["model_kwargs"])
    state = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    state["blocks.1.attn.qkv.weight"] *= 1e6  # keys and values of layer 2 beyond float16's 65,504
    save_file(state, tmp_path / "loud.safetensors")
    args = [a if a != "random" else str(tmp_path / "loud.safetensors") for a in tiny_extract_args("val200")]
    line = error_line(*run_cli(*args, "--out", str(tmp_path / "s.zarr")))
    assert "row 0" in line and "image digits:" in line and "--dtype float32" in line
    assert not open_store(str(tmp_path / "s.zarr")).images.done().any()
    assert run_cli(*args, "--out", str(tmp_path / "s32.zarr"), "--dtype", "float32")[0] == 0


# -- 9. sweep and report stay consistent -----------------------------------------------------------------------------


def write_tiny_pipeline(tmp: Path, store: str, lrs: str = "[0.5]", baselines: str = "[]") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "tiny.toml"
    body = GOOD_PIPELINE.replace("STORE", store).replace("RUNS", str(tmp / "runs")).replace("lr = [0.5]", f"lr = {lrs}")
    path.write_text('name = "tiny"\n' + body.replace('baselines = ["linear", "pooled"]', f"baselines = {baselines}"))
    return path


def test_report_on_a_pipeline_that_never_ran(tmp_path, tiny_store):
    assert "sweep" in error_line(*run_cli("report", str(write_tiny_pipeline(tmp_path, tiny_store))))


def test_report_refuses_runs_of_another_recipe(tmp_path, tiny_store):
    pipeline = write_tiny_pipeline(tmp_path, tiny_store)
    assert run_cli("sweep", str(pipeline))[0] == 0
    pipeline.write_text(pipeline.read_text().replace("epochs = 2", "epochs = 3"))
    assert "epochs" in error_line(*run_cli("report", str(pipeline)))


@pytest.mark.parametrize(
    ("old", "new"), [("final_seeds = [1]", "final_seeds = [1, 1]"), ("lr = [0.5]", "lr = [0.5, 0.5]")]
)
def test_duplicates_in_a_pipeline_are_refused_before_training(tmp_path, tiny_store, old, new):
    pipeline = write_tiny_pipeline(tmp_path, tiny_store)
    pipeline.write_text(pipeline.read_text().replace(old, new))
    assert "twice" in error_line(*run_cli("sweep", str(pipeline)))
    assert not (tmp_path / "runs").exists()
