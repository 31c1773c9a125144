"""`python -m bench [NAME...] [--quick]`: run the benchmarks (all by default), print one table, write
bench/results.json (rows of benchmarks not run this time are kept), and rebuild docs/benchmarks.md's tables from it."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import (
    extraction,
    gpu,
    host,
    live_eval,
    loader,
    object_storage,
    plan,
    precision,
    probes,
    protocol,
    quantization,
    sizing,
    stage_two,
    startup,
    tables,
    training,
)
from vqt_cache.files import write_bytes

BENCHES = {
    "stage_two": stage_two.run,
    "training": training.run,
    "grid": training.run_grid,
    "extraction": extraction.run,
    "host": host.run,
    "loader": loader.run,
    "object_storage": object_storage.run,
    "quantization": quantization.run,
    "precision": precision.run,
    "protocol": protocol.run,
    "plan": plan.run,
    "sizing": sizing.run,
    "probes": probes.run,
    "live_eval": live_eval.run,
    "startup": startup.run,
    "gpu": gpu.run,  # every GPU figure in one call (on the GPU machine); not part of a plain `python -m bench`
}
DEFAULT = [name for name in BENCHES if name != "gpu"]


def parse(argv: list[str]) -> argparse.Namespace:
    """NAME... (default: all) and --quick; anything else is one error line and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(BENCHES)}")
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and epochs (a smoke run: writes no results)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    quick, only = args.quick, args.names or DEFAULT
    console = Console(width=200)
    rows = []
    for name in only:
        console.print(f"[bold]running {name}[/bold] ...")
        start = time.perf_counter()
        rows += [{"suite": name, **row} for row in BENCHES[name](quick=quick)]
        console.print(f"  {name} took {time.perf_counter() - start:.0f} s")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(
        title=f"vqt-cache benchmarks ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    console.print(table)
    if quick:  # a smoke run: its figures are not results
        console.print("--quick: bench/results.json and docs/benchmarks.md are left as they are")
        return
    out = Path(__file__).parent / "results.json"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    kept = []  # the rows of the benchmarks not run this time stay
    if out.exists():
        kept = [r for r in json.loads(out.read_text())["rows"] if r.get("suite", r.get("bench")) not in only]
    write_bytes(out, json.dumps({"meta": meta, "rows": kept + rows}, indent=2).encode())
    console.print(f"wrote {out}")
    changed = tables.update()  # the docs' tables are rebuilt from the results just written
    console.print(f"docs: {len(changed)} benchmark table(s) rewritten {', '.join(changed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
