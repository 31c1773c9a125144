"""`python -m bench [--quick]`: run every benchmark, print one table, write bench/results.json."""

from __future__ import annotations

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
    live_eval,
    object_storage,
    precision,
    protocol,
    quantization,
    sizing,
    stage_two,
    training,
)

BENCHES = {
    "stage_two": stage_two.run,
    "training": training.run,
    "grid": training.run_grid,
    "extraction": extraction.run,
    "object_storage": object_storage.run,
    "quantization": quantization.run,
    "precision": precision.run,
    "protocol": protocol.run,
    "sizing": sizing.run,
    "live_eval": live_eval.run,
}


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    only = [a for a in argv if not a.startswith("--")] or list(BENCHES)
    console = Console(width=200)
    rows = []
    unknown = [name for name in only if name not in BENCHES]
    if unknown:
        sys.exit(f"error: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
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
    out = Path(__file__).parent / "results.json"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    kept = []  # the rows of the benchmarks not run this time stay
    if out.exists():
        kept = [r for r in json.loads(out.read_text())["rows"] if r.get("suite", r.get("bench")) not in only]
    out.write_text(json.dumps({"meta": meta, "rows": kept + rows}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
