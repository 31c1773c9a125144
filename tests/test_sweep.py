"""`vqt-cache sweep` / `report` / `compress`: pipelines, the selection protocol, re-runs, shards, reports."""

import json
import shutil
from pathlib import Path

import pytest

from vqt_cache import recipe
from vqt_cache.compress import compress
from vqt_cache.config import RunSpec, TrainConfig
from vqt_cache.errors import VQTError
from vqt_cache.report import write_report
from vqt_cache.run_folder import finished_runs, run_folders
from vqt_cache.sweep import load_pipeline, run_sweep, select
from vqt_cache.training import train

from conftest import GOOD_PIPELINE, SMALL_PROTOCOL, TINY_EXTRACT, run_cli

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.stem)
def test_every_shipped_pipeline_loads(path):
    p = load_pipeline(path)
    assert p.datasets and p.grid.lr and p.protocol.final_seeds


def test_shipped_pipelines_cover_the_paper():
    vtab = load_pipeline(PIPELINES[0].parent / "vtab1k.toml")
    assert len(vtab.datasets) == 19
    queries = {d.name.split("/")[1]: d.queries[0] for d in vtab.datasets}
    assert queries["svhn"] == 20 and queries["clevr_dist"] == 10 and queries["caltech101"] == 1
    assert [vtab.group_of(d) for d in vtab.datasets].count("structured") == 8
    assert len(vtab.grid.lr) * len(vtab.grid.wd) == 20
    assert load_pipeline(PIPELINES[0].parent / "ablation_queries.toml").datasets[0].queries == (1, 2, 5, 10, 20)
    assert len(load_pipeline(PIPELINES[0].parent / "fgvc.toml").datasets) == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\n[[datasets]]\nname = "digits"\nqueries = [1]\ncolour = "red"\n', "unknown key colour"),
        ('[protocol]\nepoch = 3\n[[datasets]]\nname = "d"\n', "unknown key epoch"),
        ('[[datasets]]\nname = "d"\nqueries = [-1]\n', "queries T must be >= 0"),
        ('name = "x"\n', "no \\[\\[datasets\\]\\]"),
        ("name = \n", "not valid TOML"),
    ],
)
def test_bad_pipeline_files(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(VQTError, match=message):
        load_pipeline(path)


def _fake_run(folder: Path, method: str, T: int, lr: float, wd: float, top1: float | None) -> Path:
    folder.mkdir(parents=True)
    from vqt_cache.config import RunSpec
    from vqt_cache.run_folder import ModelRecord, RecipeRecord, RunConfig, SplitsRecord, StoreRecord

    config = RunConfig(  # as a run folder records it; selection reads only the run and the result
        run=RunSpec(method, T, lr, wd, 100),
        recipe=RecipeRecord(epochs=2, warmup_epochs=1, batch_size=8, dropout=0.0, eval_every=1),
        splits=SplitsRecord(train="train", eval="val"),
        store=StoreRecord(url="s.zarr", fingerprint="f"),
        model=ModelRecord(method=method, queries=T, depth=2, dim=8, num_classes=3, patch_size=[4, 4], feature_dim=8),
    )
    (folder / "config.json").write_text(json.dumps(config.to_json()))
    final = {} if top1 is None else {"top1": top1}
    metrics = {"complete": True, "diverged": top1 is None, "final": final}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_selection_picks_best_last_epoch_val_with_ties_to_smaller_lr(tmp_path):
    folders = [
        _fake_run(tmp_path / "a", "vqt", 1, 0.5, 1e-3, 0.80),
        _fake_run(tmp_path / "b", "vqt", 1, 0.1, 1e-3, 0.85),
        _fake_run(tmp_path / "c", "vqt", 1, 0.05, 0.0, 0.85),  # tie with b: the smaller lr wins
        _fake_run(tmp_path / "d", "vqt", 1, 0.05, 1e-2, 0.85),  # tie on lr too: the smaller wd wins
        _fake_run(tmp_path / "e", "vqt", 10, 0.5, 0.0, 0.70),
        _fake_run(tmp_path / "f", "vqt", 10, 0.25, 0.0, 0.75),
        _fake_run(tmp_path / "g", "linear", 0, 1.0, 0.0, 0.60),
        _fake_run(tmp_path / "h", "vqt", 1, 1.0, 0.0, None),  # diverged: never selected, whatever its lr
        _fake_run(tmp_path / "i", "pooled", 0, 1.0, 0.0, None),  # every pooled run diverged: no choice
    ]
    chosen = select(finished_runs(folders))
    assert ("pooled", 0) not in chosen
    assert (chosen[("vqt", 1)]["lr"], chosen[("vqt", 1)]["wd"]) == (0.05, 0.0)
    assert chosen[("vqt", 10)]["lr"] == 0.25
    assert chosen[("linear", 0)]["val_top1"] == 0.60


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory) -> str:
    from vqt_cache.config import ExtractConfig
    from vqt_cache.extraction import extract

    out = str(tmp_path_factory.mktemp("sweep") / "digits.zarr")
    extract(ExtractConfig(**TINY_EXTRACT, dataset="digits-small", out=out, workers=0))
    return out


def write_pipeline(tmp_path: Path, store: str, runs_root: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
runs_root = "{runs_root}"
baselines = ["linear"]
compress = true
[protocol]
{SMALL_PROTOCOL}final_seeds = [1, 2]
epochs = 2
warmup_epochs = 1
batch_size = 128
[grid]
lr = [0.5, 0.1]
wd = [1e-3, 0.0]
[[datasets]]
name = "digits-a"
queries = [1, 2]
store = "{store}"
[[datasets]]
name = "digits-b"
queries = [1]
group = "other"
store = "{store}"
""")
    return path


def test_sweep_report_rerun_and_shards(tmp_path, sweep_store):
    p = load_pipeline(write_pipeline(tmp_path, sweep_store, tmp_path / "full"))
    seen = []
    run_sweep(p, on_run=lambda done, total: seen.append((done, total)))
    linear = len(recipe.DINOV2_LINEAR.lrs)  # the linear probe searches DINOv2's grid (recipe own, the default)
    assert seen[-1] == (seen[-1][1], 4 * 2 + linear + 3 * 2 + 4 + linear + 2 * 2)  # selection + final, both datasets
    report = write_report(p)
    rows = report["rows"]
    assert {(r["dataset"], r["label"]) for r in rows} == {
        ("digits-a", "linear probe"),
        ("digits-a", "VQT T=1"),
        ("digits-a", "VQT T=2"),
        ("digits-a", "VQT T=1 compressed"),
        ("digits-a", "VQT T=2 compressed"),
        ("digits-b", "linear probe"),
        ("digits-b", "VQT T=1"),
        ("digits-b", "VQT T=1 compressed"),
    }
    assert all(r["seeds"] == 2 for r in rows)
    csv_lines = Path(report["csv"]).read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    markdown = Path(report["markdown"]).read_text()
    assert "mean of group means" in markdown and "mean of tasks" in markdown and "| digits-b | other |" in markdown
    # the headline: one VQT column, each dataset at its own T (of digits-a's two, the one selected on val)
    top = report["headline"]
    assert [(r["dataset"], r["label"]) for r in top] == [
        ("digits-a", "VQT"),
        ("digits-a", "linear probe"),
        ("digits-b", "VQT"),
        ("digits-b", "linear probe"),
    ]
    candidates = [r for r in rows if r["dataset"] == "digits-a" and r["label"] in ("VQT T=1", "VQT T=2")]
    assert top[0]["T"] == min(candidates, key=lambda r: (-r["val_top1"], r["T"]))["T"] and top[2]["T"] == 1
    assert "## Headline" in markdown and "| mean of tasks |" in markdown and "sample standard deviation" in markdown
    backbone = f"{TINY_EXTRACT['backbone']}, weights random (seed 0)"
    assert f"Backbone: {backbone}." in markdown and all(r["backbone"] == backbone for r in rows)
    # the std over seeds is the sample's, and every seed's result is listed
    for r in rows:
        values = [r["per_seed"][seed] for seed in (1, 2)]
        assert r["test_top1_mean"] == pytest.approx(sum(values) / 2)
        assert r["test_top1_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert "| seed 1 | seed 2 |" in markdown
    assert len((Path(report["csv"]).parent / "per_seed.csv").read_text().splitlines()) == 1 + 2 * len(rows)
    assert sorted(Path(x).name for x in report["plots"]) == [
        f"{stem}.{kind}"
        for stem in ("accuracy_vs_T", "heatmap-digits-a", "heatmap-digits-b")
        for kind in ("pdf", "png")
    ]
    # a re-run trains nothing: every run folder is already complete
    stamps = {f: f.stat().st_mtime_ns for f in (tmp_path / "full").glob("**/model.safetensors")}
    run_sweep(p)
    assert stamps == {f: f.stat().st_mtime_ns for f in (tmp_path / "full").glob("**/model.safetensors")}
    # two shards (two processes' worth of folders) merge into the same report
    q = load_pipeline(write_pipeline(tmp_path, sweep_store, tmp_path / "sharded"))
    assert run_sweep(q, (0, 2)) == ["digits-a"]
    assert run_sweep(q, (1, 2)) == ["digits-b"]
    assert write_report(q)["rows"] == rows


def test_sweep_and_report_commands(tmp_path, sweep_store):
    path = write_pipeline(tmp_path, sweep_store, tmp_path / "cli")
    code, out = run_cli("sweep", str(path), "--part", "1/2")
    assert code == 0, out
    assert "digits-b" in out and (tmp_path / "cli" / "tiny" / "results.md").exists()
    code, out = run_cli("report", str(path), "--out", str(tmp_path / "rep"))
    assert code == 0 and (tmp_path / "rep" / "results.csv").exists()
    wrote = next(line for line in out.splitlines() if line.startswith("wrote "))
    assert all(str(tmp_path / "rep" / name) in wrote for name in ("results.csv", "headline.csv", "per_seed.csv"))
    code, out = run_cli("sweep", str(path), "--part", "2/2")
    assert code == 2 and "need 0 <= i < n" in out


def test_compress_keeps_exactly_the_asked_fraction(tmp_path, sweep_store):
    [run] = train(
        TrainConfig(
            store=sweep_store,
            runs=(RunSpec("vqt", 2, 0.5, 1e-3, 0),),
            epochs=2,
            warmup_epochs=1,
            out=str(tmp_path / "run"),
        )
    )
    F = 48 * (1 + 2 * 2)
    for keep in (0.7, 0.33):
        report = compress(run.dir, keep=keep)
        assert report["features_before"] == F and report["features_kept"] == int(keep * F)
        assert report["head_params_after"] == 10 * int(keep * F) + 10
        assert set(report["accuracy"]) == {"val", "test"}
    from vqt_cache.evaluation import evaluate

    [cached] = evaluate(run.dir, "val")  # the compressed head is evaluated from the cache as compress tested it
    assert cached.compressed == report["accuracy"]["val"]["after"]
    from safetensors.torch import load_file

    tensors = load_file(Path(run.dir) / "compressed" / "model.safetensors")
    assert tensors["feature_index"].shape == (int(0.33 * F),) and tensors["head.weight"].shape == (10, int(0.33 * F))
    assert len(set(tensors["feature_index"].tolist())) == int(0.33 * F)
    code, out = run_cli("compress", run.dir, "--keep", "1.5")
    assert code == 2 and "--keep must be in (0, 1]" in out
    # <run>/compressed predicts with the compressed head: as many right as the live evaluation of that head
    from vqt_cache.datasets import open_dataset
    from vqt_cache.prediction import predict

    dataset = open_dataset("digits-small")
    files = []
    for source, _ in dataset.split("test"):
        files.append(tmp_path / f"{source.replace(':', '-')}.png")
        dataset.load_image(source).save(files[-1])
    predicted = predict(Path(run.dir) / "compressed", files)
    labels = [label for _, label in dataset.split("test")]
    [live] = evaluate(run.dir, "test", live=True)
    assert len(predicted[0].logits) == 10
    assert sum(p.label == y for p, y in zip(predicted, labels, strict=True)) / len(labels) == live.compressed["top1"]
    shutil.rmtree(Path(run.dir) / "compressed")


def test_a_test_set_left_uncached_is_evaluated_live_with_the_same_results(tmp_path):
    from vqt_cache.config import ExtractConfig
    from vqt_cache.evaluation import read_evaluation
    from vqt_cache.extraction import extract

    reports = {}
    for name, splits in (("cached", None), ("live", ("train", "val", "trainval"))):
        store = str(tmp_path / f"{name}.zarr")
        extract(
            ExtractConfig(**TINY_EXTRACT, dataset="digits-small", splits=splits, out=store, dtype="float32", workers=0)
        )
        path = tmp_path / f"{name}.toml"
        body = GOOD_PIPELINE.replace("STORE", store).replace("RUNS", str(tmp_path / name))
        protocol = body[body.index("[protocol]\n") : body.index("final_seeds")]
        body = body.replace(protocol, "[protocol]\n" + SMALL_PROTOCOL)
        path.write_text("compress = true\n" + body)
        p = load_pipeline(path)
        assert p.protocol.final_eval == "test"
        run_sweep(p)
        reports[name] = write_report(p)["rows"]
        finals = run_folders(p.folder(p.datasets[0], "final"))
        evaluated = [read_evaluation(f, "test") for f in finals]
        assert len(finals) == 3 and all((e is not None) == (name == "live") for e in evaluated)
        if name == "live":
            assert all(e["live"] and e["images"] == 60 for e in evaluated)
            assert sum("compressed" in e for e in evaluated) == 1  # the VQT run's compressed head, same pass
    assert any(r["label"].endswith("compressed") for r in reports["live"])
    assert [(r["label"], r["test_top1_mean"]) for r in reports["live"]] == [
        (r["label"], r["test_top1_mean"]) for r in reports["cached"]
    ]


def test_a_report_refuses_runs_of_another_recipe(tmp_path, sweep_store):
    """A pipeline's runs are all trained with its recipe: a run trained with VQT's recipe under a pipeline that
    says each method's own is refused by name, not averaged into the table."""
    import dataclasses

    p = load_pipeline(write_pipeline(tmp_path, sweep_store, tmp_path / "runs"))
    entry = p.datasets[0]
    shared = RunSpec("linear", 0, 0.5, 1e-3, p.protocol.select_seed, "shared")
    proto = dataclasses.asdict(p.protocol)
    recipe_keys = {k: proto[k] for k in ("epochs", "warmup_epochs", "batch_size", "dropout", "precision")}
    train(
        TrainConfig(
            store=sweep_store,
            runs=(shared,),
            train_split=p.protocol.select_train,
            eval_split=p.protocol.select_eval,
            out=str(p.folder(entry, "select") / shared.name),
            **recipe_keys,
        )
    )
    with pytest.raises(VQTError, match=f"{shared.name} was trained with the vqt recipe, the pipeline's recipe = 'own'"):
        write_report(p)
