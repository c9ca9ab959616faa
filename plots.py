"""plots.py: curves of popsd runs against the step, read from their metrics.jsonl; the toy comparison figure.

    python plots.py runs/toy                          # → runs/toy/plots.png
    python plots.py runs/a runs/b --out ab.png        # runs overlaid, a colour each (default: runs/plots.png)

Panels: loss, the three Δ diagnostics, markers per 1k, completion length, entropy, then every evaluation
metric (eval/<bench>/<name>). popsd.py writes plots.png into each run folder at the end of training.
"""
import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

TRAIN_KEYS = ["loss", "cos_total_ref", "cos_total_it", "norm_ratio", "markers_per_1k", "completion_len",
              "entropy", "grad_norm"]
TITLES = {"accuracy": "accuracy (held-out)", "cos_total_ref": "cos(Δ_total, Δ_ref)",
          "cos_total_it": "cos(Δ_total, Δ_it)", "norm_ratio": "‖Δ_ref‖ / ‖Δ_total‖",
          "markers_per_1k": "markers per 1k tokens",
          "completion_len": "completion tokens", "grad_norm": "gradient norm (before clip)",
          "caught_frac": "first-try errors caught", "false_reflections": "false reflections / sample",
          "first_try_errors": "first-try errors / sample", "p_wait_wrong": "P(wait | wrong step)",
          "p_wait_right": "P(wait | right step)", "len_mean": "mean completion tokens",
          "len_median": "median completion tokens", "truncated": "fraction truncated",
          "accuracy_no_wait": 'accuracy, "wait" forbidden'}
SKIP = ("questions", "samples")  # counts, not curves
EVAL_ORDER = ["avg@", "pass@", "markers_per_1k", "first_try_errors", "caught_frac", "false_reflections",
              "p_wait_wrong", "p_wait_right", "len_mean", "len_median", "truncated"]


def _eval_order(name: str) -> tuple:
    return next((i for i, p in enumerate(EVAL_ORDER) if name.startswith(p)), len(EVAL_ORDER)), name


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


MARK = "popsd plots.py"  # in every figure this file writes (a PNG text chunk): what it may write over


def ours(path: Path) -> bool:
    """Whether the file at `path` is a figure this file wrote (its mark), so writing over it loses nothing."""
    try:
        from PIL import Image
        with Image.open(path) as image:
            return image.info.get("Software") == MARK
    except Exception:  # not a PNG, unreadable: someone else's
        return False


def save(plt, fig, out: Path, rect=(0, 0, 1, 1)) -> Path:
    """The figure as a PNG carrying MARK; a file there that this file did not write is never written over
    (FileExistsError)."""
    if out.exists() and not ours(out):
        plt.close(fig)
        raise FileExistsError(f"{out} exists and plots.py did not write it: not written over; give --out "
                              "another file")
    fig.tight_layout(rect=rect)
    fig.savefig(out, dpi=110, metadata={"Software": MARK})
    plt.close(fig)
    return out


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run} a popsd run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def labels_of(runs: list[Path]) -> list[str]:
    """Each run's path relative to what all runs share (the folder name when alone)."""
    if len(runs) == 1:
        return [runs[0].resolve().name]
    common = os.path.commonpath([str(r.resolve()) for r in runs])
    return [os.path.relpath(r.resolve(), common) for r in runs]


def panel_keys(rows: list[list[dict]]) -> list[str]:
    """The metrics to draw, in order: training metrics, then each benchmark's evaluation metrics."""
    present = {k for rs in rows for row in rs for k, v in row.items() if isinstance(v, (int, float))}
    evals = sorted((k for k in present if k.startswith("eval/") and k.rsplit("/", 1)[-1] not in SKIP
                    # the same number
                    and not (k.endswith("/pass@1") and k.replace("pass@1", "avg@1") in present)),
                   key=lambda k: (k.split("/")[1], _eval_order(k.rsplit("/", 1)[-1])))
    return [k for k in TRAIN_KEYS if k in present] + evals


FRACTIONS = ("accuracy", "caught_frac", "false_reflections", "truncated", "unclosed_reasoning")
# the least range
MIN_SPAN = {"markers_per_1k": 5.0, "cos_total_ref": 0.2, "cos_total_it": 0.2, "norm_ratio": 0.2}
# an axis shows for quantities whose small changes are noise


def least_range(lo: float, hi: float, name: str, fraction: bool) -> tuple[float, float]:
    """The y-range of a panel, widened to at least 0.1 for a fraction and to MIN_SPAN for the counts named
    there (centred, never below 0, a fraction never above 1): a change of 2 questions in 400, or of 0.2
    markers per 1k, is not drawn as a swing."""
    span = 0.1 if fraction else MIN_SPAN.get(name)
    if not span or hi - lo >= span:
        return lo, hi
    low = max(0.0, (lo + hi) / 2 - span / 2)
    if fraction:
        low = min(low, 1.0 - span)
    return low, low + span


def questions_note(rows: list[dict]) -> str:
    """' (N questions)' when every evaluation of a run used N questions per benchmark, else ''."""
    counts = {v for r in rows for k, v in r.items() if k.startswith("eval/") and k.endswith("/questions")}
    return f" ({counts.pop()} questions)" if len(counts) == 1 else ""


def plot_runs(runs: list[Path], out: Path) -> Path:
    """One panel per metric, every run overlaid; written to `out` (PNG)."""
    plt = _pyplot()
    rows = [read_metrics(Path(r)) for r in runs]
    keys = panel_keys(rows)
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols,
                             figsize=(4.2 * cols, 2.9 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    labels = [label + questions_note(rs) for label, rs in zip(labels_of([Path(r) for r in runs]), rows)]
    for ax, key in zip(axes.flat, keys):
        name = key.rsplit("/", 1)[-1]
        fraction = key.startswith("eval/") and (name.startswith(("avg@", "pass@")) or name in FRACTIONS)
        for label, rs in zip(labels, rows):
            pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, ms=3, lw=1.2,
                                label=label)
                count = key.rsplit("/", 1)[0] + "/samples"
                samples = [r.get(count) for r in rs if isinstance(r.get(key), (int, float))]
                if fraction and all(isinstance(n, (int, float)) and n > 0 for n in samples):
                    # binomial standard error
                    se = [(p * (1 - p) / n) ** 0.5 for (_, p), n in zip(pts, samples)]
                    ax.fill_between([x for x, _ in pts], [p - e for (_, p), e in zip(pts, se)],
                                    [p + e for (_, p), e in zip(pts, se)], color=line.get_color(), alpha=0.15,
                                    lw=0)
        ax.set_ylim(*least_range(*ax.get_ylim(), name, fraction))
        ax.set_title(("eval " + key.split("/")[1] + ": " if key.startswith("eval/") else "")
                     + TITLES.get(name, name), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 4), fontsize=8, frameon=False)
    return save(plt, fig, out, rect=(0, 0, 1, 0.95))


COMPARE_KEYS = ["accuracy", "markers_per_1k", "caught_frac", "false_reflections", "completion_len",
                "cos_total_ref", "cos_total_it", "norm_ratio"]


def plot_compare(summary: dict, out: Path) -> Path:
    """The toy comparison: two rows of panels per reference format; per method the mean over seeds (line) and
    the min-max over seeds (band); the untrained base (step 0) as a dotted line."""
    plt = _pyplot()
    results, cols = summary["results"], len(COMPARE_KEYS) // 2
    sweep = summary.get("sweep")
    rows = 2 * len(results) + (1 if sweep else 0)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    colours = {"base": "grey"}
    for i, (fmt, methods) in enumerate(results.items()):
        for ax, key in zip(axes[2 * i:2 * i + 2].flat, COMPARE_KEYS):
            for method, seeds in methods.items():
                points = [p for pts in seeds.values() for p in pts if p.get(key) is not None]
                if method == "base":
                    if points:
                        ax.axhline(statistics.fmean(p[key] for p in points), color="grey", ls=":", lw=1.3,
                                   label="base")
                    continue
                steps = sorted({p["step"] for p in points})
                by_step = [[p[key] for p in points if p["step"] == s] for s in steps]
                if not steps:
                    continue
                line, = ax.plot(steps, [statistics.fmean(v) for v in by_step], marker="o", ms=3, lw=1.5,
                                label=method, color=colours.get(method))
                colours[method] = line.get_color()
                ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step],
                                color=line.get_color(), alpha=0.18, lw=0)
            ax.set_title(f"{fmt} reference: {TITLES.get(key, key)}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    if sweep:
        _plot_sweep(sweep, axes[-1], colours)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=9, frameon=False)
    return save(plt, fig, out, rect=(0, 0, 1, 0.96))


def _plot_sweep(sweep: dict, row, colours: dict):
    """The temperature sweep's row: per reference format, accuracy and markers against the sampling
    temperature (mean over seeds; the base dotted, with its accuracy at its best temperature as a band over
    the seeds' min-max); the panels left over stay empty."""
    temps = [float(t) for t in sweep["temperatures"]]
    base = sweep["base"]
    best = [base[s][t]["report"]["accuracy"] for s, t in sweep["best"].items()]
    panels = [(fmt, key) for fmt in sweep["students"] for key in ("accuracy", "markers_per_1k")]
    for ax, (fmt, key) in zip(row, panels):
        ax.plot(temps, [statistics.fmean(b[t]["report"][key] for b in base.values())
                        for t in sweep["temperatures"]], color="grey", ls=":", marker="o", ms=3, label="base")
        if key == "accuracy":  # the seeds' min-max, and their mean
            ax.axhspan(min(best), max(best), color="grey", alpha=0.15, lw=0)
            ax.axhline(statistics.fmean(best), color="grey", lw=1, label="base at its best T")
        for method, seeds in sweep["students"][fmt].items():
            means = [statistics.fmean(v[t][key] for v in seeds.values()) for t in sweep["temperatures"]]
            ax.plot(temps, means, marker="o", ms=3, lw=1.5, color=colours.get(method), label=method)
        ax.set_title(f"{fmt} reference: {TITLES.get(key, key)} at each T", fontsize=9)
        ax.set_xlabel("sampling temperature T", fontsize=8)
        ax.invert_xaxis()  # sharper to the right
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if panels:
        row[0].legend(fontsize=7, loc="lower left")
    for ax in row[len(panels):]:
        ax.axis("off")


def plot_ablation(series: dict, xlabel: str, title: str, out: Path) -> Path:
    """An ablation (compare.ablation_series, support_series): per reference format a row, per metric a panel;
    for each series each seed's last-step value as a dot and the mean as a line over the settings (x), the
    baselines' means as flat lines."""
    plt = _pyplot()
    first = next(iter(series.values()))
    keys = list(next(iter(first["series"].values())))
    fig, axes = plt.subplots(len(series), len(keys), figsize=(3.3 * len(keys), 2.9 * len(series)),
                             squeeze=False)
    styles = {"base": dict(color="grey", ls=":"), "opsd": dict(color="tab:red", ls="--"),
              "opsd_fkl": dict(color="tab:purple", ls="-.")}
    colours = {"Purified": "tab:blue", "OPSD": "tab:red"}
    for row, (fmt, data) in zip(axes, series.items()):
        x = list(range(len(data["x"])))
        for ax, key in zip(row, keys):
            for k, (label, values) in enumerate(data["series"].items()):
                shift = 0.12 * (k - (len(data["series"]) - 1) / 2)  # series side by side at each setting
                colour = colours.get(label, f"C{k}")
                for i, seeds in enumerate(values[key]):
                    ax.scatter([i + shift + 0.04 * (j - (len(seeds) - 1) / 2) for j in range(len(seeds))],
                               seeds, s=12, color=colour, alpha=0.6, lw=0)
                means = [statistics.fmean(v) if v else math.nan for v in values[key]]
                ax.plot([i + shift for i in x], means, color=colour, marker="o", ms=4, lw=1.5,
                        label=f"{label} (mean; dots: seeds)")
            for method, line in data["lines"].items():
                if key in line:
                    ax.axhline(line[key], lw=1.2, label=method,
                               **styles.get(method, dict(color="black", ls="-")))
            ax.set_xticks(x, data["x"])
            ax.set_title(f"{fmt} reference: {TITLES.get(key, key)}", fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.97))
    fig.suptitle(title, fontsize=10, y=0.995, x=0.01, ha="left")
    return save(plt, fig, out, rect=(0, 0, 1, 0.92))


def plot_pretrain(log: list[dict], gates: list[tuple[str, float]], out: Path) -> Path:
    """A toy base's pre-training: loss, and the gate quantities on held-out questions, against the step (a
    dashed line where a later stage starts)."""
    plt = _pyplot()
    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(steps, [r["loss"] for r in log], marker="o", ms=3)
    axes[0].set_yscale("log")
    axes[0].set_title("training loss (completion tokens)", fontsize=9)
    for key, label in (("accuracy", "student accuracy"), ("caught_frac", "first-try errors caught")):
        axes[1].plot(steps, [r["student"][key] for r in log], marker="o", ms=3, label=label)
    axes[1].plot(steps, [r["teacher_full"]["accuracy"] for r in log], marker="o", ms=3,
                 label="teacher accuracy (full reference)")
    if all("student_no_wait" in r for r in log):  # a world whose gates ban reflection
        axes[1].plot(steps, [r["student_no_wait"]["accuracy"] for r in log], marker="o", ms=3,
                     label='student accuracy, "wait" forbidden')
    stages = [(a["step"], r["stage"]) for a, r in zip(log, log[1:]) if r.get("stage") != a.get("stage")]
    for ax in axes:
        # where a later pre-training stage starts (after the earlier one's last step)
        for step, name in stages:
            ax.axvline(step, color="black", ls="--", lw=0.8)
            ax.text(step, 0.97, f" {name}", fontsize=7, va="top", transform=ax.get_xaxis_transform())
    axes[2].plot(steps, [r["student"]["p_wait_wrong"] for r in log], marker="o", ms=3,
                 label="P(wait | wrong step)")
    axes[2].plot(steps, [r["student"]["p_wait_right"] for r in log], marker="o", ms=3,
                 label="P(wait | right step)")
    for name, threshold in gates:
        axes[1].axhline(threshold, color="grey", ls=":", lw=1)
    axes[1].set_title("held-out questions" + (" (dotted: the gates)" if gates else ""), fontsize=9)
    axes[2].set_title("reflection after a wrong vs a right step", fontsize=9)
    for ax in axes:
        ax.set_xlabel("pre-training step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    return save(plt, fig, out)


def plot_sweep(summary: dict, out: Path) -> Path:
    """Accuracy against the training step, one line per benchmark and their mean; the best step marked."""
    plt = _pyplot()
    key, steps = summary["metric"], sorted(summary["steps"], key=int)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for bench in summary["steps"][steps[0]]:
        ax.plot([int(s) for s in steps], [100 * summary["steps"][s][bench][key] for s in steps], marker="o",
                label=bench)
    ax.plot([int(s) for s in steps], [100 * summary["mean"][s] for s in steps], color="black", lw=2,
            marker="s", label="mean")
    ax.axvline(summary["best_step"], color="grey", ls="--", lw=1, label=f"best: step {summary['best_step']}")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{key} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(plt, fig, out)


def main(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="popsd run folders (each with a metrics.jsonl)")
    p.add_argument("--out",
                   help="PNG to write (default: plots.png in the run folder; for several runs, plots.png "
                                 "in the folder that holds them all)")
    args = p.parse_args(argv)
    runs = list({Path(r).resolve(): Path(r) for r in args.runs}.values())  # a run named twice is one run
    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix.lower() != ".png" or not out.parent.is_dir() or out.is_dir()):
        p.error(f"--out {out}: a .png file in a folder that exists" + ("" if out.parent.is_dir() else
                                                                       f" ({out.parent} does not)"))
    try:
        if len(runs) == 1 and (runs[0]
                               / "summary.json").is_file() and not (runs[0] / "metrics.jsonl").exists():
            summary = json.loads((runs[0] / "summary.json").read_text())  # a comparison (compare.py)
            if "results" in summary and "gates" in summary:
                print(plot_compare(summary, out or runs[0] / "summary.png"))
                return
        shared = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
        if out is None and len(runs) > 1 and (shared / "metrics.jsonl").exists():  # a run's own plots.png
            raise FileExistsError(f"the runs share the folder of the run {shared}, whose plots.png is its "
                                  "own: give --out for their figure")
        print(plot_runs(runs, out or (runs[0] if len(runs) == 1 else shared) / "plots.png"))
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
