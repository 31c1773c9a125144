"""`vqt-cache verify` and injected faults: nothing corrupt or incomplete ever reads as trustworthy."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vqt_cache.config import ExtractConfig
from vqt_cache.errors import VQTError
from vqt_cache.extraction import extract
from vqt_cache.store import open_store
from vqt_cache.verify import verify

from conftest import TINY_EXTRACT, run_cli, tiny_extract_args

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults  # `make test-faults` runs this suite alone


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("verify") / "s.zarr")
    kind = dict(layout="kv", dtype="float16")  # pinned: tests alter kv chunks
    extract(
        ExtractConfig(**TINY_EXTRACT, **kind, dataset="digits", splits=("val200",), out=out, workers=0, shard_size=32)
    )
    return out


@pytest.fixture
def store(clean_store, tmp_path) -> Path:
    copy = tmp_path / "s.zarr"
    shutil.copytree(clean_store, copy)
    return copy


def chunk(store: Path, row: int) -> Path:
    return store / "images" / "kv" / "c" / str(row) / "0" / "0" / "0" / "0" / "0"


def test_clean_store_verifies_and_recomputes(store):
    result = verify(str(store), recompute=4)
    assert result["faults"] == [] and result["recomputed"] == 4
    code, out = run_cli("verify", str(store))
    assert code == 0 and "no faults" in out


def test_truncated_chunk(store):
    path = chunk(store, 40)
    path.write_bytes(path.read_bytes()[:1000])
    [fault] = verify(str(store))["faults"]
    assert "shard 1" in fault and "cannot be read" in fault
    code, out = run_cli("verify", str(store))
    assert code == 1 and "fault" in out


def test_deleted_shard(store):
    for row in range(64, 96):  # shard 2: its chunks now read back as zeros
        chunk(store, row).unlink()
    [fault] = verify(str(store))["faults"]
    assert "shard 2" in fault and "checksum" in fault


def test_altered_and_nan_values(store):
    s = open_store(str(store), mode="r+")
    row = s.group["images/kv"][10]
    row.flat[123] += 1
    s.group["images/kv"][10] = row
    row = s.group["images/kv"][100]
    row.flat[7] = np.nan
    s.group["images/kv"][100] = row
    faults = verify(str(store))["faults"]
    assert len(faults) == 2 and "checksum" in faults[0] and "NaN" in faults[1]


def test_incomplete_split(store):
    open_store(str(store), mode="r+").group["images/shard_done"][5] = 0
    [fault] = verify(str(store))["faults"]
    assert "1 of 7 shards incomplete" in fault


def test_recompute_catches_features_from_other_weights(store):
    s = open_store(str(store), mode="r+")
    s.group["weights"]["blocks.1.attn.qkv.weight"][0, 0] += 1  # the stored backbone no longer matches its features
    code, out = run_cli("verify", str(store), "--recompute", "2")
    assert code == 1 and "fingerprint" in out  # verify checks the weights themselves, before any recompute


KILL_TRIALS = 20


def test_kill_9_at_random_points_never_leaves_a_store_that_reads_complete_but_is_not(tmp_path):
    rng = np.random.default_rng(0)
    args = [
        sys.executable,
        "-m",
        "vqt_cache",
        *tiny_extract_args("train800,val200", "--shard-size", "16", "--batch-size", "8"),
    ]
    out = tmp_path / "killed.zarr"
    readable = 0
    for trial in range(KILL_TRIALS):
        if trial % 4 == 0:
            shutil.rmtree(out, ignore_errors=True)  # kill fresh extractions too, not only resumed ones
        proc = subprocess.Popen(
            [*args, "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while not (out / "zarr.json").exists() and proc.poll() is None:  # skip the interpreter's start-up
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.5))  # inside creation, a shard, a write, or between shards
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        try:
            store = open_store(str(out))
        except VQTError:  # killed before the format attributes, written last, existed: no store at all
            continue
        readable += 1
        faults = verify(str(store.url))["faults"]
        unfinished = [f for f in faults if "incomplete" in f or "interrupted" in f]
        assert faults == unfinished, faults  # "not finished yet" is allowed, damage never
    subprocess.run([*args, "--out", str(out)], cwd=REPO, check=True, capture_output=True)
    assert verify(str(out))["faults"] == []
    assert readable >= KILL_TRIALS // 2


def test_concurrent_writers_make_one_good_store(tmp_path, clean_store):
    args = [
        sys.executable,
        "-m",
        "vqt_cache",
        *tiny_extract_args("val200", "--shard-size", "32", "--out", str(tmp_path / "shared.zarr")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(3)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read().decode()[-500:] for p in procs]
    assert verify(str(tmp_path / "shared.zarr"))["faults"] == []
    shared, single = open_store(str(tmp_path / "shared.zarr")), open_store(clean_store)
    np.testing.assert_array_equal(shared.split("val200").labels(), single.split("val200").labels())
    np.testing.assert_array_equal(shared.split("val200").load()[0], single.split("val200").load()[0])
    np.testing.assert_array_equal(shared.split("val200").final(), single.split("val200").final())


def test_full_disk_is_a_clear_error_and_resumable(tmp_path, monkeypatch):
    import errno

    from vqt_cache import store as store_module

    original = store_module.Images.write_images
    failed = []

    def failing(self, start, features, scales=None):
        if start == 64 and not failed:  # the first batch of the third shard (32 images a shard, 16 a batch)
            failed.append(start)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, start, features, scales)

    monkeypatch.setattr(store_module.Images, "write_images", failing)
    out = str(tmp_path / "full.zarr")
    args = tiny_extract_args("val200", "--shard-size", "32", "--batch-size", "16", "--out", out)
    code, text = run_cli(*args)
    assert code == 2 and "No space left on device" in text and "re-run the same command" in text
    assert open_store(out).images.done().tolist()[:3] == [True, True, False]
    monkeypatch.setattr(store_module.Images, "write_images", original)
    assert run_cli(*args)[0] == 0
    assert verify(out)["faults"] == []


def test_ctrl_c_stops_with_a_resume_hint_and_the_same_command_finishes(tmp_path, clean_store):
    out = tmp_path / "interrupted.zarr"
    args = [
        sys.executable,
        "-m",
        "vqt_cache",
        *tiny_extract_args("train800,test,val200", "--shard-size", "32", "--batch-size", "8", "--out", str(out)),
    ]
    # Ctrl-C as in a terminal: a process started from a background job inherits SIGINT ignored, which Python keeps
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while not (out / "images" / "shard_done" / "c").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # within the first of three splits
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "re-run to resume" in text
    interrupted = open_store(str(out))
    assert not interrupted.has_split("train800") or not interrupted.split("train800", require_complete=False).complete
    subprocess.run(args, cwd=REPO, check=True, capture_output=True)
    assert verify(str(out))["faults"] == []
    np.testing.assert_array_equal(
        open_store(str(out)).split("val200").load()[0], open_store(clean_store).split("val200").load()[0]
    )
