"""The `vqt-cache` command line: parse, call the library, render. The only module importing typer and rich."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from vqt_cache.errors import VQTError

app = typer.Typer(
    help="Visual Query Tuning over cached ViT features: extract once, train many cheap experiments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


def _model_kwargs(pairs: list[str]) -> dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VQTError(f"--model-arg takes KEY=VALUE, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


class _Rate(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:7.1f} {self.unit}/s")


@contextmanager
def _progress(unit: str):
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def update(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done, total=total)

        yield update


@app.command()
def extract(
    backbone: Annotated[str, typer.Option(help="short name (vit_b16, vit_b16_mae, ...) or any timm ViT name")],
    dataset: Annotated[str, typer.Option(help="cub, fgvc/<task>, vtab1k/<task>, imagefolder or digits")],
    root: Annotated[str | None, typer.Option(help="dataset folder (default data/downloads/<dataset>)")] = None,
    splits: Annotated[str | None, typer.Option(help="comma-separated splits (default: all)")] = None,
    layout: Annotated[str, typer.Option(help="kv (keys+values) or hidden (LN1 outputs, half the bytes)")] = "kv",
    dtype: Annotated[str, typer.Option(help="float16 or float32")] = "float16",
    codec: Annotated[str, typer.Option(help="none, zstd or blosc")] = "none",
    batch_size: Annotated[int, typer.Option(help="images per forward")] = 32,
    shard_size: Annotated[int, typer.Option(help="images per logical shard (unit of resume)")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    out: Annotated[
        str | None, typer.Option(help="store path or URL (default <cache-root>/<dataset>/<backbone>.zarr)")
    ] = None,
    cache_root: Annotated[str, typer.Option(help="root of the default store paths")] = "data/cache",
    weights: Annotated[str | None, typer.Option(help="weights FILE, 'random', or none for the timm cache")] = None,
    model_arg: Annotated[list[str] | None, typer.Option(help="timm model argument KEY=VALUE (repeatable)")] = None,
    on_bad_image: Annotated[str, typer.Option(help="fail or skip (skipped images are recorded)")] = "fail",
    workers: Annotated[int, typer.Option(help="image decoding processes")] = 2,
    json_out: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run the frozen backbone once over a dataset and write a resumable Zarr store.

    Examples:
      vqt-cache extract --backbone vit_b16 --dataset cub --root ~/data/CUB_200_2011
      vqt-cache extract --backbone vit_b16 --dataset vtab1k/dtd --root ~/data/vtab-1k --layout hidden
      torchrun --nproc_per_node=4 -m vqt_cache extract --backbone vit_b16 --dataset cub
    """
    from vqt_cache.extract import ExtractConfig
    from vqt_cache.extract import extract as run_extract

    cfg = ExtractConfig(
        backbone=backbone,
        dataset=dataset,
        root=root,
        splits=tuple(splits.split(",")) if splits else None,
        layout=layout,
        dtype=dtype,
        codec=codec,
        batch_size=batch_size,
        shard_size=shard_size,
        device=device,
        out=out,
        cache_root=cache_root,
        weights=weights,
        model_kwargs=_model_kwargs(model_arg or []),
        on_bad_image=on_bad_image,
        workers=workers,
    )
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
def info(
    path: Annotated[str, typer.Argument(help="a store (path or URL)")],
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """Show what a store holds: backbone, preprocessing, splits, completeness, bytes.

    Example:
      vqt-cache info data/cache/digits/vit_tiny.zarr
    """
    from vqt_cache.store import open_store

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
    console.print(
        f"dataset    {data['dataset']['name']} ({data['dataset']['num_classes']} classes) "
        f"from {data['dataset']['root']}"
    )
    p = data["preprocessing"]
    console.print(
        f"preprocess {p['resize']} resize to {p['input_size'][1:]} {p['interpolation']}, mean {p['mean']}, "
        f"std {p['std']}"
    )
    console.print(
        f"layout     {data['layout']} {data['dtype']}, codec {data['codec']}, "
        f"{data['bytes_per_image'] / 1e6:.2f} MB per image"
    )
    table = Table()
    for column in ("split", "images", "shards done", "complete", "skipped", "MB stored"):
        table.add_column(column, justify="right")
    for s in data["splits"]:
        table.add_row(
            s["name"],
            str(s["images"]),
            f"{s['shards_done']}/{s['shards']}",
            "yes" if s["complete"] else "[red]no[/red]",
            str(len(s["skipped"])),
            f"{s['bytes'] / 1e6:.1f}",
        )
    console.print(table)


def main() -> None:
    """Console-script entry: bad input ends with one sentence and exit code 2, never a traceback."""
    try:
        app()
    except VQTError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        sys.exit(2)
