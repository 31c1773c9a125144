"""The `vqt-cache` command line: parse, call the library, render. The only module importing typer; rich beside
progress.py."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

import typer
from rich.markup import escape
from rich.table import Table

from vqt_cache import methods, progress, recipe
from vqt_cache.config import (
    FIELD_DEFAULT,
    CompressOptions,
    DemoOptions,
    EvaluateOptions,
    ExportOptions,
    ExtractConfig,
    PredictOptions,
    ReportOptions,
    RunSpec,
    SweepOptions,
    TrainConfig,
    VerifyOptions,
    comma_list,
)
from vqt_cache.config import options as config_options
from vqt_cache.errors import VQTError, VQTWarning
from vqt_cache.formats import size

if TYPE_CHECKING:
    from vqt_cache.training import TrainedRun

app = typer.Typer(
    help="Visual Query Tuning over cached ViT features: extract once, train many cheap experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = progress.console()
errors = progress.console(stderr=True)


def _print_version(wanted: bool) -> None:
    if wanted:
        from vqt_cache import __version__

        console.print(f"vqt-cache {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="print the version", callback=_print_version, is_eager=True, metavar=" ")
    ] = False,
) -> None:
    """Visual Query Tuning over cached ViT features: extract once, train many cheap experiments."""


def _flag(*names: str, help: str) -> Any:
    """A boolean option, shown without the `<bool>` value typer would print for it (it takes none)."""
    return typer.Option(*names, help=help, metavar=" ")


def _options(*configs: type, defaults: dict[str, Any] | None = None) -> Callable:
    """Give a command the options its config classes declare (vqt_cache/config.py): each field's name, type,
    default and help. They come first in its signature, its own parameters (--json) after them; they reach it as
    one dict `opts` of field values (each parsed from the command line's form by its `Cli.parse`). `defaults`
    replaces a field's default for this command (plan: --dataset is optional beside a pipeline file)."""
    declared = [(f, cli) for config in configs for f, cli in config_options(config)]
    hints = {name: kind for config in configs for name, kind in get_type_hints(config).items()}

    def decorate(command: Callable) -> Callable:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name != "opts"
        ]
        made = []
        for f, cli in declared:
            name = cli.name or f.name
            if defaults and f.name in defaults:
                default = defaults[f.name]
            elif cli.cli_default is not FIELD_DEFAULT:
                default = cli.cli_default
            else:
                default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            names = (f"--{name.replace('_', '-')}",) if cli.flag else ()
            kind = cli.type or hints[f.name]
            if default is None:
                kind = kind | None
            parameter = typer.Option(*names, help=cli.help, metavar=" " if cli.flag else None)
            annotation = Annotated[kind, parameter]
            made.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            opts = {}
            for f, cli in declared:
                value = values.pop(cli.name or f.name)
                opts[f.name] = cli.parse(value) if cli.parse else value
            return command(**values, opts=opts)

        parameters = [*made, *own]
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer reads the signature above, not the command's own
        return run

    return decorate


@contextmanager
def _progress(unit: str) -> Iterator[progress.Update]:
    with progress.shown(unit, console) as update:
        yield update


@app.command()
@_options(ExtractConfig)
def extract(
    json_out: Annotated[bool, _flag("--json", help="print the summary as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Run the frozen backbone once over a dataset and write a resumable Zarr store.

    Examples:
      vqt-cache extract --backbone vit_b16 --dataset cub --root ~/data/CUB_200_2011
      vqt-cache extract --backbone vit_b16 --dataset vtab1k/dtd --root ~/data/vtab-1k --layout hidden
      torchrun --nproc_per_node=4 -m vqt_cache extract --backbone vit_b16 --dataset cub
    """
    from vqt_cache.extraction import extract as run_extract

    cfg = ExtractConfig(**opts)
    with _progress("img") as update:
        summary = run_extract(cfg, progress=None if json_out else update)
    if json_out:
        print(json.dumps(summary.as_dict()))
        return
    if summary.nothing_to_do:
        console.print(f"[green]{summary.store} is already complete: nothing to do.[/green]")
    table = Table(title=f"extracted into {summary.store}")
    for column in ("split", "images", "written now", "skipped", "MB written", "seconds", "MB/s", "img/s"):
        table.add_column(column, justify="right")
    for s in summary.splits:
        mb = s.bytes_written / 1e6
        table.add_row(
            s.name,
            str(s.images),
            str(s.written),
            str(len(s.skipped)),
            f"{mb:.1f}",
            f"{s.seconds:.1f}",
            f"{mb / s.seconds:.1f}" if s.written else "-",
            f"{s.written / s.seconds:.1f}" if s.written else "-",
        )
    console.print(table)
    for s in summary.splits:
        for source in s.skipped:
            console.print(f"[yellow]skipped unreadable image[/yellow] {source} ({s.name})")


@app.command()
@_options(ExtractConfig, defaults={"backbone": recipe.BACKBONE, "dataset": None})
def plan(
    pipeline: Annotated[str | None, typer.Argument(help="a pipeline file (else: plan one extract command)")] = None,
    no_time: Annotated[bool, _flag("--no-time", help="sizes only: do not time the backbone and the passes")] = False,
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """How many images each split holds, which are cached or evaluated live, and where the store goes and what it
    costs on disk.

    Nothing is written. Plan takes every option of extract; for a pipeline, --layout, --dtype and --probes apply
    to the stores it does not hold yet. Sizes come from the dataset on disk, or from its release's published split
    sizes.

    Examples:
      vqt-cache plan pipelines/vtab1k.toml --layout hidden --dtype int8
      vqt-cache plan --backbone vit_b16 --dataset cub --root ~/data/CUB_200_2011 --splits train,val
    """
    from vqt_cache.plan import plan_extract, plan_pipeline
    from vqt_cache.sweep import load_pipeline

    timed = None
    if pipeline is not None:
        if opts["dataset"] is not None:
            raise VQTError("plan takes a pipeline file or --dataset, not both")
        loaded = load_pipeline(pipeline)
        plans = plan_pipeline(loaded, opts["layout"], opts["dtype"], opts["probes"])
        if not no_time:
            from vqt_cache.estimate import estimate_pipeline

            with console.status("timing the backbone and the training passes on this device"):
                timed = estimate_pipeline(loaded, plans)
    elif opts["dataset"] is None:
        raise VQTError("plan takes a pipeline file, or --dataset (and --backbone) as for extract")
    else:
        plans = [plan_extract(ExtractConfig(**opts))]
    if json_out:
        found = [p.as_dict() for p in plans]
        if timed is not None:
            for entry, estimate in zip(found, timed[1], strict=True):
                entry["seconds"] = {**estimate.as_dict(), "device": timed[0]}
        print(json.dumps(found))
        return
    table = Table(title="plan: what the stores hold (kB, MB, GB: 10^3, 10^6, 10^9 bytes)")
    for column in ("dataset", "split", "images", "cached", "new images", "per image", "to write"):
        table.add_column(column, justify="right")
    for p in plans:
        for i, s in enumerate(p.splits):
            table.add_row(
                p.dataset if i == 0 else "",
                s.name,
                "unknown" if s.images is None else str(s.images),
                "cached" if s.cached else "live",
                str(s.new_images) if s.cached else "-",
                size(p.bytes_per_image) if i == 0 else "",
                size(s.new_images * p.bytes_per_image) if s.cached else "-",
            )
        table.add_section()
    console.print(table)
    total = sum(p.total_bytes for p in plans)
    kinds = sorted({f"{p.layout} {p.dtype}" for p in plans})
    console.print(f"to write: {size(total)} ({', '.join(kinds)}) into {len(plans)} store(s)")
    for p in plans:
        if p.sizes_from == "published sizes":
            console.print(f"{p.dataset}: not on disk; sizes are the official release's")
        elif p.sizes_from == "store":
            console.print(f"{p.dataset}: not openable here; sizes are its store's")
        if not p.fits:
            console.print(
                f"[red]{p.store} does not fit: {size(p.total_bytes)} to write, {size(p.free_bytes)} free[/red]"
            )
    for p in plans:
        console.print(f"{p.dataset}: {p.store}", highlight=False, soft_wrap=True)
    free = {p.free_bytes for p in plans}
    if len(free) == 1 and None not in free:
        console.print(f"free at the destination: {size(free.pop())}")
    if timed is not None:
        _print_times(*timed, loaded)


def _print_times(device: str, times: list, pipeline: Any) -> None:
    """plan's time table: each dataset's phases and total, measured on this device and extrapolated."""
    from vqt_cache.estimate import clock

    seeds = len(pipeline.protocol.final_seeds)
    table = Table(title=f"plan: how long, measured on {device} and extrapolated")
    for column in ("dataset", "extract", "select", f"final ({seeds} seeds)", "live test", "compress", "total"):
        table.add_column(column, justify="right")
    for t in times:
        parts = (t.extract, t.select, t.final, t.live, t.compress, t.total)
        table.add_row(t.dataset, *(clock(x) for x in parts))
    console.print(table)
    known = [t.total for t in times if t.total is not None]
    console.print(f"total: {clock(sum(known))} on {device}", highlight=False, soft_wrap=True)
    for t in times:
        if t.total is None:
            console.print(f"{t.dataset}: its store does not exist yet; plan times its training once it is extracted")


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="a store (path or URL)")],
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
) -> None:
    """Show what a store holds: backbone, preprocessing, splits, completeness, bytes.

    Example:
      vqt-cache info data/cache/digits/vit_tiny.zarr
    """
    from vqt_cache.store import describe_weights, open_store

    data = open_store(path).describe()
    if json_out:
        print(json.dumps(data, indent=2))
        return
    b = data["backbone"]
    console.print(f"[bold]{data['url']}[/bold]  (vqt-cache store, format {data['format_version']})")
    console.print(f"backbone   {b['name']} = {b['timm_name']} {b['kwargs'] or ''}")
    console.print(
        f"           L={b['depth']} D={b['dim']} H={b['heads']} N={b['tokens']} feature={b['feature_kind']}"
        f"  weights sha256 {b['fingerprint'][:16]}…"
    )
    console.print(f"weights    {describe_weights(b.get('weights') or {})}", highlight=False, soft_wrap=True)
    console.print(
        f"dataset    {data['dataset']['name']} ({data['dataset']['num_classes']} classes) "
        f"from {data['dataset']['root']}"
    )
    p = data["preprocessing"]
    console.print(
        f"preprocess {p['resize']} resize to {p['input_size'][1:]} {p['interpolation']}"
        f"{' (resampled by torch)' if p.get('resample') == 'torch' else ''}, mean {p['mean']}, std {p['std']}"
    )
    console.print(
        f"forward    {data['precision']}"
        + (
            " (bfloat16 autocast; live evaluation and predict run the backbone so too)"
            if data["precision"] == "bf16"
            else ""
        )
    )
    console.print(
        f"layout     {data['layout']} {data['dtype']}, codec {data['codec']}, "
        f"{size(data['bytes_per_image'])} per image"
        + (f", probe arrays {size(data['probe_bytes_per_image'])} per image" if data["probes"] else "")
    )
    images = data["images"]
    console.print(
        "images     [red]damaged: run vqt-cache verify[/red]"
        if images.get("damaged")
        else f"images     {images['images']} images, each stored once: {images['bytes'] / 1e6:.1f} MB on disk"
    )
    table = Table()
    for column in ("split", "images", "shards done", "complete", "skipped", "MB read"):
        table.add_column(column, justify="right")
    for s in data["splits"]:
        if s.get("damaged"):
            table.add_row(s["name"], "[red]damaged: run vqt-cache verify[/red]", "", "", "", "")
            continue
        table.add_row(
            s["name"],
            str(s["images"]),
            f"{s['shards_done']}/{s['shards']}",
            "yes" if s["complete"] else "[red]no[/red]",
            str(len(s["skipped"])),
            f"{s['bytes'] / 1e6:.1f}",
        )
    console.print(table)


def _find_store(cache_root: str) -> str:
    """The only store under the cache root; with none or several, a clear error listing them."""
    from pathlib import Path

    stores = sorted(str(p) for p in Path(cache_root).glob("**/*.zarr") if (p / "zarr.json").exists())
    if len(stores) == 1:
        return stores[0]
    if not stores:
        raise VQTError(f"no store under {cache_root}; run `vqt-cache extract` first or pass --store")
    raise VQTError(f"several stores under {cache_root}, pass --store with one of: {', '.join(stores)}")


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunSpec))  # each a list on the command line


@app.command()
@_options(RunSpec, TrainConfig)
def train(
    cache_root: Annotated[str, typer.Option(help="where to look for the store")] = recipe.CACHE_ROOT,
    blocks: Annotated[
        str,
        typer.Option(help="linear-multi's n, the last blocks whose class tokens it reads; a list (n <= depth)"),
    ] = ",".join(map(str, recipe.LINEAR_MULTI_BLOCKS)),
    json_out: Annotated[bool, _flag("--json", help="print results as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Train VQT queries + linear heads from a store alone; every combination of the lists in one pass per seed.

    Examples:
      vqt-cache train --queries 10
      vqt-cache train --store data/cache/cub/vit_b16.zarr --queries 1,10 --lr 0.5,0.25 --wd 1e-3,0
      vqt-cache train --method vqt,linear,pooled --queries 1 --epochs 50
    """
    from vqt_cache.training import grid
    from vqt_cache.training import train as run_train

    lists = {name: opts.pop(name) for name in RUN_FIELDS}
    n = comma_list(int, "--blocks")(blocks)
    runs = grid(lists["method"], lists["queries"], lists["lr"], lists["wd"], lists["seed"], lists["recipe"], n)
    cfg = TrainConfig(**{**opts, "store": opts["store"] or _find_store(cache_root)}, runs=runs)
    with _progress("step") as update:
        results = run_train(cfg, progress=None if json_out else update)
    if json_out:
        print(json.dumps([dataclasses.asdict(r) for r in results]))
        _fail_if_all_diverged(results)
        return
    evaluated_on = next((r.eval_split for r in results if r.eval_split), None)
    precisions = ", ".join(sorted({r.precision for r in results}))
    title = f"trained on {cfg.store} in {precisions}" + (f", evaluated on {evaluated_on}" if evaluated_on else "")
    table = Table(title=title)
    for column in ("run", f"{evaluated_on or 'eval'} top-1", f"{evaluated_on or 'eval'} mean-class", "folder"):
        table.add_column(column, justify="right")
    for r in results:
        note = " (already done)" if r.skipped else ""
        scores = (
            ("[red]diverged[/red]",) * 2 if r.diverged else (_percent(r.final, "top1"), _percent(r.final, "mean_class"))
        )
        table.add_row(r.name + note, *scores, r.dir)
    console.print(table)
    _print_grids(cfg.runs, results, evaluated_on)
    _fail_if_all_diverged(results)


def _print_grids(specs, results: list[TrainedRun], evaluated_on: str | None) -> None:
    """For a grid (several lrs or wds): per method, T and seed, its eval top-1 over lr × wd, the best in bold."""
    if not evaluated_on or len({(s.lr, s.wd) for s in specs}) < 2:
        return
    found = {r.name: r for r in results}
    for method, T, seed in dict.fromkeys((s.method, s.queries, s.seed) for s in specs):
        at = {(s.lr, s.wd): found[s.name] for s in specs if (s.method, s.queries, s.seed) == (method, T, seed)}
        best = max((r.final["top1"] for r in at.values() if not r.diverged and "top1" in r.final), default=None)
        size = methods.get(method).size
        console.print(f"{method}{f' {size}={T}' if size else ''}, seed {seed}: {evaluated_on} top-1 (%)")
        table = Table()
        wds = sorted({wd for _, wd in at}, reverse=True)
        for column in ("lr ↓  wd →", *(f"{wd:g}" for wd in wds)):
            table.add_column(column, justify="right")
        for lr in sorted({lr for lr, _ in at}, reverse=True):
            cells = []
            for wd in wds:
                run = at.get((lr, wd))
                if run is None or (not run.diverged and "top1" not in run.final):
                    cells.append("-")
                elif run.diverged:
                    cells.append("[red]diverged[/red]")
                else:
                    text = f"{100 * run.final['top1']:.2f}"
                    cells.append(f"[bold]{text}[/bold]" if run.final["top1"] == best else text)
            table.add_row(f"{lr:g}", *cells)
        console.print(table)


def _percent(final: dict, key: str) -> str:
    return f"{100 * final[key]:.2f}" if key in final else "-"


def _fail_if_all_diverged(results: list[TrainedRun]) -> None:
    """Exit 1 with one sentence when no run of the command gave a result."""
    if results and all(r.diverged for r in results):
        errors.print(
            "[red]error:[/red] every run diverged (non-finite loss); nothing was learned: lower the learning rate "
            "or the weight decay",
            soft_wrap=True,
        )
        sys.exit(1)


@app.command()
@_options(EvaluateOptions)
def evaluate(
    run_dirs: Annotated[list[str], typer.Argument(help="finished run folders (of one store)")],
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Top-1 and mean per-class accuracy of trained runs on a split; each result goes into its run folder.

    A split the store does not hold (a test set left uncached) is evaluated live: one forward of the frozen
    backbone over its images serves every given run. An interrupted live evaluation resumes when re-run.

    Example:
      vqt-cache evaluate data/runs/digits/tiny/vqt-T4-lr0.25-wd0-seed* --split test
    """
    from vqt_cache.evaluation import evaluate as run_evaluate

    o = EvaluateOptions(**opts)
    with _progress("img") as update:
        results = run_evaluate(
            run_dirs,
            o.split,
            o.store,
            o.root,
            batch_size=o.batch_size,
            device=o.device,
            workers=o.workers,
            progress=None if json_out else update,
            live=o.live or None,
            precision=o.precision,
        )
    if json_out:
        records = [{**r.record(), "dir": r.dir} for r in results]
        print(json.dumps(records if len(records) > 1 else records[0]))
        return
    for result in results:
        how = f"{'live' if result.live else 'cached'}, {result.precision}"
        console.print(
            f"{result.dir} on {o.split} ({result.images} images, {how}): top-1 {100 * result.top1:.2f}%, "
            f"mean per-class {100 * result.mean_class:.2f}%",
            soft_wrap=True,
            highlight=False,
        )


@app.command()
@_options(PredictOptions)
def predict(
    run_dir: Annotated[str, typer.Argument(help="a finished run folder, or the file `vqt-cache export` wrote")],
    images: Annotated[list[str], typer.Argument(help="image files")],
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Classify raw images through the live path (frozen backbone + the run's queries and head).

    Example:
      vqt-cache predict data/runs/cub/vit_b16/vqt-T10-lr0.5-wd0.001-seed42 bird1.jpg bird2.jpg
    """
    from vqt_cache.prediction import predict as run_predict

    o = PredictOptions(**opts)
    results = run_predict(run_dir, images, o.store, device=o.device)
    if json_out:
        print(json.dumps([r.record() for r in results]))
        return
    table = Table()
    for column in ("image", "class", "label", "probability"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.image, r.class_name, str(r.label), f"{r.probability:.3f}")
    console.print(table)


@app.command()
@_options(ExportOptions)
def export(
    run_dir: Annotated[str, typer.Argument(help="a finished run folder, or its compressed/ folder")],
    *,
    opts: dict[str, Any],
) -> None:
    """Write one standalone file (frozen backbone + queries + head + preprocessing) that `predict` takes.

    Example:
      vqt-cache export data/runs/cub/vit_b16/vqt-T10-lr0.5-wd0.001-seed42
      vqt-cache predict data/runs/cub/vit_b16/vqt-T10-lr0.5-wd0.001-seed42/vqt-T10-lr0.5-wd0.001-seed42.safetensors \
          bird.jpg
      vqt-cache export data/runs/cub/vit_b16/vqt-T1-lr0.5-wd0.001-seed42/compressed   # the compressed head
    """
    from vqt_cache.export import export_run
    from vqt_cache.run_folder import COMPRESSED, compressed_run, is_compressed

    o = ExportOptions(**opts)
    path = export_run(run_dir, o.out, o.store)
    if compressed_run(run_dir) is not None:
        what = "the compressed head"
    elif is_compressed(run_dir):
        what = f"the run's full head; export {Path(run_dir) / COMPRESSED} for its compressed one"
    else:
        what = "the run's head"
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {what})", highlight=False, soft_wrap=True)


@app.command()
@_options(DemoOptions)
def demo(*, opts: dict[str, Any]) -> None:
    """The whole pipeline on scikit-learn's bundled digits, no downloads: extract, train VQT and baselines.

    Examples:
      vqt-cache demo
      vqt-cache demo --recipe shared
    """
    from vqt_cache.demo import run_demo

    o = DemoOptions(**opts)
    with _progress("step") as update:
        rows = run_demo(o.root, epochs=o.epochs, recipe_choice=o.recipe_choice, progress=update, say=console.print)
    title = f"digits: frozen tiny ViT (pretrained on digit parity), transfer to the 10 digits; recipe {o.recipe_choice}"
    table = Table(title=title)
    for column in ("method", "T", "recipe", "configs", "val top-1", "test top-1", "pass s", "pass img/s"):
        table.add_column(column, justify="right")
    for r in rows:
        size = methods.get(r["method"]).size
        table.add_row(
            r["method"],
            "-" if size is None else str(r["T"]) if size == "T" else f"{size}={r['T']}",
            r["recipe"],
            str(r["configs"]),
            f"{100 * r['val']:.1f}",
            f"{100 * r['test']:.1f}",
            f"{r['seconds']:.1f}",
            f"{r['images_per_s']:.0f}",
        )
    console.print(table)


@app.command()
@_options(SweepOptions)
def sweep(
    pipeline: Annotated[str, typer.Argument(help="a pipeline file, e.g. pipelines/demo.toml")],
    *,
    opts: dict[str, Any],
) -> None:
    """Grids × datasets × seeds over cached features with the paper's selection protocol, then the report.

    Examples:
      vqt-cache sweep pipelines/demo.toml
      vqt-cache sweep pipelines/vtab1k.toml --part 0/4      # on four machines, then: vqt-cache report ...
    """
    from vqt_cache.report import write_report
    from vqt_cache.sweep import load_pipeline, parse_part, run_sweep

    o = SweepOptions(**opts)
    p = load_pipeline(pipeline)
    if o.runs_root:
        p = dataclasses.replace(p, runs_root=o.runs_root)
    part = parse_part(o.part)
    if not o.report_only:
        with _progress("step") as update:

            def on_run(done: int, total: int) -> None:
                update(f"sweep {p.name}: runs", done, total)

            handled = run_sweep(p, part, one_pass=o.one_pass, progress=update, on_run=on_run)
        console.print(f"sweep {p.name}: part {part[0]}/{part[1]} handled {', '.join(handled) or 'no datasets'}")
    _print_report(write_report(p))


def _print_report(report: dict) -> None:
    """The headline (VQT at each dataset's T, beside the baselines); results.md has every T and each seed."""
    selected_on, tested_on = report["select_eval"], report["final_eval"]
    table = Table(title=f"{tested_on} top-1 (%), mean ± sample std over seeds; (lr, wd) selected on {selected_on}")
    columns = ("dataset", "method", "T", "n", "recipe", "lr", "wd", f"{selected_on} top-1", f"{tested_on} top-1")
    columns += ("seeds",)
    for column in columns:
        table.add_column(column, justify="right")
    for r in report["headline"]:
        if r["diverged"]:
            test = "[red]diverged[/red]" + (f" ({r['diverged']} of {r['seeds']} seeds)" if r["seeds"] else "")
        elif r.get("missing"):
            test = f"[yellow]missing[/yellow] ({r['missing']} seed{'s' if r['missing'] > 1 else ''} without a result)"
        elif r["test_top1_mean"] is None:
            test = "-"
        else:
            std = r["test_top1_std"]
            test = f"{100 * r['test_top1_mean']:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")
        table.add_row(
            r["dataset"],
            r["label"],
            str(r["T"]) if methods.get(r["method"]).size == "T" else "-",  # VQT's queries
            str(r["T"]) if methods.get(r["method"]).size == "n" else "-",  # linear-multi's blocks
            r["recipe"],
            "-" if r["lr"] is None else f"{r['lr']:g}",
            "-" if r["wd"] is None else f"{r['wd']:g}",
            "-" if r["val_top1"] is None else f"{100 * r['val_top1']:.2f}",
            test,
            str(r["seeds"]),
        )
    console.print(table)
    console.print(f"wrote {', '.join(report['files'])}", highlight=False, soft_wrap=True)


@app.command()
@_options(ReportOptions)
def report(
    pipeline: Annotated[str, typer.Argument(help="the pipeline file the sweep ran")],
    *,
    opts: dict[str, Any],
) -> None:
    """Merge a sweep's run folders (from any number of parts or machines) into results.csv, results.md and plots.

    Example:
      vqt-cache report pipelines/vtab1k.toml
    """
    from vqt_cache.report import write_report
    from vqt_cache.sweep import load_pipeline

    _print_report(write_report(load_pipeline(pipeline), ReportOptions(**opts).out))


@app.command()
@_options(CompressOptions)
def compress(
    run_dir: Annotated[str, typer.Argument(help="a finished VQT run folder")],
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Group-lasso feature selection (docs/method.md §6): keep the top features, retrain the head; writes compressed/.

    Example:
      vqt-cache compress data/runs/digits/demo/vqt-T4-lr0.25-wd0-seed42 --keep 0.7
    """
    from vqt_cache.compress import compress as run_compress

    o = CompressOptions(**opts)
    keep, lasso = o.keep, o.lasso
    result = run_compress(run_dir, keep=keep, lasso=lasso, store_url=o.store)
    if json_out:
        print(json.dumps(result))
        return
    console.print(
        f"kept {result['features_kept']} of {result['features_before']} features; head parameters "
        f"{result['head_params_before']} -> {result['head_params_after']}"
    )
    for split, acc in result["accuracy"].items():
        console.print(f"{split}: top-1 {100 * acc['before']['top1']:.2f}% -> {100 * acc['after']['top1']:.2f}%")
    console.print(f"wrote {result['folder']}", highlight=False, soft_wrap=True)
    for split, acc in result["accuracy"].items():
        lost = 100 * (acc["before"]["top1"] - acc["after"]["top1"])
        if lost > COMPRESSION_LOSS_WARNED:
            errors.print(
                f"[yellow]warning[/yellow]: compression lost {lost:.1f} points of top-1 on {split}: keep more "
                f"features (--keep above {keep:g}) or weaken the lasso (--lasso below {lasso:g})",
                highlight=False,
                soft_wrap=True,
            )


COMPRESSION_LOSS_WARNED = 2.0  # points of top-1 a compression may lose before `compress` warns


@app.command()
@_options(VerifyOptions)
def verify(
    path: Annotated[str, typer.Argument(help="a store (path or URL)")],
    json_out: Annotated[bool, _flag("--json", help="print as JSON")] = False,
    *,
    opts: dict[str, Any],
) -> None:
    """Re-read every shard: completion records, checksums, shapes, NaN/Inf; optionally recompute a sample.

    Exit code 1 when anything is wrong. Example:
      vqt-cache verify data/cache/cub/vit_b16.zarr --recompute 8
    """
    from vqt_cache.verify import verify as run_verify

    with _progress("shard") as update:
        result = run_verify(path, recompute=VerifyOptions(**opts).recompute, progress=None if json_out else update)
    if json_out:
        print(json.dumps(result))
    else:
        for s in result["splits"]:
            console.print(
                f"split {s['name']}: reads {s['shards']} shards, {'complete' if s['complete'] else 'INCOMPLETE'}"
            )
        console.print(f"checked {result['checked']} image shards (each image once, however many splits read it)")
        if result["recomputed"]:
            console.print(f"recomputed {result['recomputed']} images against the backbone")
        for fault in result["faults"]:
            console.print(f"[red]fault:[/red] {fault}", soft_wrap=True, highlight=False)
        console.print(
            "[green]store verified: no faults[/green]"
            if not result["faults"]
            else f"[red]{len(result['faults'])} fault(s) found[/red]"
        )
    if result["faults"]:
        sys.exit(1)


def _fail(message: str) -> None:
    """Print one `error:` line on stderr and exit 2."""
    errors.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False, markup=True)
    sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Our warnings as one `warning:` line; anything else as Python shows it."""
    if issubclass(category, VQTWarning):
        errors.print(f"[yellow]warning[/yellow]: {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main() -> None:
    """Console-script entry: bad input ends with one sentence and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    warnings.showwarning = _show_warning
    try:
        code = command.main(prog_name="vqt-cache", standalone_mode=False)
    except typer.TyperException as exc:  # unknown option, wrong type, missing argument: typer's sentence, one line
        message = " ".join(exc.format_message().split())
        if not message:  # no arguments at all: the help is already printed
            sys.exit(2)
        context = getattr(exc, "ctx", None)
        hint = f" (see '{context.command_path} --help')" if context is not None else ""
        _fail(escape(message) + hint)
    except typer.Abort:
        _fail("aborted")
    except VQTError as exc:
        _fail(escape(str(exc)))
    except OSError as exc:  # permissions, read-only or full file systems, vanished paths: the system's sentence
        where = f" ({exc.filename})" if exc.filename else ""
        _fail(escape(f"{exc.strerror or exc}{where}"))
    if code == 130:  # typer turns Ctrl-C into exit code 130
        errors.print("[yellow]interrupted[/yellow]: finished shards and checkpoints are kept; re-run to resume")
    sys.exit(code if isinstance(code, int) else 0)
