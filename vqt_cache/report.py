"""`vqt-cache report`: merge a sweep's run folders into results.csv, results.md and plots.

Everything is read back from the run folders (config.json, metrics.json, compressed/metrics.json), so folders
written by several `--part`s, processes or machines merge into one report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np

from vqt_cache import methods, recipe
from vqt_cache.errors import VQTError
from vqt_cache.evaluation import read_evaluation
from vqt_cache.files import DamagedFile, read_json, write_bytes, write_json
from vqt_cache.methods.vqt import METHOD as VQT
from vqt_cache.run_folder import FinishedRun, compression_record, finished_runs, run_folders
from vqt_cache.store import describe_weights
from vqt_cache.sweep import Pipeline, recorded_recipe, select

MANIFEST = "report.json"  # what the report in a folder wrote, so a later report replaces only that
REPORT_FORMAT = "vqt-cache-report"


def _label(method: str, T: int, compressed: bool = False) -> str:
    name = methods.get(method).describe(T)
    return name + " compressed" if compressed else name


def _is_vqt(r: dict) -> bool:  # the method the headline, heatmaps and accuracy-against-T plot are about
    return r["method"] == VQT.name


def _check_recipe(p: Pipeline, run: FinishedRun, phase: str) -> None:
    """A run the report collects must have been trained with the pipeline's recipe and splits."""
    folder, config = run.folder, run.config
    want = recorded_recipe(p)
    proto = p.protocol
    splits = {"select": (proto.select_train, proto.select_eval), "final": (proto.final_train, proto.final_eval)}[phase]
    have = dataclasses.asdict(config.recipe)
    found = config.recipe.optimization.get("name")
    expected = recipe.optimization(run.method, p.recipe).name
    if found != expected:
        raise VQTError(
            f"run folder {folder} was trained with the {found} recipe, the pipeline's recipe = {p.recipe!r} trains "
            f"{run.method} with {expected}'s; re-run the sweep into a new runs_root, or report the pipeline it was "
            "trained with"
        )
    if any(have.get(k) != want[k] for k in want):
        key = next(k for k in want if have.get(k) != want[k])
        raise VQTError(
            f"run folder {folder} was trained with {key} {have.get(key)!r}, the pipeline says {want[key]!r}; "
            "re-run the sweep into a new runs_root, or report the pipeline it was trained with"
        )
    allowed = [splits]
    if phase == "final":  # a final run whose test set is evaluated live trains without evaluating
        allowed.append((proto.final_train, None))
    if (config.splits.train, config.splits.eval) not in allowed:
        trained = (config.splits.train, config.splits.eval)
        raise VQTError(f"run folder {folder} was trained on splits {trained}, not the pipeline's {splits}")


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
    diverged, shows as diverged (`diverged` counts those runs). A final seed without its test result yet (still
    training, or its live evaluation not done) leaves the mean out: `missing` counts those seeds.
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
        # the backbone the runs were trained on, and where its weights came from
        stores = [r.config.store for r in [*select_runs, *final_runs]]
        described = {f"{s.backbone or p.backbone}, weights {describe_weights(s.weights)}" for s in stores}
        backbone = "; ".join(sorted(described))
        finals: dict[tuple[str, int], list[dict]] = {}
        for run in final_runs:
            if run.seed not in p.protocol.final_seeds:
                continue
            # tested during training, or (trained without an eval split) live afterwards
            live = run.config.splits.eval is None
            tested = (read_evaluation(run.folder, p.protocol.final_eval) or {}) if live else run.metrics["final"]
            final = {"test": tested.get("top1"), "diverged": run.diverged, "seed": run.seed}
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
                    "recipe": recipe.optimization(method, p.recipe).name,
                    "lr": None,
                    "wd": None,
                    "val_top1": None,
                    "seeds": 0,
                    "diverged": "selection",
                    "missing": 0,
                    "test_top1_mean": None,
                    "test_top1_std": None,
                    "backbone": backbone,
                    "label": _label(method, T),
                }
            )
        for (method, T), choice in sorted(chosen.items()):
            results = finals.get((method, T), [])
            diverged = sum(f["diverged"] for f in results)
            tests = [f["test"] for f in results if not f["diverged"] and f["test"] is not None]
            per_seed = {f["seed"]: f["test"] for f in results if not f["diverged"] and f["test"] is not None}
            missing = len(p.protocol.final_seeds) - diverged - len(tests)  # not trained or not tested yet
            complete = tests and not diverged and not missing
            base = {
                "dataset": entry.name,
                "group": p.group_of(entry),
                "method": method,
                "T": T,
                "recipe": recipe.optimization(method, p.recipe).name,
                "lr": choice["lr"],
                "wd": choice["wd"],
                "val_top1": choice["val_top1"],
                "seeds": len(results),
                "diverged": diverged,
                "missing": missing,
                "test_top1_mean": float(np.mean(tests)) if complete else None,
                "test_top1_std": sample_std(tests) if complete else None,
                "per_seed": per_seed,
                "backbone": backbone,
            }
            rows.append({**base, "label": _label(method, T)})
            packed = [f["compressed"] for f in results if "compressed" in f]
            if packed:
                unpacked = len(p.protocol.final_seeds) - len(packed)  # seeds not compressed (or not tested) yet
                rows.append(
                    {
                        **base,
                        "label": _label(method, T, compressed=True),
                        "seeds": len(packed),
                        "missing": unpacked,
                        "test_top1_mean": float(np.mean(packed)) if not unpacked else None,
                        "test_top1_std": sample_std(packed) if not unpacked else None,
                        "per_seed": {f["seed"]: f["compressed"] for f in results if "compressed" in f},
                    }
                )
    if not found:
        raise VQTError(f"pipeline {p.name} has no finished runs under {p.root}; run `vqt-cache sweep` on it first")
    return rows


def sample_std(values: list[float]) -> float | None:
    """The standard deviation over seeds as papers report it: the sample's (n - 1); None for one seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


HEADLINE = VQT.label  # the headline table's VQT column: each dataset's VQT at its own T


def headline(p: Pipeline, rows: list[dict]) -> list[dict]:
    """The paper's table: per dataset, one column per method, each at its size for that task (of several sizes, VQT's
    Ts or linear-multi's n, the one whose selected configuration scored best on the selection split, ties ->
    smaller: never chosen on the test set), under the method's label."""
    out = []
    order = {name: i for i, name in enumerate(methods.names())}
    for entry in p.datasets:
        mine = [r for r in rows if r["dataset"] == entry.name]
        for name in sorted({r["method"] for r in mine}, key=order.__getitem__):
            label = methods.get(name).label
            own = [r for r in mine if r["method"] == name and r["label"] == _label(name, r["T"])]  # uncompressed
            scored = [r for r in own if r["val_top1"] is not None]
            if scored:
                out.append({**min(scored, key=lambda r: (-r["val_top1"], r["T"])), "label": label})
            else:  # every selection run of the method diverged: the headline says so
                out += [{**r, "label": label} for r in own][:1]
    return out


def _means(rows: list[dict], p: Pipeline, labels: list[str]) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per label: each group's mean, the mean of group means, and the mean of tasks, all over the same datasets:
    those where every label has a result (like is compared with like); and those datasets."""
    results = {(r["dataset"], r["label"]): r["test_top1_mean"] for r in rows if r["test_top1_mean"] is not None}
    common = [e for e in p.datasets if all((e.name, label) in results for label in labels)]
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        groups: dict[str, list[float]] = {}
        for entry in common:
            groups.setdefault(p.group_of(entry), []).append(results[(entry.name, label)])
        means = {g: float(np.mean(v)) for g, v in groups.items()}
        if common:
            means["mean of group means"] = float(np.mean(list(means.values())))
            means["mean of tasks"] = float(np.mean([results[(e.name, label)] for e in common]))
        out[label] = means
    return out, [e.name for e in common]


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _cell(row: dict) -> str:
    if row["diverged"] == "selection":
        return "diverged"
    if row["diverged"]:
        return f"diverged ({row['diverged']} of {row['seeds']} seeds)"
    if row.get("missing"):
        return f"missing ({row['missing']} seed{'s' if row['missing'] > 1 else ''} without a result)"
    return _pct(row["test_top1_mean"], row["test_top1_std"])


def _csv(rows: list[dict]) -> str:
    columns = [
        "dataset",
        "group",
        "label",
        "method",
        "T",
        "recipe",
        "lr",
        "wd",
        "val_top1",
        "test_top1_mean",
        "test_top1_std",
        "seeds",
        "diverged",
        "missing",
        "backbone",
    ]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _table(p: Pipeline, rows: list[dict], labels: list[str]) -> list[str]:
    """One row per dataset, one column per label, then the group means and both overall means."""
    lines = ["| dataset | group | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for entry in p.datasets:
        cells = []
        for label in labels:
            match = [r for r in rows if r["dataset"] == entry.name and r["label"] == label]
            cells.append(_cell(match[0]) if match else "–")
        lines.append(f"| {entry.name} | {p.group_of(entry)} | " + " | ".join(cells) + " |")
    means, common = _means(rows, p, labels)
    groups = list(dict.fromkeys(p.group_of(e) for e in p.datasets)) + ["mean of group means", "mean of tasks"]
    lines += ["", "| mean | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(_pct(means[label].get(g)) for label in labels) + " |")
    left_out = [e.name for e in p.datasets if e.name not in common]
    if left_out:
        lines += [
            "",
            f"Means over the {len(common)} of {len(p.datasets)} datasets where every column has a result; left out: "
            f"{', '.join(left_out)}.",
        ]
    return lines


def _markdown(p: Pipeline, rows: list[dict], top: list[dict]) -> str:
    proto = p.protocol
    with_T = {r["dataset"]: r["T"] for r in top if r["label"] == HEADLINE}
    backbone = "; ".join(sorted({r["backbone"] for r in rows}))
    lines = [
        f"# {p.name}: {proto.final_eval} top-1 (%)",
        "",
        f"Backbone: {backbone}. Each cell: mean ± sample standard deviation (n − 1) over the "
        f"{len(proto.final_seeds)} seeds {', '.join(map(str, proto.final_seeds))}. (lr, wd) selected on "
        f"`{proto.select_eval}` (trained on `{proto.select_train}`, seed {proto.select_seed}, last epoch, ties → "
        f"smaller lr); final runs trained on `{proto.final_train}` and tested on `{proto.final_eval}`. A diverged "
        "run (non-finite loss) is never selected nor averaged. Means over datasets in two conventions: the mean "
        "of the group means, and the mean of tasks.",
        "",
        f"Recipe: {p.recipe}: "
        + (
            "each method trained with its paper's optimizer, learning-rate grid, schedule and head initialisation "
            "(the recipe column below; docs/method.md §9)"
            if p.recipe == "own"
            else "every method trained with VQT's (Adam, VQT's grid, warm-up and cosine per epoch): a controlled "
            "comparison, not the papers' own recipes"
        )
        + f"; {proto.epochs} epochs at batch {proto.batch_size} for every method, on cached features "
        "(no augmentation).",
        "",
        "## Headline",
        "",
        f"VQT at each dataset's T ({', '.join(f'{d}: {T}' for d, T in with_T.items())}; of several Ts, the one "
        f"selected on `{proto.select_eval}`).",
        "",
    ]
    for name in dict.fromkeys(r["method"] for r in top if not _is_vqt(r) and methods.get(r["method"]).size):
        method = methods.get(name)  # another method with sizes (linear-multi's n): the size selected, as VQT's T
        sizes = ", ".join(f"{r['dataset']}: {r['T']}" for r in top if r["method"] == name)
        lines += [f"{method.label} at each dataset's {method.size} ({sizes}; selected the same way).", ""]
    lines += _table(p, top, list(dict.fromkeys(r["label"] for r in top)))
    lines += ["", "## Every configuration", ""]
    lines += _table(p, rows, list(dict.fromkeys(r["label"] for r in rows)))
    seeds = list(proto.final_seeds)
    lines += [
        "",
        f"## Per seed ({proto.final_eval} top-1, %)",
        "",
        "| dataset | method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for r in rows:
        if r.get("per_seed") is not None:
            values = [_pct(r["per_seed"][s]) if s in r["per_seed"] else "–" for s in seeds]
            lines.append(f"| {r['dataset']} | {r['label']} | " + " | ".join(values) + " |")
    lines += [
        "",
        "## Selected hyper-parameters",
        "",
        f"| dataset | method | recipe | lr | wd | {proto.select_eval} top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["label"].endswith("compressed") and r["lr"] is not None:
            cells = (r["dataset"], r["label"], r["recipe"], f"{r['lr']:g}", f"{r['wd']:g}", _pct(r["val_top1"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _per_seed_csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["dataset", "label", "seed", "test_top1"])
    for r in rows:
        for seed, value in sorted((r.get("per_seed") or {}).items()):
            writer.writerow([r["dataset"], r["label"], seed, value])
    return text.getvalue()


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
    top = headline(p, rows)
    files = {
        "results.csv": _csv(rows).encode(),
        "headline.csv": _csv(top).encode(),
        "per_seed.csv": _per_seed_csv(rows).encode(),
        "results.md": _markdown(p, rows, top).encode(),
        **_plots(p, rows, runs),
    }
    previous = _claim(out, list(files))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_bytes(out / name, data)
    for name in set(previous) - set(files):  # a previous report's plot that this one does not make
        (out / name).unlink(missing_ok=True)
    write_json(out / MANIFEST, {"format": REPORT_FORMAT, "files": sorted(files)})
    plots = [str(out / name) for name in files if name.endswith((".png", ".pdf"))]
    return {
        "rows": rows,
        "headline": top,
        "select_eval": p.protocol.select_eval,
        "final_eval": p.protocol.final_eval,
        "csv": str(out / "results.csv"),
        "markdown": str(out / "results.md"),
        "plots": plots,
        "files": [str(out / name) for name in files],  # everything it wrote
    }


def _saved(figure, stem: str) -> dict[str, bytes]:
    """The figure as PNG (for a quick look) and PDF (vector, for a paper), each in memory."""
    out = {}
    for kind, options in (("png", {"dpi": 150}), ("pdf", {})):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=kind, bbox_inches="tight", **options)
        out[f"{stem}.{kind}"] = buffer.getvalue()
    return out


def _heatmap(p: Pipeline, entry, grid_runs: list[FinishedRun], rows: list[dict]) -> dict[str, bytes]:
    """Selection accuracy over lr × wd, one panel per method and size (VQT's T, linear-multi's n, each baseline),
    each on the grid its recipe searched, one colour scale for the figure (a labelled colourbar), the selected cell
    outlined, each cell's value in a colour that reads on it."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    order = {name: i for i, name in enumerate(methods.names())}
    panels = sorted({(r.method, r.queries) for r in grid_runs}, key=lambda k: (order.get(k[0], len(order)), k[1]))
    grids = {}
    for key in panels:
        mine = [r for r in grid_runs if (r.method, r.queries) == key]
        lrs, wds = sorted({r.lr for r in mine}, reverse=True), sorted({r.wd for r in mine}, reverse=True)
        grid = np.full((len(lrs), len(wds)), np.nan)
        for run in mine:
            grid[lrs.index(run.lr), wds.index(run.wd)] = 100 * run.eval_top1
        grids[key] = (grid, lrs, wds)
    values = np.concatenate([g[~np.isnan(g)] for g, _, _ in grids.values()])
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1  # one value: any scale shows it
    cmap = plt.get_cmap("viridis")
    columns = min(len(panels), 3)
    lines = -(-len(panels) // columns)
    tallest = max(len(lrs) for _, lrs, _ in grids.values())
    figsize = (0.9 + 2.9 * columns, lines * (1.2 + 0.3 * max(tallest, 4)))
    fig, axes = plt.subplots(lines, columns, figsize=figsize, squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (method, size) in zip(axes.flat, panels, strict=False):
        grid, lrs, wds = grids[(method, size)]
        image = ax.imshow(grid, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], fontsize=7 if len(lrs) > 8 else None)
        ax.set_xlabel("weight decay")
        ax.set_ylabel("base learning rate")
        ax.set_title(_label(method, size), fontsize=9)
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                r, g, b, _ = cmap((value - low) / (high - low))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color=ink, fontsize=7)
        chosen = [r for r in rows if r["dataset"] == entry.name and r["label"] == _label(method, size)]  # selected
        if chosen and chosen[0]["lr"] in lrs and chosen[0]["wd"] in wds:
            i, j = lrs.index(chosen[0]["lr"]), wds.index(chosen[0]["wd"])
            ax.add_patch(Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, fill=False, edgecolor="red", linewidth=2.5))
    bar = fig.colorbar(image, ax=list(axes.flat), shrink=0.9)
    bar.set_label(f"{p.protocol.select_eval} top-1 (%)")
    fig.suptitle(f"{entry.name}: selection on {p.protocol.select_eval} (red: selected)", fontsize=10)
    return _saved(fig, f"heatmap-{entry.name.replace('/', '-')}")


BASELINE_MARKERS = ("s", "^", "D", "v", "P", "X")


def _accuracy_vs_T(p: Pipeline, rows: list[dict]) -> dict[str, bytes]:
    """Test accuracy against T for each dataset with several T, with its baselines as dashed lines."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    curves = {}
    for entry in p.datasets:
        points = sorted(
            (r["T"], r["test_top1_mean"], r["test_top1_std"] or 0.0)
            for r in rows
            if r["dataset"] == entry.name and r["label"] == _label(VQT.name, r["T"]) and r["test_top1_mean"] is not None
        )
        if len(points) > 1:
            curves[entry.name] = points
    if not curves:
        return {}
    # a figure says what it leaves out: datasets with fewer than two T that have a result
    left_out = [e.name for e in p.datasets if e.name not in curves]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
    all_T = sorted({T for points in curves.values() for T, _, _ in points})
    baselines = sorted({r["method"] for r in rows if not _is_vqt(r) and r["test_top1_mean"] is not None})
    # each baseline its line style and its own hollow marker at every T: lines that coincide stay told apart
    marker = {name: BASELINE_MARKERS[i % len(BASELINE_MARKERS)] for i, name in enumerate(baselines)}
    for k, (name, points) in enumerate(curves.items()):
        colour = f"C{k}"
        T, mean, std = zip(*points, strict=True)
        ax.errorbar(T, 100 * np.array(mean), yerr=100 * np.array(std), marker="o", capsize=3, color=colour, label=name)
        for r in rows:
            if r["dataset"] == name and not _is_vqt(r) and r["test_top1_mean"] is not None:
                style = methods.get(r["method"]).style
                level = [100 * r["test_top1_mean"]] * len(all_T)
                ax.plot(all_T, level, color=colour, linestyle=style, linewidth=1, marker=marker[r["method"]],
                        fillstyle="none", markersize=6)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(all_T))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("queries per layer T")
    ax.set_ylabel(f"{p.protocol.final_eval} top-1 (%)")
    handles, labels = ax.get_legend_handles_labels()
    for name in baselines:
        handle = plt.Line2D([], [], color="grey", linestyle=methods.get(name).style, marker=marker[name])
        handle.set_fillstyle("none")
        handles.append(handle)
        labels.append(methods.get(name).label)
    ax.legend(handles, labels, fontsize=8)
    title = f"VQT against T (mean ± sample std over {len(p.protocol.final_seeds)} seeds)"
    if left_out:
        title += f"\nnot shown (results at fewer than two T): {', '.join(left_out)}"
    ax.set_title(title, fontsize=10 if not left_out else 9)
    return _saved(fig, "accuracy_vs_T")


def _plots(p: Pipeline, rows: list[dict], runs: Runs) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    for entry in p.datasets:
        grid_runs = [r for r in runs[entry.name][0] if r.eval_top1 is not None]  # every method's selection
        if grid_runs:
            written |= _heatmap(p, entry, grid_runs, rows)
    written |= _accuracy_vs_T(p, rows)
    plt.close("all")
    return written
