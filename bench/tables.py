"""The docs' benchmark tables (docs/benchmarks.md), generated from bench/results.json (never copied by hand).

    python -m bench.tables           rewrite every generated table of the docs from bench/results.json
    python -m bench.tables --check   exit 1, naming the tables, when a doc differs from what results.json gives

`python -m bench` calls `update` after writing results.json, so a benchmark run refreshes the tables with it. A
generated table sits between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in any of `DOCS`; NAME is a key of
`TABLES`. This module imports neither torch nor the benchmarks: `tests/test_docs.py` runs `--check` in a subprocess.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from vqt_cache.files import write_bytes
from vqt_cache.formats import DEFAULT_DTYPE, DEFAULT_LAYOUT

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
DOCS = [ROOT / "docs" / "benchmarks.md"]  # the files that hold generated tables
BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def number(value: float | None, digits: int = 3) -> str:
    """A figure as a reader wants it: three significant digits, thousands separated, no exponent above 1e-3."""
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) < 1e-2:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:#.{digits}g}".rstrip(".")


def times(value: float) -> str:
    return f"{number(value)}×"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def rows_of(results: list[dict], bench: str, suite: str | None = None) -> list[dict]:
    return [r for r in results if r.get("bench") == bench and (suite is None or r.get("suite", bench) == suite)]


def _after(what: str) -> str:
    return what.split(", ")[-1]


def training(results: list[dict]) -> str:
    rows = [
        [
            f"T={r['T']}, {_after(r['what'])}",
            number(r["images_per_s"]),
            number(r["epochs_1_10"]),
            number(r["last_10_epochs"]),
            times(r["x_live_semantics"]),
            times(r["x_float32"]),
        ]
        for r in rows_of(results, "train")
    ]
    header = ["`vqt-cache train`, 200 images, batch 64", "img/s, all epochs", "epochs 1-10", "last 10", "× live step"]
    return table([*header, "× float32"], rows)


def grid(results: list[dict]) -> str:
    rows = []
    for r in rows_of(results, "grid"):
        other = number(r["sequential_s"]) if "sequential_s" in r else None
        versus = f"{number(r['one_pass_s'])} vs {other}" if other else number(r["one_pass_s"])
        rows.append([r["what"], versus, times(r["speedup"])])
    return table(["grid of 20 configurations", "seconds", "ratio"], rows)


def protocol(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["wall_s"]), times(r["x_float32"]) if "x_float32" in r else "-"]
        for r in rows_of(results, "protocol")
    ]
    return table(["one VTAB-1k-sized task", "wall s", "× float32"], rows)


def plan(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["wall_s"]), f"{r['estimate/taken']:.2f}" if "estimate/taken" in r else "-"]
        for r in rows_of(results, "plan")
    ]
    return table(["how long the demo pipeline takes", "wall s", "estimate / taken"], rows)


def precision(results: list[dict]) -> str:
    rows = [
        [
            r["what"],
            f"{r['test top-1 mean']:.1f} ± {r['test top-1 std']:.1f}",
            number(r["logit rel err"]),
        ]
        for r in rows_of(results, "precision")
    ]
    return table(["run", "test top-1, mean ± std", "logits vs float32, max (relative)"], rows)


def sizing(results: list[dict]) -> str:
    found = {r["what"]: r for r in rows_of(results, "sizing")}
    rows = []
    for choice in ("kv float32", "kv float16", "kv int8", "hidden float32", "hidden float16", "hidden int8"):
        mb = found[f"ViT-B/16 bytes per image, {choice}"]["MB"]
        vtab = next(r for w, r in found.items() if w.startswith("vtab1k after") and w.endswith(choice))["GB"]
        fgvc = next(r for w, r in found.items() if w.startswith("fgvc after") and w.endswith(choice))["GB"]
        cells = [choice, number(mb), f"{number(vtab)} GB", f"{number(fgvc)} GB"]
        default = choice == f"{DEFAULT_LAYOUT} {DEFAULT_DTYPE}"
        rows.append([f"**{c}**" for c in [f"{choice} (the default)", *cells[1:]]] if default else cells)
    mb = found["ViT-B/16 bytes per image, kv float16"]["MB"]
    vtab, fgvc = (found[f"{s} before: every split, kv float16"]["GB"] for s in ("vtab1k", "fgvc"))
    before = ["before: every split, kv float16", number(mb), f"{number(vtab)} GB", f"{number(fgvc)} GB"]
    return table(["layout, dtype", "MB per image", "VTAB-1k (19 tasks)", "FGVC (5 sets)"], [before, *rows])


def sizing_backbones(results: list[dict]) -> str:
    rows = [[f"`{r['what']}`", str(r["tokens"]), number(r["MB"])] for r in rows_of(results, "sizing_backbones")]
    return table(["backbone (model arguments)", "tokens", "MB per image, hidden int8"], rows)


def quantization(results: list[dict]) -> str:
    rows = []
    for r in rows_of(results, "quantization"):
        if "test top-1 mean" not in r:
            continue
        store = r["what"].split(", ")[1].split(":")[0]
        error = (
            "0"
            if r["feature max rel err"] == 0
            else f"{number(r['feature max rel err'])} / {number(r['feature mean rel err'])}"
        )
        rows.append(
            [
                store,
                error,
                number(r["logit max rel err"]),
                f"{r['test top-1 mean']:.1f} ± {r['test top-1 std']:.1f}",
            ]
        )
    header = ["store", "feature error vs float32, max / mean (relative)", "logits of float32-trained runs, max"]
    return table([*header, "test top-1, mean ± std"], rows)


def extraction(results: list[dict]) -> str:
    rows = []
    for r in rows_of(results, "extract"):
        rows.append(
            [
                r["what"],
                number(r.get("images_per_s")),
                times(r["ratio"]) if "ratio" in r else "-",
                number(r.get("MB_s")),
                f"{100 * r['of_disk']:.0f}%" if "of_disk" in r else "-",
            ]
        )
    return table(["stage one, ViT-B/16, this CPU", "img/s", "× plain forward", "MB/s", "of the disk"], rows)


def store_io(results: list[dict]) -> str:
    rows = [
        [
            r["what"],
            number(r["write_MB_s"]),
            number(r["random_read_MB_s"]),
            number(r["MB_per_image"]),
            times(r["compression"]),
        ]
        for r in rows_of(results, "store_io")
    ]
    return table(["layout dtype codec", "write MB/s", "random batches, MB/s", "MB per image", "compression"], rows)


def object_storage(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["local"]), number(r["s3"]), number(r["s3_over_local"])]
        for r in rows_of(results, "object_storage")
    ]
    return table(["", "local disk", "s3:// (moto)", "s3 / local"], rows)


def live_eval(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["images_per_s"]), number(r["plain_forward_images_per_s"]), times(r["x_plain_forward"])]
        for r in rows_of(results, "live_eval")
    ]
    return table(["live evaluation", "img/s", "plain forward img/s", "× plain forward"], rows)


def memory(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["peak_rss_GiB"]), number(r["limit_GiB"]), number(r["images_per_s"])]
        for r in rows_of(results, "memory")
    ]
    return table(["streaming", "peak RSS, GiB", "limit, GiB", "img/s"], rows)


def host(results: list[dict]) -> str:
    rows = [
        [r["what"], number(r["images_per_s"]), number(r["ms_cpu_per_image"]), number(r.get("x_1_thread"))]
        for r in rows_of(results, "host")
    ]
    header = ["extraction's host work, ViT-B/16 hidden int8 (1.87 MB an image)", "img/s", "ms CPU per image"]
    return table([*header, "× 1 thread"], rows)


def loader(results: list[dict]) -> str:
    rows = [[r["what"], number(r["img_s_per_core"])] for r in rows_of(results, "loader")]
    return table(["decode + preprocess for ViT-B/16, one core", "img/s per core"], rows)


def startup(results: list[dict]) -> str:
    rows = [[r["what"], number(r["wall_s"]), number(r.get("beyond_torch_s"))] for r in rows_of(results, "startup")]
    return table(["a stage-two command, fresh process, this CPU", "seconds", "beyond import torch"], rows)


def gpu(results: list[dict]) -> str:
    found = rows_of(results, "gpu")
    if not found:
        return "No GPU figures are recorded yet: `python -m bench gpu` on a machine with a GPU writes them.\n"
    rows = [
        [
            r["what"],
            number(r.get("img_s")),
            number(r.get("of_bound", r.get("of_forward"))),
            number(r.get("ms_per_step")),
            number(r.get("outside_epochs_s")),
            number(r.get("wall_s")),
            number(r.get("aten_ops")),
        ]
        for r in found
    ]
    header = [f"`python -m bench gpu`, {found[0]['device']}", "img/s", "of its bound", "ms/step", "s outside"]
    return table([*header, "wall s", "aten ops/step"], rows)


def probes(results: list[dict]) -> str:
    found = rows_of(results, "probes")
    size = [
        [r["what"], number(r["kB"]), f"{r['vs hidden %']:.1f}%", f"{r['vs kv %']:.1f}%"] for r in found if "kB" in r
    ]
    errors = [r for r in found if "max abs" in r]
    error = [[r["what"], number(r["max abs"]), number(r["mean abs"]), number(r["token rms"])] for r in errors]
    header = ["what `extract --probes` adds", "kB per image", "of a hidden store", "of a kv store"]
    return table(header, size) + "\n" + table(["", "max abs error", "mean abs error", "token rms"], error)


TABLES: dict[str, Callable[[list[dict]], str]] = {
    "training": training,
    "grid": grid,
    "protocol": protocol,
    "plan": plan,
    "precision": precision,
    "sizing": sizing,
    "sizing_backbones": sizing_backbones,
    "quantization": quantization,
    "extraction": extraction,
    "store_io": store_io,
    "object_storage": object_storage,
    "live_eval": live_eval,
    "memory": memory,
    "gpu": gpu,
    "host": host,
    "startup": startup,
    "loader": loader,
    "probes": probes,
}


def render(doc: str, results: list[dict], where: str = "the doc") -> str:
    """The doc with every generated table rebuilt from `results` (the rows of results.json)."""

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise SystemExit(f"{where} has a table bench:{name} that bench/tables.py does not know")
        return match.group(1) + TABLES[name](results) + match.group(4)

    return BLOCK.sub(fill, doc)


def update(check: bool = False) -> list[str]:
    """Rewrite the docs' generated tables (or, with check, only compare); returns the tables that differ."""
    results = json.loads(RESULTS.read_text())["rows"]
    differ = []
    for path in DOCS:
        old = path.read_text()
        new = render(old, results, path.name)
        changed = [m["name"] for m, n in zip(BLOCK.finditer(old), BLOCK.finditer(new), strict=True) if m[0] != n[0]]
        if changed and not check:
            write_bytes(path, new.encode())
        differ += changed
    return differ


if __name__ == "__main__":
    check = sys.argv[1:] == ["--check"]
    if sys.argv[1:] not in ([], ["--check"]):
        raise SystemExit("usage: python -m bench.tables [--check]")
    differ = update(check)
    if check and differ:
        print(f"the docs' tables {', '.join(differ)} differ from bench/results.json: run `python -m bench.tables`")
        raise SystemExit(1)
    print(f"docs: {len(differ)} benchmark table(s) {'differ' if check else 'rewritten'}")
