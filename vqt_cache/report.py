"""`vqt-cache report`: merge a sweep's run folders into results.csv, results.md and plots.

Everything is read back from the run folders (config.json, metrics.json, compressed/metrics.json), so folders
written by several `--shard`s, processes or machines merge into one report.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from vqt_cache.sweep import Pipeline, run_folders, select

LABELS = {"linear": "linear probe", "pooled": "pooled (Head2Toe-style)", "vqt": "VQT"}


def _label(method: str, T: int, compressed: bool = False) -> str:
    name = LABELS[method] + (f" T={T}" if method == "vqt" else "")
    return name + " compressed" if compressed else name


def collect(p: Pipeline) -> list[dict[str, Any]]:
    """One row per (dataset, method, T[, compressed]) with selection and final results."""
    rows = []
    for entry in p.datasets:
        select_folders = run_folders(p.folder(entry, "select"))
        chosen = select(select_folders)
        finals: dict[tuple[str, int], list[dict]] = {}
        for folder in run_folders(p.folder(entry, "final")):
            metrics = folder / "metrics.json"
            if not metrics.exists():
                continue
            run = json.loads((folder / "config.json").read_text())["run"]
            final = {"test": json.loads(metrics.read_text())["final"]["top1"], "seed": run["seed"]}
            compressed = folder / "compressed" / "metrics.json"
            if compressed.exists():
                report = json.loads(compressed.read_text())
                final["compressed"] = report["accuracy"][p.protocol.final_eval]["after"]["top1"]
                final["kept"] = report["features_kept"]
            finals.setdefault((run["method"], run["queries"]), []).append(final)
        for (method, T), choice in sorted(chosen.items()):
            tests = [f["test"] for f in finals.get((method, T), []) if f["seed"] in p.protocol.final_seeds]
            base = {
                "dataset": entry.name,
                "group": p.group_of(entry),
                "method": method,
                "T": T,
                "lr": choice["lr"],
                "wd": choice["wd"],
                "val_top1": choice["val_top1"],
                "seeds": len(tests),
                "test_top1_mean": float(np.mean(tests)) if tests else None,
                "test_top1_std": float(np.std(tests)) if tests else None,
            }
            rows.append({**base, "label": _label(method, T)})
            packed = [f["compressed"] for f in finals.get((method, T), []) if "compressed" in f]
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


def write_report(p: Pipeline, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Write results.csv, results.md, heatmaps and (for several T) the accuracy-vs-T plot."""
    out = Path(out_dir) if out_dir else p.root
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(p)
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
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = [
        f"# {p.name}: test top-1 (%), mean ± std over {len(p.protocol.final_seeds)} seeds",
        "",
        f"Backbone `{p.backbone}`; (lr, wd) selected on `{p.protocol.select_eval}` (seed "
        f"{p.protocol.select_seed}, last epoch, ties → smaller lr); final runs on `{p.protocol.final_train}`, "
        f"tested on `{p.protocol.final_eval}`.",
        "",
        "| dataset | group | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for entry in p.datasets:
        cells = []
        for label in labels:
            match = [r for r in rows if r["dataset"] == entry.name and r["label"] == label]
            cells.append(_pct(match[0]["test_top1_mean"], match[0]["test_top1_std"]) if match else "–")
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
        if not r["label"].endswith("compressed"):
            lines.append(f"| {r['dataset']} | {r['label']} | {r['lr']:g} | {r['wd']:g} | {_pct(r['val_top1'])} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plots = _plots(p, rows, out)
    return {"rows": rows, "csv": str(out / "results.csv"), "markdown": str(out / "results.md"), "plots": plots}


def _plots(p: Pipeline, rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for entry in p.datasets:
        folders = run_folders(p.folder(entry, "select"))
        runs = [
            (json.loads((f / "config.json").read_text())["run"], json.loads((f / "metrics.json").read_text()))
            for f in folders
            if (f / "metrics.json").exists()
        ]
        Ts = sorted({r["queries"] for r, _ in runs if r["method"] == "vqt"})
        if not Ts:
            continue
        fig, axes = plt.subplots(1, len(Ts), figsize=(4 * len(Ts), 3.5), squeeze=False)
        for ax, T in zip(axes[0], Ts, strict=True):
            grid = np.full((len(p.grid.lr), len(p.grid.wd)), np.nan)
            for run, metrics in runs:
                if run["method"] == "vqt" and run["queries"] == T and run["lr"] in p.grid.lr and run["wd"] in p.grid.wd:
                    grid[p.grid.lr.index(run["lr"]), p.grid.wd.index(run["wd"])] = 100 * metrics["final"]["top1"]
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
        path = out / f"heatmap-{entry.name.replace('/', '-')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
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
        path = out / "accuracy_vs_T.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written
