"""Each default is defined once (vqt_cache/recipe.py, vqt_cache/formats.py): the CLI, the library's configs and the
pipeline schema all show the same values, and one check guards them whichever way they came in."""

import dataclasses

import pytest
import typer

from vqt_cache import formats, recipe
from vqt_cache.cli import app
from vqt_cache.errors import VQTError


def cli_defaults(command: str) -> dict:
    return {p.name: p.default for p in typer.main.get_command(app).commands[command].params}


def test_the_cli_shows_the_recipe():
    train = cli_defaults("train")
    assert (train["epochs"], train["warmup_epochs"], train["batch_size"], train["dropout"]) == (
        recipe.EPOCHS,
        recipe.WARMUP_EPOCHS,
        recipe.BATCH_SIZE,
        recipe.DROPOUT,
    )
    assert (train["lr"], train["wd"], int(train["seed"]), int(train["queries"])) == (
        None,  # the run's recipe's: VQT's 0.5 and 0.001 for VQT
        None,
        recipe.SEED,
        recipe.QUERIES,
    )
    assert train["recipe"] == recipe.RECIPE
    assert train["precision"] == formats.DEFAULT_PRECISION and train["cache_root"] == recipe.CACHE_ROOT
    extract = cli_defaults("extract")
    assert (extract["batch_size"], extract["shard_size"], extract["workers"]) == (
        formats.EXTRACT_BATCH_SIZE,
        formats.SHARD_SIZE,
        formats.WORKERS,
    )
    assert (extract["layout"], extract["dtype"]) == (formats.DEFAULT_LAYOUT, formats.DEFAULT_DTYPE)
    compress = cli_defaults("compress")
    assert (compress["keep"], compress["lasso"]) == (recipe.KEEP, recipe.LASSO)
    assert cli_defaults("evaluate")["split"] == recipe.FINAL_EVAL


def test_the_library_and_the_pipeline_schema_show_the_recipe():
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.sweep import Grid, Protocol

    cfg = TrainConfig(store="unused.zarr", precision="float32")
    protocol = Protocol()
    for name in ("epochs", "warmup_epochs", "batch_size", "dropout"):
        assert getattr(cfg, name) == getattr(protocol, name) == getattr(recipe, name.upper())
    assert dataclasses.astuple(RunSpec()) == (
        recipe.METHOD,
        recipe.QUERIES,
        recipe.LR,
        recipe.WD,
        recipe.SEED,
        recipe.RECIPE,
    )
    assert (recipe.VQT_RECIPE.lr, recipe.VQT_RECIPE.wd, recipe.VQT_RECIPE.lrs) == (recipe.LR, recipe.WD, Grid().lr)
    assert (Grid().lr, Grid().wd) == (recipe.GRID_LRS, recipe.GRID_WDS)
    assert (protocol.select_seed, protocol.final_seeds) == (recipe.SELECT_SEED, recipe.FINAL_SEEDS)


@pytest.mark.parametrize(
    ("change", "sentence"),
    [
        ({"epochs": 0}, "need epochs >= 1"),
        ({"batch_size": 0}, "batch size must be >= 1"),
        ({"dropout": 1.0}, "dropout must be in"),
    ],
)
def test_one_check_whichever_way_the_recipe_comes(tmp_path, change, sentence):
    from vqt_cache.config import TrainConfig
    from vqt_cache.sweep import load_pipeline

    with pytest.raises(VQTError, match=sentence):
        TrainConfig(store="unused.zarr", precision="float32", **change)
    key, value = next(iter(change.items()))
    path = tmp_path / "p.toml"
    path.write_text(f'[protocol]\n{key} = {value}\n[[datasets]]\nname = "digits"\n')
    with pytest.raises(VQTError, match=sentence):
        load_pipeline(path)
