"""docs/world3_verdicts.py: the predictions docs/world3.md registered (A1-A7, B1-B5), judged on the runs.

    python docs/world3_verdicts.py           # reads docs/habit_compare/ and docs/legend_compare/summary.json

`python compare.py --world habitworld` (and legendworld) write runs/<world>_compare/summary.json; copied into
docs/habit_compare/ and docs/legend_compare/, they are judged here, each prediction exactly as registered, and
the verdicts written to docs/world3_verdicts.md (with the numbers each rests on) and printed. Accuracy
differences are final students against the base, paired by seed at T = 1 (the runs' own evaluation, 400
held-out questions), by the decision rule (compare.rule: |mean| > 2 SE, the same sign in ≥ 2 of 3 seeds:
"counted"). Rates come from the per-role tables (roles.md: each arm's own samples, seeds pooled): the slip
rate is the error rate at "no slip", the wrong-k rate the error rate at k, P(wait | wrong) one minus the error
rate at "wait after a wrong step".
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402
from worlds import habitworld, legendworld  # noqa: E402

DOCS = ROOT / "docs"
SUMMARIES = {"habitworld": DOCS / "habit_compare/summary.json",
             "legendworld": DOCS / "legend_compare/summary.json"}
SLIP, WAIT_WRONG, K = habitworld.ROLES[3], "wait after a wrong step", legendworld.ROLES[1]


def vs_base(s: dict, fmt: str, method: str) -> dict:
    return compare.paired(s["results"], fmt, method, "accuracy")


def between(s: dict, fmt: str, method: str, other: str, t: str = "1") -> dict:
    """method − other (both final students of one reference format) at temperature t, paired by seed."""
    students = s["sweep"]["students"][fmt]
    return compare.rule([students[method][seed][t]["accuracy"] - students[other][seed][t]["accuracy"]
                         for seed in sorted(students[method]) if seed in students[other]])


def across(s: dict, method: str, fmt: str, other: str) -> dict:
    """One method's final students with two reference formats, paired by seed, at T = 1."""
    results = s["results"]
    return compare.rule([results[fmt][method][seed][-1]["accuracy"]
                         - results[other][method][seed][-1]["accuracy"]
                         for seed in sorted(results[fmt][method]) if seed in results[other][method]])


def rate(s: dict, arm: str, role: str) -> float:
    return s["roles"]["error_rate"][arm][role]


def shown(d: dict) -> str:
    per_seed = ", ".join(f"{x * 100:+.1f}" for x in d["per_seed"])
    return (f"{d['mean'] * 100:+.1f} ± {d['se'] * 100:.1f} points (per seed {per_seed}; "
            f"{'counted' if d['counts'] else 'not counted'})")


def beyond(s: dict, fmt: str, method: str) -> dict:
    return next(r for r in s["beyond_sharpening"] if r["reference"] == fmt and r["method"] == method)


def habit_verdicts(s: dict) -> list[tuple[str, bool, str]]:
    out = []
    d = vs_base(s, "sketch", "purified")
    out.append(("A1 Purified-sketch − base ≥ +10 points, counted", d["counts"] and d["mean"] >= 0.10,
                shown(d)))
    d = vs_base(s, "sketch", "opsd")
    out.append(("A2 OPSD-sketch − base ≤ −10 points, counted", d["counts"] and d["mean"] <= -0.10, shown(d)))
    base, pur, opsd = (rate(s, arm, SLIP) for arm in ("base", "purified, sketch", "opsd, sketch"))
    out.append(("A3 Purified's slip rate ≤ half the base's; OPSD's within ±0.10 of the base's",
                pur <= base / 2 and abs(opsd - base) <= 0.10,
                f"slip rate: base {base:.3f}, Purified {pur:.3f} (≤ {base / 2:.3f}: {pur <= base / 2}), "
                f"OPSD {opsd:.3f} (within ±0.10: {abs(opsd - base) <= 0.10})"))
    base, pur, opsd = (1 - rate(s, arm, WAIT_WRONG) for arm in ("base", "purified, sketch", "opsd, sketch"))
    out.append(("A4 OPSD's P(wait | wrong) ≤ half the base's; Purified's ≥ 0.8 × the base's",
                opsd <= base / 2 and pur >= 0.8 * base,
                f"P(wait | wrong): base {base:.3f}, OPSD {opsd:.3f} (≤ {base / 2:.3f}: {opsd <= base / 2}), "
                f"Purified {pur:.3f} (≥ {0.8 * base:.3f}: {pur >= 0.8 * base})"))
    d = vs_base(s, "ops", "purified")
    out.append(("A5 (control) |Purified-ops − base| ≤ 4 points and not counted",
                abs(d["mean"]) <= 0.04 and not d["counts"], shown(d)))
    d = across(s, "purified", "null", "sketch")
    out.append(("A6 |Purified-null − Purified-sketch| ≤ 4 points", abs(d["mean"]) <= 0.04, shown(d)))
    b = beyond(s, "sketch", "purified")
    out.append(("A7 Purified-sketch at T = 1 beats the base at its best temperature and at each matched",
                b["learning_beyond_sharpening"],
                f"against the base at its best: {shown(b['vs_base_at_best'])}; at T = "
                + "; at T = ".join(f"{t}: {shown(d)}" for t, d in b["vs_base_at"].items())))
    return out


def legend_verdicts(s: dict) -> list[tuple[str, bool, str]]:
    out = []
    d = vs_base(s, "sketch", "purified")
    out.append(("B1 Purified-sketch − base ≥ +15 points, counted", d["counts"] and d["mean"] >= 0.15,
                shown(d)))
    at1, at07 = between(s, "sketch", "purified", "opsd"), between(s, "sketch", "purified", "opsd", "0.7")
    out.append(("B2 Purified-sketch − OPSD-sketch > 0, counted, at T = 1; the gap ≤ 3 points at T = 0.7",
                at1["counts"] and at1["mean"] > 0 and at07["mean"] <= 0.03,
                f"at T = 1: {shown(at1)}; at T = 0.7: {shown(at07)}"))
    pur, opsd, null = (rate(s, arm, K) for arm in ("purified, sketch", "opsd, sketch", "purified, null"))
    out.append(("B3 wrong-k rate ≤ 0.1 for both sketch students, ≥ 0.8 for Purified-null",
                pur <= 0.1 and opsd <= 0.1 and null >= 0.8,
                f"wrong-k rate: Purified-sketch {pur:.3f}, OPSD-sketch {opsd:.3f} (both ≤ 0.1: "
                f"{pur <= 0.1 and opsd <= 0.1}), Purified-null {null:.3f} (≥ 0.8: {null >= 0.8}); the base "
                f"{rate(s, 'base', K):.3f}"))
    d = vs_base(s, "null", "purified")
    out.append(("B4 Purified-null − base ≤ 5 points", d["mean"] <= 0.05, shown(d)))
    d = vs_base(s, "full", "purified")
    out.append(("B5 Purified-full − base ≤ 4 points", d["mean"] <= 0.04, shown(d)))
    return out


def method_losses(s: dict) -> list[tuple[str, bool, str]]:
    """docs/world3.md's loss for the method: Purified-sketch fails to beat the base or OPSD-sketch at T = 1 by
    the rule, or the base at its best temperature (then its gain is sharpening)."""
    rows = [("beats the base at T = 1", vs_base(s, "sketch", "purified")),
            ("beats OPSD-sketch at T = 1", between(s, "sketch", "purified", "opsd")),
            ("beats the base at its best temperature", beyond(s, "sketch", "purified")["vs_base_at_best"])]
    return [(f"Purified-sketch {name}", d["counts"] and d["mean"] > 0, shown(d)) for name, d in rows]


VERDICTS = {"habitworld": habit_verdicts, "legendworld": legend_verdicts}


def cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bar inside a table cell ends it in Markdown


def spread(xs: list[float], digits: int = 3) -> str:
    mean = sum(xs) / len(xs)
    sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def arms(world: str, s: dict) -> list[str]:
    """Every arm at a glance: accuracy at each temperature of the sweep (mean ± sd over seeds), the world's
    own role rate, P(wait | wrong) and markers per 1k tokens at the last evaluation (T = 1)."""
    sweep, temps = s["sweep"], s["sweep"]["temperatures"]
    role, name = (SLIP, "slip rate") if world == "habitworld" else (K, "wrong-k rate")
    rows = [f"| arm | {' | '.join(f'T = {t}' for t in temps)} | {name} | P(wait \\| wrong) | markers/1k |",
            "|---|" + "--:|" * (len(temps) + 3)]
    markers = [p[0]["markers_per_1k"] for p in next(iter(s["results"].values()))["base"].values()]
    base = [[sweep["base"][seed][t]["report"]["accuracy"] for seed in sweep["base"]] for t in temps]
    rows.append(f"| base | {' | '.join(spread(xs) for xs in base)} | {rate(s, 'base', role):.3f} | "
                f"{1 - rate(s, 'base', WAIT_WRONG):.3f} | {spread(markers, 1)} |")
    for fmt, methods in sweep["students"].items():
        for method, seeds in methods.items():
            arm = f"{method}, {fmt}"
            accuracy = [[seeds[seed][t]["accuracy"] for seed in seeds] for t in temps]
            markers = [p[-1]["markers_per_1k"] for p in s["results"][fmt][method].values()]
            rows.append(f"| {arm} | {' | '.join(spread(xs) for xs in accuracy)} | {rate(s, arm, role):.3f} | "
                        f"{1 - rate(s, arm, WAIT_WRONG):.3f} | {spread(markers, 1)} |")
    return rows


def markdown(world: str, s: dict) -> list[str]:
    rows = [f"### {world} ({s['settings']['machine']}, {s['settings']['minutes']:.1f} min)", "",
            *arms(world, s), "", "| prediction | verdict | the numbers |", "|---|---|---|"]
    for name, held, why in VERDICTS[world](s):
        rows.append(f"| {cell(name)} | {'holds' if held else 'FAILS'} | {cell(why)} |")
    rows += ["", "| a loss for the method unless | verdict | the numbers |", "|---|---|---|"]
    for name, held, why in method_losses(s):
        rows.append(f"| {cell(name)} | {'yes' if held else 'NO: a loss'} | {cell(why)} |")
    return rows + [""]


def main():
    lines = ["Written by `python docs/world3_verdicts.py` from the comparisons' summary.json; each "
             "prediction as docs/world3.md registered it.", ""]
    for world, path in SUMMARIES.items():
        if not path.is_file():
            sys.exit(f"no {path}: run `python compare.py --world {world}` and copy its summary.json there")
        summary = json.loads(path.read_text())
        if summary["settings"].get("stopped"):
            lines += [f"### {world}", "", f"Not run: {summary['settings']['stopped']} (the gates are in "
                      f"{path.relative_to(ROOT)}).", ""]
            continue
        lines += markdown(world, summary)
    (DOCS / "world3_verdicts.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
