"""Each command's options are declared once (vqt_cache/config.py): the command line, the Python API and the pipeline
schema are built from those dataclasses or checked against them here, defaults included."""

import dataclasses
import inspect

import pytest
import typer

from vqt_cache import api, recipe
from vqt_cache.cli import app
from vqt_cache.config import (
    FIELD_DEFAULT,
    CompressOptions,
    DemoOptions,
    EvaluateOptions,
    ExportOptions,
    ExtractConfig,
    PredictOptions,
    Recipe,
    ReportOptions,
    RunSpec,
    SweepOptions,
    TrainConfig,
    VerifyOptions,
    options,
)
from vqt_cache.sweep import Pipeline, Protocol

from conftest import run_cli

COMMANDS = typer.main.get_command(app).commands


def cli_params(command: str) -> dict:
    return {p.name: p for p in COMMANDS[command].params}


def expected_default(f: dataclasses.Field, cli) -> object:
    if cli.cli_default is not FIELD_DEFAULT:
        return cli.cli_default
    return None if f.default is dataclasses.MISSING else f.default


@pytest.mark.parametrize(
    ("command", "configs", "overrides"),
    [
        ("extract", (ExtractConfig,), {}),
        ("plan", (ExtractConfig,), {"backbone": recipe.BACKBONE, "dataset": None}),
        ("train", (RunSpec, TrainConfig), {}),
        ("evaluate", (EvaluateOptions,), {}),
        ("predict", (PredictOptions,), {}),
        ("export", (ExportOptions,), {}),
        ("compress", (CompressOptions,), {}),
        ("verify", (VerifyOptions,), {}),
        ("demo", (DemoOptions,), {}),
        ("sweep", (SweepOptions,), {}),
        ("report", (ReportOptions,), {}),
    ],
)
def test_each_declared_option_is_on_the_command_line_with_its_default_and_help(command, configs, overrides):
    params = cli_params(command)
    for config in configs:
        for f, cli in options(config):
            param = params[cli.name or f.name]
            default = overrides.get(f.name, expected_default(f, cli))
            assert param.default == default, (command, f.name)
            assert param.help == cli.help
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            assert param.required == (no_default and cli.cli_default is FIELD_DEFAULT and f.name not in overrides)


def test_plan_takes_every_option_of_extract():
    extract, plan = cli_params("extract"), cli_params("plan")
    assert set(extract) <= set(plan)
    assert set(plan) - set(extract) == {"pipeline", "no_time"}


def test_the_command_line_parses_each_option_into_its_field(tmp_path, monkeypatch):
    """What the command line's forms become: lists, KEY=VALUE pairs, GiB, an inverted switch."""
    seen = {}
    import vqt_cache.training as training

    def fake_train(cfg, progress=None):
        seen["cfg"] = cfg
        return []

    monkeypatch.setattr(training, "train", fake_train)
    code, text = run_cli(
        "train",
        "--store",
        str(tmp_path),
        "--queries",
        "1,10",
        "--lr",
        "0.5, 0.25",
        "--seed",
        "1,2",
        "--memory-budget",
        "0.5",
        "--method",
        "vqt,linear",
        "--epochs",
        "3",
        "--warmup-epochs",
        "1",
    )
    assert code == 0, text
    cfg = seen["cfg"]
    assert cfg.memory_budget == 2**29 and cfg.epochs == 3 and cfg.store == str(tmp_path)
    assert {(r.method, r.queries, r.lr, r.seed) for r in cfg.runs} == {
        (m, T, lr, seed) for m, T in (("vqt", 1), ("vqt", 10), ("linear", 0)) for lr in (0.5, 0.25) for seed in (1, 2)
    }
    field = ExtractConfig.__dataclass_fields__
    assert field["model_kwargs"].metadata["cli"].parse(["img_size=384", "class_token=false", "name=x"]) == {
        "img_size": 384,
        "class_token": False,
        "name": "x",
    }
    assert field["check_space"].metadata["cli"].parse(True) is False
    assert field["splits"].metadata["cli"].parse("train,val") == ("train", "val")


def test_the_api_defaults_are_the_dataclasses():
    train = inspect.signature(api.train).parameters
    for f in dataclasses.fields(RunSpec):
        assert train[f.name].default == f.default, f.name
    extract = inspect.signature(api.extract).parameters
    required = [
        f.name
        for f in dataclasses.fields(ExtractConfig)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert all(extract[name].default is inspect.Parameter.empty for name in required)
    for name in set(extract) & {f.name for f in dataclasses.fields(ExtractConfig)} - set(required):
        assert extract[name].default is None  # None there means the field's own default
    # every other option is a keyword the API passes through to the dataclass
    assert inspect.signature(api.extract).parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
    assert inspect.signature(api.train).parameters["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_the_pipeline_schema_inherits_the_recipe_and_the_store_defaults():
    assert issubclass(Protocol, Recipe) and issubclass(TrainConfig, Recipe)
    protocol = Protocol()
    for f in dataclasses.fields(Recipe):
        assert getattr(protocol, f.name) == f.default
    pipeline = {f.name: f.default for f in dataclasses.fields(Pipeline)}
    assert pipeline["cache_root"] == ExtractConfig.__dataclass_fields__["cache_root"].default
    assert pipeline["backbone"] == recipe.BACKBONE


@pytest.mark.parametrize(
    ("command", "function"),
    [
        ("evaluate", "vqt_cache.evaluation:evaluate"),
        ("compress", "vqt_cache.compress:compress"),
        ("predict", "vqt_cache.prediction:predict"),
    ],
)
def test_the_smaller_commands_take_their_defaults_from_the_functions_they_call(command, function):
    """evaluate, compress and predict declare their options in config.py; the library function each calls (whose
    API wrapper passes keywords through) has the same defaults."""
    import importlib

    module, name = function.split(":")
    called = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    shared = 0
    for param in COMMANDS[command].params:
        own = "store_url" if param.name == "store" else param.name
        if own in called and called[own].default is not inspect.Parameter.empty and param.name != "live":
            assert param.default == called[own].default, (command, param.name)
            shared += 1
    assert shared >= 2
