"""`vqt-cache report`: merge a sweep's run folders into results.csv, results.md and plots.

Everything is read back from the run folders (config.json, metrics.json, compressed/metrics.json), so folders
written by several `--part`s, processes or machines merge into one report.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from vqt_cache.errors import VQTError
from vqt_cache.evaluation import read_evaluation
from vqt_cache.files import DamagedFile, read_json, write_bytes, write_json
from vqt_cache.run_folder import FinishedRun, compression_record, finished_runs, run_folders
from vqt_cache.sweep import Pipeline, recorded_recipe, select

MANIFEST = "report.json"  # what the report in a folder wrote, so a later report replaces only that
REPORT_FORMAT = "vqt-cache-report"

LABELS = {"linear": "linear probe", "pooled": "pooled (Head2Toe-style)", "vqt": "VQT"}


def _label(method: str, T: int, compressed: bool = False) -> str:
    name = LABELS[method] + (f" T={T}" if method == "vqt" else "")
    return name + " compressed" if compressed else name


def _check_recipe(p: Pipeline, run: FinishedRun, phase: str) -> None:
    """A run the report collects must have been trained with the pipeline's recipe and splits."""
    folder, config = run.folder, run.config
    want = recorded_recipe(p)
    proto = p.protocol
    splits = {"select": (proto.select_train, proto.select_eval), "final": (proto.final_train, proto.final_eval)}[phase]
    have = config["recipe"]
    if any(have.get(k) != want[k] for k in want):
        key = next(k for k in want if have.get(k) != want[k])
        raise VQTError(
            f"run folder {folder} was trained with {key} {have.get(key)!r}, the pipeline says {want[key]!r}; "
            "re-run the sweep into a new runs_root, or report the pipeline it was trained with"
        )
    allowed = [splits]
    if phase == "final":  # a final run whose test set is evaluated live trains without evaluating
        allowed.append((proto.final_train, None))
    if (config["splits"].get("train"), config["splits"].get("eval")) not in allowed:
        raise VQTError(f"run folder {folder} was trained on splits {config['splits']}, not the pipeline's {splits}")


Runs = dict[str, tuple[list[FinishedRun], list[FinishedRun]]]  # dataset -> (its selection runs, its final runs)


def finished(p: Pipeline) -> Runs:
    """Every dataset's finished selection and final runs, read once from the run folders."""
    return {
        entry.name: tuple(finished_runs(run_folders(p.folder(entry, phase))) for phase in ("select", "final"))
        for entry in p.datasets
    }


def collect(p: Pipeline, runs: Runs) -> list[dict[str, Any]]:
    """One row per (dataset, method, T[, compressed]) with selection and final results.

    A diverged run never gives a number: a (method, T) whose every selection run diverged, or a final seed that
    diverged, shows as diverged (`diverged` counts those runs).
    """
    rows = []
    found = 0
    for entry in p.datasets:
        select_runs, final_runs = runs[entry.name]
        found += len(select_runs) + len(final_runs)
        for phase, phase_runs in (("select", select_runs), ("final", final_runs)):
            for run in phase_runs:
                _check_recipe(p, run, phase)
        chosen = select(select_runs)
        finals: dict[tuple[str, int], list[dict]] = {}
        for run in final_runs:
            if run.seed not in p.protocol.final_seeds:
                continue
            # tested during training, or (trained without an eval split) live afterwards
            live = run.config["splits"].get("eval") is None
            tested = (read_evaluation(run.folder, p.protocol.final_eval) or {}) if live else run.metrics["final"]
            final = {"test": tested.get("top1"), "diverged": run.diverged}
            compressed = compression_record(run.folder)
            if compressed.exists() and not final["diverged"]:
                try:
                    report = read_json(compressed)
                    if live:  # evaluated live with the run
                        packed = tested.get("compressed")
                    else:  # compress tested it on the cached split
                        accuracies = report["accuracy"]
                        packed = (
                            accuracies[p.protocol.final_eval]["after"] if p.protocol.final_eval in accuracies else None
                        )
                    if packed is not None:
                        final["compressed"] = packed["top1"]
                        final["kept"] = report["features_kept"]
                except (KeyError, TypeError) as exc:
                    raise DamagedFile(compressed, f"no {exc} entry") from exc
            finals.setdefault((run.method, run.queries), []).append(final)
        all_diverged = {(r.method, r.queries) for r in select_runs if (r.method, r.queries) not in chosen}
        for method, T in sorted(all_diverged):
            rows.append(
                {
                    "dataset": entry.name,
                    "group": p.group_of(entry),
                    "method": method,
                    "T": T,
                    "lr": None,
                    "wd": None,
                    "val_top1": None,
                    "seeds": 0,
                    "diverged": "selection",
                    "test_top1_mean": None,
                    "test_top1_std": None,
                    "label": _label(method, T),
                }
            )
        for (method, T), choice in sorted(chosen.items()):
            results = finals.get((method, T), [])
            diverged = sum(f["diverged"] for f in results)
            tests = [f["test"] for f in results if not f["diverged"]]
            base = {
                "dataset": entry.name,
                "group": p.group_of(entry),
                "method": method,
                "T": T,
                "lr": choice["lr"],
                "wd": choice["wd"],
                "val_top1": choice["val_top1"],
                "seeds": len(results),
                "diverged": diverged,
                "test_top1_mean": float(np.mean(tests)) if tests and not diverged else None,
                "test_top1_std": float(np.std(tests)) if tests and not diverged else None,
            }
            rows.append({**base, "label": _label(method, T)})
            packed = [f["compressed"] for f in results if "compressed" in f]
            if packed:
                rows.append(
                    {
                        **base,
                        "label": _label(method, T, compressed=True),
                        "seeds": len(packed),
                        "test_top1_mean": float(np.mean(packed)),
                        "test_top1_std": float(np.std(packed)),
                    }
                )
    if not found:
        raise VQTError(f"pipeline {p.name} has no finished runs under {p.root}; run `vqt-cache sweep` on it first")
    return rows


def _means(rows: list[dict], p: Pipeline) -> dict[str, dict[str, float]]:
    """Per label: each group's mean, the mean of group means, and the mean of tasks (datasets with results)."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        values = [r for r in rows if r["label"] == label and r["test_top1_mean"] is not None]
        groups: dict[str, list[float]] = {}
        for r in values:
            groups.setdefault(r["group"], []).append(r["test_top1_mean"])
        means = {g: float(np.mean(v)) for g, v in groups.items()}
        if values:
            means["mean of group means"] = float(np.mean(list(means.values())))
            means["mean of tasks"] = float(np.mean([r["test_top1_mean"] for r in values]))
        out[label] = means
    return out


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _cell(row: dict) -> str:
    if row["diverged"] == "selection":
        return "diverged"
    if row["diverged"]:
        return f"diverged ({row['diverged']} of {row['seeds']} seeds)"
    return _pct(row["test_top1_mean"], row["test_top1_std"])


def _csv(rows: list[dict]) -> str:
    columns = [
        "dataset",
        "group",
        "label",
        "method",
        "T",
        "lr",
        "wd",
        "val_top1",
        "test_top1_mean",
        "test_top1_std",
        "seeds",
        "diverged",
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _markdown(p: Pipeline, rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = [
        f"# {p.name}: test top-1 (%), mean ± std over {len(p.protocol.final_seeds)} seeds",
        "",
        f"Backbone `{p.backbone}`; (lr, wd) selected on `{p.protocol.select_eval}` (seed "
        f"{p.protocol.select_seed}, last epoch, ties → smaller lr); final runs on `{p.protocol.final_train}`, "
        f"tested on `{p.protocol.final_eval}`. A diverged run (non-finite loss) is never selected nor averaged.",
        "",
        "| dataset | group | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for entry in p.datasets:
        cells = []
        for label in labels:
            match = [r for r in rows if r["dataset"] == entry.name and r["label"] == label]
            cells.append(_cell(match[0]) if match else "–")
        lines.append(f"| {entry.name} | {p.group_of(entry)} | " + " | ".join(cells) + " |")
    means = _means(rows, p)
    groups = list(dict.fromkeys(p.group_of(e) for e in p.datasets)) + ["mean of group means", "mean of tasks"]
    lines += ["", "## Means", "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_pct(means[label].get(g)) for label in labels) + " |")
    lines += [
        "",
        "## Selected hyper-parameters",
        "",
        "| dataset | method | lr | wd | val top-1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["label"].endswith("compressed") and r["lr"] is not None:
            lines.append(f"| {r['dataset']} | {r['label']} | {r['lr']:g} | {r['wd']:g} | {_pct(r['val_top1'])} |")
    return "\n".join(lines) + "\n"


def _claim(out: Path, names: list[str]) -> list[str]:
    """The files of the previous report in `out` (from its manifest); refuses to replace any other file."""
    previous: list[str] = []
    if (out / MANIFEST).exists():
        manifest = read_json(out / MANIFEST)
        if manifest.get("format") != REPORT_FORMAT or not isinstance(manifest.get("files"), list):
            raise VQTError(f"{out / MANIFEST} was not written by vqt-cache report; choose another --out")
        previous = manifest["files"]
    foreign = [name for name in [*names, MANIFEST] if (out / name).exists() and name not in [*previous, MANIFEST]]
    if foreign:
        raise VQTError(
            f"{out / foreign[0]} exists and was not written by a vqt-cache report; it is left untouched: "
            "choose another --out or move it away"
        )
    return previous


def write_report(p: Pipeline, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write results.csv, results.md, heatmaps and (for several T) the accuracy-vs-T plot, each file whole.

    The folder's report.json lists what the report wrote: a later report replaces those files and no others.
    """
    out = Path(out_dir) if out_dir else p.root
    runs = finished(p)
    rows = collect(p, runs)
    files = {"results.csv": _csv(rows).encode(), "results.md": _markdown(p, rows).encode(), **_plots(p, rows, runs)}
    previous = _claim(out, list(files))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes(out / name, data)
    for name in set(previous) - set(files):  # a previous report's plot that this one does not make
        (out / name).unlink(missing_ok=True)
    write_json(out / MANIFEST, {"format": REPORT_FORMAT, "files": sorted(files)})
    plots = [str(out / name) for name in files if name.endswith(".png")]
    return {"rows": rows, "csv": str(out / "results.csv"), "markdown": str(out / "results.md"), "plots": plots}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _plots(p: Pipeline, rows: list[dict], runs: Runs) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for entry in p.datasets:
        grid_runs = [r for r in runs[entry.name][0] if r.method == "vqt" and r.eval_top1 is not None]
        Ts = sorted({r.queries for r in grid_runs})
        if not Ts:
            continue
        fig, axes = plt.subplots(1, len(Ts), figsize=(4 * len(Ts), 3.5), squeeze=False)
        for ax, T in zip(axes[0], Ts, strict=True):
            grid = np.full((len(p.grid.lr), len(p.grid.wd)), np.nan)
            for run in grid_runs:
                if run.queries == T and run.lr in p.grid.lr and run.wd in p.grid.wd:
                    grid[p.grid.lr.index(run.lr), p.grid.wd.index(run.wd)] = 100 * run.eval_top1
            image = ax.imshow(grid, cmap="viridis")
            ax.set_xticks(range(len(p.grid.wd)), [f"{w:g}" for w in p.grid.wd])
            ax.set_yticks(range(len(p.grid.lr)), [f"{lr:g}" for lr in p.grid.lr])
            ax.set_xlabel("weight decay")
            ax.set_ylabel("base lr")
            ax.set_title(f"{entry.name} VQT T={T}: val top-1")
            for (i, j), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        written[f"heatmap-{entry.name.replace('/', '-')}.png"] = _png(fig)
        plt.close(fig)
    curves = {}
    for entry in p.datasets:
        points = sorted(
            (r["T"], r["test_top1_mean"], r["test_top1_std"])
            for r in rows
            if r["dataset"] == entry.name and r["label"] == _label("vqt", r["T"]) and r["test_top1_mean"]
        )
        if len(points) > 1:
            curves[entry.name] = points
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, points in curves.items():
            T, mean, std = zip(*points, strict=True)
            ax.errorbar(T, 100 * np.array(mean), yerr=100 * np.array(std), marker="o", capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("queries per layer T")
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["accuracy_vs_T.png"] = _png(fig)
        plt.close(fig)
    return written
