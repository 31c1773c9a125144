"""Stage two: golden curve, determinism, grid == separate runs, in-memory == streaming, resume, evaluate."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqt_cache.batches import CachedSplit
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import cached_logits, evaluate, load_runs
from vqt_cache.schedule import lr_factor
from vqt_cache.store import open_store
from vqt_cache.training import grid, train

from conftest import error_line, run_cli

GOLDEN = Path(__file__).parent / "golden" / "train_tiny.json"


VQT_T2 = RunSpec("vqt", 2, 0.5, 1e-3, 0)


def cfg(store, out, runs=(VQT_T2,), **overrides) -> TrainConfig:
    args = dict(
        store=store, runs=tuple(runs), epochs=4, warmup_epochs=1, batch_size=64, out=str(out), precision="float32"
    )
    return TrainConfig(**{**args, **overrides})


def metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def curve(run_dir) -> list[tuple[float, float]]:
    return [(e["train_loss"], e["eval_top1"]) for e in metrics(run_dir)["epochs"]]


def test_lr_schedule_matches_the_paper():
    assert lr_factor(0, 100, 10) == 0
    assert lr_factor(5, 100, 10) == 0.5
    assert lr_factor(10, 100, 10) == 1
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(99, 100, 10) == pytest.approx(0.5 * (1 + np.cos(np.pi * 89 / 90)))


def test_golden_loss_curve(tiny_store, tmp_path):
    [result] = train(cfg(tiny_store, tmp_path / "run"))
    got = curve(result.dir)
    if os.environ.get("VQT_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"curve": got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["curve"]
    np.testing.assert_allclose(got, golden, rtol=1e-5, atol=1e-6)
    assert got[-1][0] < got[1][0]  # it learns


def test_same_seed_same_metrics(tiny_store, tmp_path):
    a = train(cfg(tiny_store, tmp_path / "a"))[0].dir
    b = train(cfg(tiny_store, tmp_path / "b"))[0].dir
    assert (Path(a) / "metrics.json").read_bytes() == (Path(b) / "metrics.json").read_bytes()


def test_grid_in_one_pass_equals_separate_runs(tiny_store, tmp_path):
    specs = grid(["vqt", "linear"], [1, 3], [0.5, 0.1], [1e-3], [0])
    small = dict(train_split="val200")  # 200 images prove the equality as well as 800
    together = train(cfg(tiny_store, tmp_path / "grid", specs, **small))
    assert len(together) == 6
    for spec, result in zip(specs, together, strict=True):
        alone = train(cfg(tiny_store, tmp_path / "alone" / spec.name, [spec], **small))[0]
        np.testing.assert_allclose(curve(result.dir), curve(alone.dir), rtol=1e-5, atol=1e-6)


def test_vqt_with_no_queries_is_the_normalised_linear_probe(tiny_store, tmp_path):
    vqt0, linear = train(
        cfg(tiny_store, tmp_path, [RunSpec("vqt", 0, 0.5, 1e-3, 0), RunSpec("linear-norm", 0, 0.5, 1e-3, 0)])
    )
    np.testing.assert_allclose(curve(vqt0.dir), curve(linear.dir), rtol=1e-6, atol=1e-7)


def test_in_memory_equals_streaming(tiny_store, tmp_path):
    memory = train(cfg(tiny_store, tmp_path / "memory", train_split="val200"))[0]
    streamed = train(cfg(tiny_store, tmp_path / "stream", train_split="val200", memory_budget=0))[0]
    assert json.loads((Path(streamed.dir) / "timing.json").read_text())["in_memory"] is False
    assert curve(memory.dir) == curve(streamed.dir)


class Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted(tiny_store, tmp_path):
    specs = [RunSpec("vqt", 2, 0.5, 1e-3, 0), RunSpec("pooled", 0, 0.5, 0, 0)]
    small = dict(epochs=6, checkpoint_every=2, train_split="val200")
    full = train(cfg(tiny_store, tmp_path / "full", specs, **small))
    steps_per_epoch = 200 // 64 + 1

    def interrupt(_label, step, _total):
        if step == 5 * steps_per_epoch + 3:  # inside epoch 6, after the checkpoint of epoch 4
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg(tiny_store, tmp_path / "resumed", specs, **small), progress=interrupt)
    assert sorted(p.name for p in (tmp_path / "resumed" / specs[0].name).glob("checkpoint-*")) == [
        "checkpoint-2.pt",
        "checkpoint-4.pt",
    ]
    # checkpoints written before issue 15 named the queries as the module's state_dict does: they resume the same
    written_before = tmp_path / "resumed" / specs[0].name / "checkpoint-4.pt"
    state = torch.load(written_before, weights_only=True)
    state["run"] = {("queries.prompts" if k == "queries" else k): v for k, v in state["run"].items()}
    torch.save(state, written_before)
    seen = []
    resumed = train(
        cfg(tiny_store, tmp_path / "resumed", specs, **small),
        progress=lambda _l, step, _t: seen.append(step),
    )
    assert seen[0] == 4 * steps_per_epoch  # continued from the checkpoint, not from scratch
    for a, b in zip(full, resumed, strict=True):
        assert curve(a.dir) == curve(b.dir)
        assert not list(Path(b.dir).glob("checkpoint-*"))
    # a finished run is skipped on a re-run
    again = train(cfg(tiny_store, tmp_path / "resumed", specs, **small))
    assert all(r.skipped for r in again)


def test_evaluate_from_the_cache(tiny_store, tmp_path):
    run = train(cfg(tiny_store, tmp_path))[0]
    [result] = evaluate(run.dir, "val200")
    assert result.images == 200
    assert result.top1 == pytest.approx(metrics(run.dir)["final"]["top1"])
    code, out = run_cli("evaluate", run.dir, "--split", "val200", "--json")
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(result.top1)


def test_cli_train_writes_the_run_folder(tiny_store, tmp_path):
    code, out = run_cli(
        "train",
        "--store",
        tiny_store,
        "--queries",
        "1,2",
        "--lr",
        "0.5",
        "--wd",
        "0",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0, out
    results = json.loads(out)
    assert [r["name"] for r in results] == ["vqt-T1-lr0.5-wd0-seed42", "vqt-T2-lr0.5-wd0-seed42"]
    folder = tmp_path / "vqt-T2-lr0.5-wd0-seed42"
    config = json.loads((folder / "config.json").read_text())
    assert config["store"]["fingerprint"] == open_store(tiny_store).attrs["backbone"]["fingerprint"]
    assert config["model"]["feature_dim"] == 48 * (1 + 2 * 2)
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    assert tensors["queries"].shape == (2, 2, 48) and tensors["head.weight"].shape == (10, 240)
    # the per-epoch metrics as CSV, the same numbers as metrics.json
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0] == "epoch,lr,train_loss,eval_top1,eval_mean_class" and len(rows) == 3
    last = metrics(folder)["epochs"][-1]
    assert rows[2].split(",")[0] == "2" and float(rows[2].split(",")[3]) == last["eval_top1"]


def test_cli_train_summarises_a_grid(tiny_store, tmp_path):
    args = ["--store", tiny_store, "--train-split", "val200", "--lr", "0.5,0.1", "--wd", "0.001,0"]
    code, out = run_cli("train", *args, "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path))
    assert code == 0, out
    assert "vqt T=1, seed 42: val200 top-1 (%)" in out and "lr ↓  wd →" in out and "val200 top-1" in out


# -- bad input ----------------------------------------------------------------------------------------------------
def test_negative_queries_is_refused():
    with pytest.raises(VQTError, match="T must be >= 0"):
        RunSpec("vqt", -1)


def test_missing_store(tmp_path):
    line = error_line(*run_cli("train", "--store", str(tmp_path / "none.zarr")))
    assert "no store at" in line


def test_no_store_under_cache_root(tmp_path):
    line = error_line(*run_cli("train", "--cache-root", str(tmp_path)))
    assert "no store under" in line


def test_bad_queries_value(tiny_store):
    assert "T must be >= 0" in error_line(*run_cli("train", "--store", tiny_store, "--queries", "-1"))
    assert "comma-separated integers" in error_line(*run_cli("train", "--store", tiny_store, "--queries", "x"))


def test_missing_and_incomplete_split(tiny_store, tmp_path):
    line = error_line(*run_cli("train", "--store", tiny_store, "--eval-split", "test"))
    assert "no split 'test'" in line
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    open_store(str(copy), mode="r+").group["images/shard_done"][3] = 0
    line = error_line(*run_cli("train", "--store", str(copy)))
    assert "split 'train800'" in line and "incomplete" in line


def test_split_without_labels(tiny_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    from vqt_cache.store import rows_hash

    split = open_store(str(copy), mode="r+").group["splits/train800"]
    split["labels"][:] = -1  # as a split of unlabelled images is written: its hash agrees
    split.attrs["rows_hash"] = rows_hash(split["rows"][:], split["labels"][:])
    args = ("--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / "run"))
    line = error_line(*run_cli("train", "--store", str(copy), *args))
    assert "has no labels" in line


def test_nan_in_the_cache(tiny_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    features = open_store(str(copy), mode="r+").group["images/kv"]
    row = features[5]
    row[0, 0, 0, 0, 0] = np.nan
    features[5] = row
    for budget in ("100", "0"):  # in memory, streaming
        line = error_line(
            *run_cli(
                "train",
                "--store",
                str(copy),
                "--epochs",
                "2",
                "--warmup-epochs",
                "1",
                "--memory-budget",
                budget,
                "--out",
                str(tmp_path / budget),
            )
        )
        assert "row 5 holds NaN or Inf" in line


def test_config_json_reads_back_as_the_records_it_was_written_from(tiny_store, tmp_path):
    """config.json is written from a RunConfig and read back as it (the same JSON, the same identity); a run from
    before an entry was recorded reads with that field's default; a mistyped entry is one sentence naming it."""
    from vqt_cache.files import DamagedFile
    from vqt_cache.run_folder import RunConfig, read_config

    [run] = train(TrainConfig(store=tiny_store, runs=(RunSpec("linear", 0, 0.5, 0.0, 1),), epochs=2, warmup_epochs=1,
                              out=str(tmp_path / "run")))  # fmt: skip
    written = json.loads((Path(run.dir) / "config.json").read_text())
    config = read_config(Path(run.dir))
    assert config.to_json() == written and config.run == RunSpec("linear", 0, 0.5, 0.0, 1)
    assert config.recipe.optimization["name"] == "dinov2-linear" and config.model.version >= 1
    old = json.loads(json.dumps(written))  # as runs before issue 30 recorded it: no recipe, precision or version
    del old["run"]["recipe"], old["recipe"]["precision"], old["recipe"]["optimization"], old["model"]["version"]
    legacy = RunConfig.from_json(old, Path("config.json"))
    assert legacy.run.recipe == "shared" and legacy.recipe.precision == "float32" and legacy.model.version == 1
    assert legacy.recipe.optimization["name"] == "vqt"  # what every method trained with then
    wrong = [("run", "lr", "0.5", "run lr is '0.5'"), ("model", "depth", True, "model depth is True")]
    wrong += [("store", "url", None, "store url is None"), ("splits", "train", 3, "splits train is 3")]
    for table, key, value, said in wrong:
        bad = json.loads(json.dumps(written))
        bad[table][key] = value
        with pytest.raises(DamagedFile, match=said):
            RunConfig.from_json(bad, Path("config.json"))


def test_run_folder_from_another_store(tiny_store, tmp_path):
    from vqt_cache.config import ExtractConfig
    from vqt_cache.extraction import extract

    from conftest import TINY_EXTRACT

    other = str(tmp_path / "other.zarr")
    kwargs = {**TINY_EXTRACT["model_kwargs"], "depth": 3}
    extract(
        ExtractConfig(
            **{**TINY_EXTRACT, "model_kwargs": kwargs}, dataset="digits", splits=("val200",), out=other, workers=0
        )
    )
    run = train(cfg(tiny_store, tmp_path / "run", epochs=2))[0]
    line = error_line(*run_cli("evaluate", run.dir, "--split", "val200", "--store", other))
    assert "trained on another store" in line
    assert "not a finished run folder" in error_line(*run_cli("evaluate", str(tmp_path)))


def test_run_folder_with_another_configuration(tiny_store, tmp_path):
    """The setting that differs is named, with the option that finishes or reuses the folder."""
    train(cfg(tiny_store, tmp_path / "run", epochs=2))
    with pytest.raises(VQTError) as refused:
        train(cfg(tiny_store, tmp_path / "run", epochs=3))
    assert str(refused.value) == (
        f"run folder {tmp_path / 'run'} was trained with recipe.epochs = 2, this run has 3: pass --epochs 2 to "
        "finish or reuse it, or use another --out"
    )
    with pytest.raises(VQTError, match="splits.eval = 'val200', this run has None: pass --eval-split val200"):
        train(cfg(tiny_store, tmp_path / "run", epochs=2, eval_split="none"))
    assert train(cfg(tiny_store, tmp_path / "run", epochs=2))[0].skipped


def test_recipe_values_are_checked(tiny_store, tmp_path):
    for bad in ({"epochs": 0}, {"warmup_epochs": 5, "epochs": 5}, {"batch_size": 0}, {"dropout": 1.0}):
        with pytest.raises(VQTError):
            cfg(tiny_store, tmp_path, **bad)
    with pytest.raises(VQTError, match="learning rate"):
        RunSpec(lr=0)
    assert torch.get_num_threads() >= 1


def test_a_run_trains_with_its_methods_recipe_unless_shared(tiny_store, tmp_path):
    """Each method's own recipe by default, VQT's under shared: in the run's name (where it differs), its defaults,
    its config.json; a recipe that is neither is one sentence."""
    code, out = run_cli("train", "--store", tiny_store, "--method", "linear", "--recipe", "mine")
    assert error_line(code, out) == (
        "error: unknown recipe 'mine': use own (each method its paper's) or shared (VQT's for all)"
    )
    specs = grid(["vqt", "linear"], [1], [None], [None], [0], ["own", "shared"])
    assert [s.name for s in specs] == [
        "vqt-T1-lr0.5-wd0.001-seed0",  # VQT's own recipe is the shared one: one run
        "linear-lr0.001-wd0-seed0",  # DINOv2's default lr, no weight decay
        "linear-lr0.5-wd0.001-seed0-shared",
    ]
    results = train(cfg(tiny_store, tmp_path, runs=specs[1:], epochs=2))
    recorded = [json.loads((Path(r.dir) / "config.json").read_text()) for r in results]
    assert [(c["run"]["recipe"], c["recipe"]["optimization"]["optimizer"]) for c in recorded] == [
        ("own", "sgd"),
        ("shared", "adam"),
    ]


def test_an_export_by_default_leaves_the_runs_parent_to_runs(tiny_store, tmp_path):
    """`export RUN` writes into the run folder: the next `train` into the runs' parent is not refused."""
    first = RunSpec("linear", 0, seed=1)
    run = train(cfg(tiny_store, tmp_path, runs=(first, RunSpec("linear", 0, seed=2)), epochs=2))[0]
    code, out = run_cli("export", run.dir)
    assert code == 0 and (Path(run.dir) / f"{first.name}.safetensors").is_file(), out
    assert [
        r.skipped for r in train(cfg(tiny_store, tmp_path, runs=(first, RunSpec("linear", 0, seed=3)), epochs=2))
    ] == [
        True,
        False,
    ]


def test_piped_output_is_neither_wrapped_nor_cut_and_progress_names_the_runs(tiny_store, tmp_path):
    """Output to a pipe (a log, CI, Slurm) keeps every line whole: the run folder's path and name are not broken
    at 80 columns nor cut to "..."; progress lines say which methods and sizes train; the API reports the same."""
    import subprocess
    import sys

    out = tmp_path / ("a-folder-with-a-long-name-" * 4) / "runs"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    args = ["train", "--store", tiny_store, "--method", "vqt,linear", "--queries", "2", "--epochs", "2"]
    args += ["--warmup-epochs", "1", "--eval-split", "none", "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "vqt_cache", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(str(out / "vqt-T2-lr0.5-wd0.001-seed42") in line for line in lines), done.stdout
    assert any(line.startswith("train seed 42: VQT T=2, linear probe (2 runs): ") for line in lines), done.stdout
    seen = []
    from vqt_cache import api

    api.train(
        store=tiny_store,
        method="linear",
        epochs=2,
        warmup_epochs=1,
        eval_split="none",
        out=str(tmp_path / "api"),
        progress=lambda name, done, total: seen.append(name),
    )
    assert seen and set(seen) == {"train seed 42: linear probe (1 run)"}


def test_an_epoch_of_a_few_steps_is_warned_about(tiny_store, tmp_path):
    code, out = run_cli(
        "train", "--store", tiny_store, "--method", "linear", "--epochs", "2", "--warmup-epochs", "1",
        "--batch-size", "512", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, out
    assert (
        "warning: an epoch of train800 (800 images) is 2 steps at batch size 512, too few updates for the schedule; "
        "--batch-size 64 gives 13 steps an epoch"
    ) in out


def test_info_and_compress_say_what_they_did(tiny_store, tmp_path, monkeypatch):
    """info's sizes in a unit that shows them; compress says where it wrote and warns when it costs accuracy."""
    from vqt_cache import cli

    code, out = run_cli("info", tiny_store)
    assert code == 0 and " kB per image" in out and "0.00 MB" not in out, out
    [run] = train(cfg(tiny_store, tmp_path / "run", epochs=2))
    monkeypatch.setattr(cli, "COMPRESSION_LOSS_WARNED", -101.0)  # any change is "a loss": the warning shows
    code, out = run_cli("compress", run.dir, "--keep", "0.5")
    assert code == 0 and f"wrote {Path(run.dir) / 'compressed'}" in out, out
    assert "warning: compression lost" in out and "--keep above 0.5" in out, out


def test_training_and_evaluation_flush_subnormals(tiny_store, tmp_path):
    """Trained queries make the attention produce subnormal floats, which x86 CPUs compute ~4× slower: training and
    evaluation run with them flushed to zero (checked on the arithmetic of the training thread, not by timing)."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU has no flush-to-zero mode")
    tiny = torch.tensor([1e-39])  # a subnormal float32 (made after the flush is off: the conversion flushes too)
    assert (tiny * 1.0).item() != 0.0  # subnormals kept, as in a fresh process
    seen = []
    train(cfg(tiny_store, tmp_path / "run"), progress=lambda *_: seen.append((tiny * 1.0).item()))
    assert seen and all(v == 0.0 for v in seen)
    torch.set_flush_denormal(False)
    [result] = evaluate(str(tmp_path / "run"), "val200")
    assert (tiny * 1.0).item() == 0.0 and result.images == 200


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_the_batched_query_path_trains_the_eager_paths_runs(tiny_store, tmp_path, precision):
    """A grid trained with every layer in one kernel per op ends where the block-by-block path ends: validation
    logits within the bf16 bound of each other, the same predictions (and the golden curve's shape)."""
    runs = (VQT_T2, RunSpec("vqt", 1, 0.25, 0.0, 0), RunSpec("linear", 0, 0.5, 1e-3, 0))
    logits = {}
    for path in ("eager", "batched"):
        results = train(cfg(tiny_store, tmp_path / path, runs, precision=precision, query_path=path))
        _, store, _, model = load_runs([r.dir for r in results], precision=precision)
        model.path.path = "eager"  # the same evaluation for both: only the training differs
        data = CachedSplit(store.split("val200"), None, 64, torch.device("cpu"), 10, **model.reads())
        logits[path], _ = cached_logits(model, data)
    for eager, batched in zip(logits["eager"], logits["batched"], strict=True):
        assert (eager - batched).norm() < 2e-2 * eager.norm()
        assert torch.equal(eager.argmax(1), batched.argmax(1))
