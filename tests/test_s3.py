"""Stores on object storage: a real S3 emulator (moto server on 127.0.0.1), extract -> info -> train -> verify."""

import json
import socket
from pathlib import Path

import pytest

from conftest import run_cli, tiny_extract_args

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import fsspec.config
    import s3fs

    fsspec.config.set_conf_env(fsspec.config.conf)  # pick up FSSPEC_S3_* set after fsspec was imported
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("vqt-bucket")
    yield "s3://vqt-bucket"
    mp.undo()
    server.stop()


def test_extract_train_round_trip_on_s3(s3, tmp_path, tiny_store):
    url = f"{s3}/digits/tiny.zarr"
    args = tiny_extract_args("val200", "--out", url)
    code, out = run_cli(*args)
    assert code == 0, out
    code, out = run_cli(*args)
    assert code == 0 and "nothing to do" in out
    code, out = run_cli("info", url, "--json")
    assert code == 0 and [s["name"] for s in json.loads(out)["splits"]] == ["val200"]
    code, out = run_cli("verify", url)
    assert code == 0, out
    train = [
        "train",
        "--queries",
        "1",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--train-split",
        "val200",
        "--eval-split",
        "val200",
        "--json",
    ]
    code, out = run_cli(*train, "--store", url, "--out", str(tmp_path / "s3run"))
    assert code == 0, out
    code, local = run_cli(*train, "--store", tiny_store, "--out", str(tmp_path / "localrun"))
    assert code == 0
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("s3run", "localrun")]
    assert metrics[0]["epochs"] == metrics[1]["epochs"]  # the same bytes, wherever they live
    assert json.loads((Path(tmp_path) / "s3run" / "config.json").read_text())["store"]["url"] == url
