"""compare.py: base vs OPSD vs Purified in a toy world (worlds/), both reference formats, several seeds, and
every student against the base at its best sampling temperature; and each world's base: its gates, its
pre-training, its data files.

    python compare.py                                   # toyworld: docs/toyworld.md's tables, figure (6 min)
    python compare.py --world carryworld                # the second world, docs/carryworld.md (14-17 min)
    python compare.py --world toyworld,carryworld       # both worlds' default comparisons (19-23 min)
    python compare.py --world habitworld                # world three, docs/world3.md; legendworld: four
    python compare.py gates --world carryworld          # a shipped base's gates, measured (~1 min)
    python compare.py pretrain --world carryworld --out runs/carry_base   # pre-train a base from scratch
                                                        # (--replace: over the shipped one; docs: how long;
                                                        # worlds three and four continue world one's base)
    python compare.py data --world carryworld           # a world's train.jsonl and test.jsonl, remade
                                                        # (--replace: over files that differ)

The paper's ablations, after the default comparison (18 more runs, 21 min on 2026-12-03's machine; world one's
with the supports: 17 min):
    python compare.py --world carryworld --formats sketch --grid one-at-a-time --clip 5,20,none --beta 0.5,2 \
        --opsd-fkl
Minutes measured on this project's 2-core machines (docs/toyworld.md and docs/carryworld.md name each).

Each run is `python popsd.py --recipe <the world's recipe>` with only the method, the reference format and the
seed set (and the same overrides for all), `--workers` side by side with one torch thread each; a finished run
is reused when its config, the base's files, the data files, the code and the library versions are all the
same (run_key), and a run redone says what changed. The base row is each seed's step-0 evaluation (the same in
every run of that seed: checked). Per evaluated step the world metrics come from the held-out evaluation, the
Δ diagnostics from the training steps since the previous evaluation. Each trained student is also measured
with "wait" forbidden; measure.py then sweeps the sampling temperature (--temperatures: the base per seed
and every final student, the base's best temperature picked on held-out rows no run scores) and writes the
per-role tables (roles.md); the hypotheses of docs/carryworld.md and the rule of learning beyond sharpening
(docs/toyworld.md) are judged. A world with GATED (worlds three and four) runs nothing past a failed gate, as
docs/world3.md registered. Every measurement is kept beside what it measured: a rerun measures nothing
again. Writes summary.json, summary.md (the tables), summary.png and roles.md, and prints the tables and the
verdicts.
"""
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import worlds
from plumbing.checkpoints import remove_entries
from plumbing.data import PopsdError
from worlds import common

ROOT = Path(__file__).resolve().parent


@dataclass
class Job:
    fmt: str  # reference format
    method: str  # opsd | purified | purified_c<c>_b<β>
    seed: int
    out: Path
    command: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)  # what the command passes to popsd.py after the recipe
    # everything that decides its result (run_key), taken before it runs
    key: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:  # next to the run folder: popsd writes only into a new or empty one
        return self.out.with_name(self.out.name + ".log")

    @property
    def record(self) -> Path:  # written when the run finished: its key, as taken before it started
        return self.out.with_name(self.out.name + ".done.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_runs_see(path: str) -> Path:
    """A path as a run reads it: the runs start in the repository (cwd=ROOT), not in the caller's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def base_sha(model: str) -> str | None:
    """The fingerprint of the base a run trains on (its config's model, as the run resolves it: every file
    from_pretrained reads), None for a hub id not on this machine."""
    from plumbing.models import base_fingerprint
    local = as_runs_see(model)
    return base_fingerprint(str(local) if local.exists() else model)


SOURCE_SKIP = ("tests", "bench", "docs", "data", "runs")  # not code a run executes (data is keyed by content)


def sources_sha() -> str:
    """One checksum of every Python file a run executes (popsd, its engines, worlds and recipes): a change to
    the code that trains or measures a run makes it another run."""
    files = sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in SOURCE_SKIP)
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.relative_to(ROOT)}\0".encode() + p.read_bytes() + b"\0")
    return digest.hexdigest()


def versions() -> dict:
    import peft
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__}


def run_key(world, overrides: list[str]) -> dict:
    """Everything that decides a run's result: its resolved config (make_config), the checksums of the
    base's weights and of the data files it trains and is evaluated on, of the code, and the library
    versions."""
    from plumbing.config import make_config
    cfg = make_config(world.RECIPE, overrides)
    files = [f.strip() for f in (cfg.data, *cfg.eval_bench.split(",")) if f.strip()]
    return {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "threads"},
            "base": base_sha(cfg.model),
            "data": {f: sha256(as_runs_see(f)) for f in files if as_runs_see(f).is_file()},
            "code": sources_sha(), "versions": versions()}


def why_redo(job: Job) -> str | None:
    """None when a finished run with this job's key is there to reuse, else what is missing or changed."""
    if not ((job.out / "adapter").is_dir() and (job.out / "metrics.jsonl").is_file()):
        return "no finished run"
    try:
        done = json.loads(job.record.read_text())
    except (OSError, ValueError):
        return f"no readable record {job.record.name}"
    changed = []
    for part, now in job.key.items():
        then = done.get(part) if isinstance(done, dict) else None
        if then == now:
            continue
        if isinstance(now, dict) and isinstance(then, dict):
            keys = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
            changed.append(f"{part} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        else:
            changed.append({"base": "the base's weights", "code": "the code"}.get(part, part))
    return "changed: " + "; ".join(changed) if changed else None


def cached(job: Job) -> bool:
    return why_redo(job) is None


def purified_settings(clips, betas, grid: str = "product") -> list[tuple]:
    """(c, β) pairs: every combination, or one factor at a time around the paper's c = 10, β = 1 (None: no
    clip)."""
    if grid == "product":
        pairs = [(c, b) for c in clips for b in betas]
    else:
        pairs = [(10.0, 1.0)] + [(c, 1.0) for c in clips] + [(10.0, b) for b in betas]
    return list(dict.fromkeys(pairs))


SUPPORT_ARGS = {"topk": ["support=topk"], "sampled": ["support=sampled", "divergence=reverse_kl"],
                # full_rkl: sampled's control, one change apart
                "full_rkl": ["support=full", "divergence=reverse_kl"]}


def compare_jobs(world, out: Path, formats, seeds, clips, betas, overrides, grid: str = "product",
                 opsd_fkl: bool = False, supports=("full",)) -> list[Job]:
    """Every (format, method, seed) run of the world's recipe: identical settings except the method.
    opsd_fkl adds OPSD with the updated official code's loss (forward KL, term_clamp 0.05); each support
    beyond full adds OPSD and Purified on it (<method>_topk: the recipe's topk; <method>_sampled: reverse KL's
    sampled-token estimator; <method>_full_rkl: reverse KL over the full vocabulary, sampled's control)."""
    variants = [("opsd", ["method=opsd"])]
    if opsd_fkl:
        variants.append(("opsd_fkl", ["method=opsd", "divergence=forward_kl", "term_clamp=0.05"]))
    for support in supports:
        if support != "full":
            variants += [(f"{m}_{support}", [f"method={m}", *SUPPORT_ARGS[support]])
                         for m in ("opsd", "purified")]
    for c, b in purified_settings(clips, betas, grid):
        clip = "none" if c is None else f"{c:g}"
        name = "purified" if (c, b) == (10.0, 1.0) else f"purified_c{clip}_b{b:g}"
        variants.append((name, ["method=purified", f"pmi_clip={clip}", f"beta={b:g}"]))
    jobs = []
    for fmt in formats:
        for name, extra in variants:
            for seed in range(seeds):
                run = out / fmt / name / f"seed_{seed}"
                args = [f"out_dir={run}", f"reference_field={fmt}", f"seed={seed}", "threads=1", *extra,
                        *overrides]
                jobs.append(Job(fmt, name, seed, run, [sys.executable, str(ROOT / "popsd.py"), "--recipe",
                                                       world.RECIPE, *args], args, run_key(world, args)))
    return jobs


def run_jobs(world, jobs: list[Job], workers: int, total_steps: int, console):
    """Runs the jobs `workers` at a time, one torch thread each; a rich bar counts logged steps."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    waiting, running, done, t0 = list(jobs), [], 0, time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(f"{len(jobs)} runs, {workers} at a time (steps)", total=len(jobs) * total_steps)
        while waiting or running:
            while waiting and len(running) < workers:
                job = waiting.pop(0)
                # the run folder itself is popsd's to create
                job.out.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "w")
                running.append((job, subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                                      env=env, cwd=ROOT), log))
            time.sleep(0.5)
            for item in list(running):
                job, proc, log = item
                if proc.poll() is None:
                    continue
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    for _, other, _ in running:
                        other.kill()
                    tail = job.log.read_text()[-3000:]
                    raise RuntimeError(f"run {job.out} failed (rc {proc.returncode}); its log ends:\n{tail}")
                done += 1
                job.record.write_text(json.dumps(job.key) + "\n")  # as it was when the run started
                # pipes too
                bar.console.print(f"{done}/{len(jobs)} runs done ({time.time() - t0:.0f} s): {job.out}")
            logged = sum(len(_lines(job.out / "metrics.jsonl")) for job, _, _ in running)
            bar.update(task, completed=done * total_steps + logged)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run_points(run: Path) -> list[dict]:
    """Per evaluated step of one run: the held-out world metrics, and the Δ diagnostics averaged over the
    training steps since the previous evaluation (step 0: step 1's, computed on the initial policy)."""
    rows = [json.loads(x) for x in _lines(run / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    points, previous = [], -1
    for r in rows:
        acc = [k for k in r if k.startswith("eval/") and k.split("/")[-1].startswith("avg@")]
        if not acc:
            continue
        prefix = acc[0].rsplit("/", 1)[0]
        window = [t for t in train if previous < t["step"] <= r["step"]] or train[:1]
        point = {"step": r["step"], "accuracy": r[acc[0]], "markers_per_1k": r[f"{prefix}/markers_per_1k"],
                 "caught_frac": r[f"{prefix}/caught_frac"],
                 "false_reflections": r[f"{prefix}/false_reflections"],
                 "first_try_errors": r[f"{prefix}/first_try_errors"],
                 "completion_len": r[f"{prefix}/len_mean"]}
        for k in ("cos_total_ref", "cos_total_it", "norm_ratio"):
            vals = [t[k] for t in window if k in t]
            point[k] = sum(vals) / len(vals) if vals else None
        points.append(point)
        previous = r["step"]
    return points


def collect(jobs: list[Job]) -> dict:
    """results[format][method][seed] = per-step points; "base" is each seed's step-0 evaluation."""
    results = {}
    for job in jobs:
        points = run_points(job.out)
        per_fmt = results.setdefault(job.fmt, {"base": {}})
        per_fmt.setdefault(job.method, {})[str(job.seed)] = points
        if str(job.seed) not in per_fmt["base"] and points and points[0]["step"] == 0:
            per_fmt["base"][str(job.seed)] = points[:1]
    return results


MEASURED = "measured-2"  # what a kept measurement holds; another version is measured again


def measured_file(job: Job) -> Path:  # beside the run: what was measured of its final student
    return job.out.with_name(job.out.name + ".measured.json")


def read_measured(path: Path, key: dict) -> dict:
    """What an earlier comparison measured, if it was measured of the same run (the same key), else {}."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return done.get("measured", {}) if done.get("key") == key and done.get("version") == MEASURED else {}


def write_measured(path: Path, key, measured: dict):
    path.write_text(json.dumps({"key": key, "version": MEASURED, "measured": measured}) + "\n")


def add_no_wait(world, jobs: list[Job], results: dict, measured: dict, n: int):
    """Each trained student's held-out accuracy with "wait" forbidden (common.Forbid), its final adapter
    merged into the base, written into its last point (kept beside the run: measured once); the base's
    (measure_base's) into each seed's step-0 point."""
    from peft import PeftModel
    tok, model = common.load_base(world)
    questions = common.held_out(world, n)
    base = measured.get("student_no_wait") or common.measure(world, model, tok, questions, forbid="wait")
    for job in jobs:
        done = read_measured(measured_file(job), job.key)
        if "no_wait" not in done:
            model = PeftModel.from_pretrained(common.load_base(world)[1],
                                              str(job.out / "adapter")).merge_and_unload()
            done["no_wait"] = common.measure(world, model.eval(), tok, questions, forbid="wait")["accuracy"]
            write_measured(measured_file(job), job.key, done)
        results[job.fmt][job.method][str(job.seed)][-1]["accuracy_no_wait"] = done["no_wait"]
        for point in results[job.fmt]["base"].get(str(job.seed), []):
            point["accuracy_no_wait"] = base["accuracy"]


SWEPT = ("opsd", "purified")  # the default comparison's methods: the sweep evaluates their final students


def sweep(world, jobs: list[Job], results: dict, temperatures: list[float], out: Path, model) -> dict:
    """The temperature sweep (measure.py): per seed the base on the evaluated and the pick rows, and every
    final student of the default comparison, at each temperature below the runs' own (theirs is their last
    evaluation); each evaluation kept beside what it measured (a run's seed_<n>.measured.json, the base's
    base_seed_<n>.measured.json, keyed as the runs), so a rerun with every run cached evaluates nothing again.
    Returns {"temperatures", "base": {seed: {T: {"report", "pick"}}}, "best": {seed: T},
    "students": {reference: {method: {seed: {T: metrics}}}}, "mismatches"}."""
    import measure
    from plumbing.config import make_config
    temps = [f"{t:g}" for t in temperatures]
    own = f"{make_config(world.RECIPE, jobs[0].overrides).eval_temperature:g}"  # the runs' evaluations'
    swept, base, students = [j for j in jobs if j.method in SWEPT], {}, {}
    for seed in sorted({str(j.seed) for j in swept}):
        first = next(j for j in swept if str(j.seed) == seed)
        ignored = PER_JOB + FKL_KEYS + ("support",)  # what a run sets that the base's evaluation ignores
        key = {**first.key, "config": {k: v for k, v in first.key["config"].items() if k not in ignored}}
        path = out / f"base_seed_{seed}.measured.json"
        done = read_measured(path, key)
        todo = [float(t) for t in temps if t not in done]
        if todo:
            done |= model().sweep_base(int(seed), todo)
            write_measured(path, key, done)
        base[seed] = {t: done[t] for t in temps}
    for job in swept:
        done = read_measured(measured_file(job), job.key)
        sweep_done = done.get("sweep", {})
        todo = [float(t) for t in temps if t != own and t not in sweep_done]
        if todo:
            sweep_done |= model().sweep_student(job.out / "adapter", job.seed, todo)
            write_measured(measured_file(job), job.key, done | {"sweep": sweep_done})
        last = results[job.fmt][job.method][str(job.seed)][-1]
        students.setdefault(job.fmt, {}).setdefault(job.method, {})[str(job.seed)] = {
            t: {k: last.get(k) for k in measure.KEYS} if t == own else sweep_done[t] for t in temps}
    best = {seed: measure.best_temperature(b) for seed, b in base.items()}
    # the base at the runs' own temperature, evaluated again on their rows, must be their step-0 evaluation
    mismatches = [f"seed {seed}" for seed, b in base.items() if own in b for fmt in results
                  if seed in results[fmt]["base"] and any(
                      abs(b[own]["report"][k] - results[fmt]["base"][seed][0][k]) > 1e-12
                      for k in ("accuracy", "markers_per_1k"))]
    return {"temperatures": temps, "own": own, "base": base, "best": best, "students": students,
            "mismatches": sorted(set(mismatches))}


def rule(diffs: list[float]) -> dict | None:
    """Paired differences (one per seed) and whether they count by the decision rule written before the runs:
    |mean| > 2 standard errors (sample sd / √n) and the same sign in ≥ 2 of 3. None for fewer than two."""
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5 / len(diffs) ** 0.5
    same = sum((d > 0) == (mean > 0) and d != 0 for d in diffs)
    return {"mean": mean, "se": se, "per_seed": diffs,
            "counts": abs(mean) > 2 * se and same >= min(2, len(diffs))}


def paired(results: dict, fmt: str, method: str, key: str) -> dict | None:
    """method − base in `key` at the last evaluated step, paired by seed, judged by the decision rule."""
    seeds = [s for s in results[fmt].get(method, {}) if s in results[fmt]["base"] and results[fmt][method][s]]
    return rule([results[fmt][method][s][-1][key] - results[fmt]["base"][s][0][key] for s in seeds
                 if results[fmt][method][s][-1].get(key) is not None])


HYPOTHESES = [  # (name, method, key, holds(paired difference)): docs/carryworld.md, written before any run
    ("H1 OPSD lowers the markers", "opsd", "markers_per_1k", lambda d: d["counts"] and d["mean"] < 0),
    ("H2 OPSD's accuracy falls below the base's", "opsd", "accuracy",
     lambda d: d["counts"] and d["mean"] < 0),
    ("H3 Purified keeps the markers", "purified", "markers_per_1k",
     lambda d: not (d["counts"] and d["mean"] < 0)),
    ("H3 Purified's accuracy at or above the base's", "purified", "accuracy",
     lambda d: not (d["counts"] and d["mean"] < 0)),
]


def verdicts(results: dict) -> list[dict]:
    rows = []
    for fmt in results:
        for name, method, key, holds in HYPOTHESES:
            d = paired(results, fmt, method, key)
            if d is not None:
                rows.append({"reference": fmt, "hypothesis": name, **d, "holds": holds(d)})
    return rows


def beyond_sharpening(sweep: dict) -> list[dict]:
    """The extended rule (docs/toyworld.md, registered before any sweep): per reference and method, paired by
    seed, its student at T = 1 against the base at the base's best temperature, and its student against the
    base at each matched temperature; the gain counts as learning beyond sharpening only if every one of these
    differences counts by the rule and is positive."""
    rows, base, best = [], sweep["base"], sweep["best"]
    for fmt, methods in sweep["students"].items():
        for method, seeds in methods.items():
            seeds = [s for s in seeds if s in best]
            vs_best = rule([student_accuracy(sweep, fmt, method, s, "1")
                            - base[s][best[s]]["report"]["accuracy"] for s in seeds])
            matched = {t: rule([student_accuracy(sweep, fmt, method, s, t) - base[s][t]["report"]["accuracy"]
                                for s in seeds]) for t in sweep["temperatures"]}
            if vs_best is None:
                continue
            learned = all(d is not None and d["counts"] and d["mean"] > 0
                          for d in (vs_best, *matched.values()))
            rows.append({"reference": fmt, "method": method, "vs_base_at_best": vs_best,
                         "vs_base_at": matched, "learning_beyond_sharpening": learned})
    return rows


def student_accuracy(sweep: dict, fmt: str, method: str, seed: str, t: str) -> float:
    return sweep["students"][fmt][method][seed][t]["accuracy"]


def samples_of(run: Path, step: int) -> list[tuple[str, str]]:
    """(question, completion) of every sample of a run's evaluation at a step."""
    path = run / "eval" / f"step_{step:06d}" / "samples.jsonl"
    return [(r["question"], s["completion"]) for r in map(json.loads, _lines(path)) for s in r["samples"]]


def role_study(world, jobs: list[Job], results: dict, sweep: dict, out: Path, model) -> dict:
    """The per-role tables (measure.role_tables) of the default comparison: teacher-forced on the base's
    own samples (the first seed's step-0 evaluation), each arm's students pooled over seeds, and the error
    rates on each one's own samples (the base's step-0 evaluations, each student's last); kept in
    roles.json, keyed by the runs, so a rerun with every run cached computes nothing again."""
    import measure
    swept = [j for j in jobs if j.method in SWEPT]
    key = [j.key for j in swept]
    path = out / "roles.json"
    if (done := read_measured(path, key)):
        return done
    first = min(swept, key=lambda j: j.seed)
    own = {"base": [x for j in {j.seed: j for j in swept}.values() for x in samples_of(j.out, 0)]}
    students = {}
    for job in swept:
        arm = f"{job.method}, {job.fmt}"
        students.setdefault(arm, []).append(job.out / "adapter")
        last = results[job.fmt][job.method][str(job.seed)][-1]["step"]
        own.setdefault(arm, []).extend(samples_of(job.out, last))
    pooled = {t: [b[t]["report"]["role_errors"] for b in sweep["base"].values()]
              for t in sweep["temperatures"]}
    base_at = {t: {r: (sum(e[r][0] for e in es), sum(e[r][1] for e in es)) for r in world.ROLES}
               for t, es in pooled.items()}
    tables = measure.role_tables(world, model(), samples_of(first.out, 0), students, own, base_at)
    write_measured(path, key, tables)
    return tables


def role_screen(tables: dict, width: int, name: str) -> list:
    """The per-role tables for the screen, as narrow_tables (roles.md has them whole)."""
    def cell(v):
        return "" if v is None else f"{v:.2f}"
    p, e = tables["p_right"], tables["error_rate"]
    body = [[r, *(cell(p[h][r]) for h in p)] for r in tables["roles"]]
    shown = narrow_tables(f"{name}: P(right outcome) on the base's own samples, teacher-forced", ["role", *p],
                          body, 1, width)
    body = [[r, *(cell(e[w][r]) for w in e)] for r in tables["roles"]]
    return shown + narrow_tables(f"{name}: error rate per role on each one's own samples", ["role", *e],
                                 body, 1, width)


def base_mismatches(results: dict) -> list[str]:
    """The step-0 evaluation of one seed must be the same in every method's run (same base, same seed)."""
    bad = []
    for fmt, methods in results.items():
        for seed, base in methods["base"].items():
            for method, seeds in methods.items():
                got = seeds.get(seed, [{}])[0]
                if method != "base" and {k: got.get(k) for k in ("accuracy", "markers_per_1k")} != \
                        {k: base[0][k] for k in ("accuracy", "markers_per_1k")}:
                    bad.append(f"{fmt}/{method}/seed {seed}")
    return bad


TABLE = {"accuracy": "accuracy", "accuracy_no_wait": "no wait", "markers_per_1k": "markers/1k",
         "caught_frac": "caught", "false_reflections": "false refl", "completion_len": "length",
         "cos_total_ref": "cos(Δ,Δref)",
         "norm_ratio": "|Δref|/|Δ|"}  # no wait: accuracy with "wait" forbidden (the final adapter)


def last_step_rows(results: dict, cols) -> list[tuple]:
    """Per (reference, method): the last evaluated step, {column: (mean, sd) over seeds}, each seed's point.
    sd is the sample standard deviation (n − 1 in the denominator), 0 for one seed."""
    rows = []
    for fmt, methods in results.items():
        for method, seeds in methods.items():
            last = [pts[-1] for pts in seeds.values() if pts]
            if not last:
                continue
            stats = {}
            for c in cols:
                vals = [p[c] for p in last if p.get(c) is not None]
                if vals:
                    mean = sum(vals) / len(vals)
                    stats[c] = mean, (sum((v - mean) ** 2 for v in vals)
                                      / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
            rows.append((fmt, method, last[0]["step"], stats, last))
    return rows


def narrow_tables(title: str, heads: list[str], body: list[list[str]], keys: int, width: int) -> list:
    """Rich tables of body's rows, not one: the columns after the first `keys` (repeated in each) are split so
    each table fits `width` (a pipe's 80 columns cut no header)."""
    from rich import box
    from rich.table import Table
    cost = [max([len(h), *(len(r[i]) for r in body)]) + 3 for i, h in enumerate(heads)]  # cell, padding, gap
    groups, used = [[]], sum(cost[:keys]) + 1
    for i in range(keys, len(heads)):
        if groups[-1] and used + cost[i] > width:
            groups.append([])
            used = sum(cost[:keys]) + 1
        groups[-1].append(i)
        used += cost[i]
    tables = []
    for k, group in enumerate(groups):
        table = Table(title=title if k == 0 else "(continued)", box=box.SIMPLE_HEAD)
        for i in [*range(keys), *group]:
            table.add_column(heads[i], justify="left" if i < min(keys, 2) else "right", no_wrap=True)
        for r in body:
            table.add_row(*(r[i] for i in [*range(keys), *group]))
        tables.append(table)
    return tables


def compare_table(results: dict, width: int = 80, name: str = "toyworld") -> list:
    """Mean ± sd over seeds at the last evaluated step (every number, per seed, is in summary.json), as
    narrow_tables."""
    rows = last_step_rows(results, TABLE)
    seeds = {len(last) for *_, last in rows}
    body = []
    for fmt, method, step, stats, last in rows:
        cells = ["" if c not in stats else f"{stats[c][0]:.1f}±{stats[c][1]:.1f}" if abs(stats[c][0]) >= 10
                 else f"{stats[c][0]:.2f}±{stats[c][1]:.2f}" for c in TABLE]
        body.append([fmt, method if len(seeds) == 1 else f"{method} ({len(last)})", str(step), *cells])
    n = "the seeds in ()" if len(seeds) != 1 else "1 seed" if seeds == {1} else f"{seeds.pop()} seeds"
    title = (f"{name}: base vs OPSD vs Purified at the last evaluated step; ref = the reference format; "
             f"mean ± sd over {n} (sample sd, n − 1)")
    return narrow_tables(title, ["ref", "method", "step", *TABLE.values()], body, 3, width)


def sweep_rows(sweep: dict) -> list[tuple[str, str, dict]]:
    """(reference, arm, {T: (mean accuracy, sd, mean markers)}) over seeds: the base, with its best
    temperature (per seed) as "best", then each student."""
    def stats(points):
        acc = [m["accuracy"] for m in points]
        return (statistics.fmean(acc), statistics.stdev(acc) if len(acc) > 1 else 0.0,
                statistics.fmean(m["markers_per_1k"] for m in points))
    base = sweep["base"]
    cells = {t: stats([b[t]["report"] for b in base.values()]) for t in sweep["temperatures"]}
    cells["best"] = stats([base[s][t]["report"] for s, t in sweep["best"].items()])
    out = [("", "base", cells)]
    for fmt, methods in sweep["students"].items():
        for method, seeds in methods.items():
            out.append((fmt, method,
                        {t: stats([v[t] for v in seeds.values()]) for t in sweep["temperatures"]}))
    return out


def sweep_markdown(sweep: dict, verdicts_beyond: list[dict]) -> str:
    """The sweep (accuracy mean ± sd over seeds, markers per 1k) and the extended verdicts as Markdown."""
    temps = sweep["temperatures"]
    best = ", ".join(f"seed {s}: {t}" for s, t in sweep["best"].items())
    lines = ["", "Accuracy at each sampling temperature, mean ± sd over seeds (markers per 1k in brackets); "
             f"the base's best temperature, picked on held-out rows the runs never score: {best}", "",
             "| reference | arm | " + " | ".join(f"T = {t}" for t in temps) + " | at the base's best T |",
             "|---|---|" + "---:|" * (len(temps) + 1)]
    for fmt, arm, cells in sweep_rows(sweep):
        row = [f"{cells[t][0]:.3f} ± {cells[t][1]:.3f} [{cells[t][2]:.1f}]" if t in cells else ""
               for t in (*temps, "best")]
        lines.append(f"| {fmt} | {arm} | " + " | ".join(row) + " |")

    def diff(d):
        return "" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f}" + (" *" if d["counts"] else "")
    lines += ["", "Learning beyond sharpening (docs/toyworld.md): student − base, paired by seed (mean ± SE, "
              "* when it counts by the rule); the student at T = 1 against the base at its best T, and at "
              "each matched T", "",
              "| reference | method | vs base at its best T | " + " | ".join(f"at T = {t}" for t in temps)
              + " | learning beyond sharpening |", "|---|---|---:|" + "---:|" * len(temps) + "---|"]
    for v in verdicts_beyond:
        lines.append(f"| {v['reference']} | {v['method']} | {diff(v['vs_base_at_best'])} | "
                     + " | ".join(diff(v["vs_base_at"][t]) for t in temps)
                     + f" | {'yes' if v['learning_beyond_sharpening'] else 'no'} |")
    return "\n".join(lines) + "\n"


def sweep_tables(sweep: dict, verdicts_beyond: list[dict], width: int, name: str) -> list:
    """The sweep and the extended verdicts for the screen, as narrow_tables."""
    temps = sweep["temperatures"]
    body = [[fmt, arm, *(f"{cells[t][0]:.3f}±{cells[t][1]:.3f}" if t in cells else "" for t in temps),
             f"{cells['best'][0]:.3f}±{cells['best'][1]:.3f}" if "best" in cells else ""]
            for fmt, arm, cells in sweep_rows(sweep)]
    tables = narrow_tables(f"{name}: accuracy at each temperature, mean ± sd over seeds", ["ref", "arm",
                           *(f"T={t}" for t in temps), "best T"], body, 2, width)
    def diff(d):
        return "" if d is None else f"{d['mean']:+.3f}{'*' if d['counts'] else ''}"
    body = [[v["reference"], v["method"], diff(v["vs_base_at_best"]), *map(diff, v["vs_base_at"].values()),
             "yes" if v["learning_beyond_sharpening"] else "no"] for v in verdicts_beyond]
    if not body:  # fewer than two seeds: nothing to judge
        return tables
    return tables + narrow_tables(f"{name}: student − base (* counts); learning beyond sharpening?",
                                  ["ref", "method", "best T", *(f"T={t}" for t in temps), "beyond"], body, 2,
                                  width)


def markdown_table(results: dict) -> str:
    """The comparison at the last evaluated step as Markdown: mean ± sd over seeds, and each seed's
    accuracy."""
    # | ends a cell
    cols = {**{k: v.replace("|", "‖") for k, v in TABLE.items()}, "cos_total_it": "cos(Δ,Δit)"}
    lines = ["| reference | method | step | " + " | ".join(cols.values()) + " | accuracy per seed |",
             "|---|---|---:|" + "---:|" * len(cols) + "---|"]
    for fmt, method, step, stats, last in last_step_rows(results, cols):
        cells = ["" if c not in stats else f"{stats[c][0]:.1f} ± {stats[c][1]:.1f}" if abs(stats[c][0]) >= 10
                 else f"{stats[c][0]:.3f} ± {stats[c][1]:.3f}" for c in cols]
        per_seed = " / ".join(f"{p['accuracy']:.3f}" for p in last)
        lines.append(f"| {fmt} | {method} | {step} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines) + "\n"


def setting_of(method: str) -> tuple | None:
    """(c, β) of a Purified run's method name ("purified" is c = 10, β = 1; c None: no clip); None
    otherwise."""
    if method == "purified":
        return 10.0, 1.0
    if not method.startswith("purified_c"):
        return None
    clip, beta = method[len("purified_c"):].split("_b")
    return (None if clip == "none" else float(clip)), float(beta)


# which runs, which factor
ABLATIONS = {"clip": (lambda c, b: b == 1.0, 0), "beta": (lambda c, b: c == 10.0, 1)}
ABLATION_KEYS = ("accuracy", "accuracy_no_wait", "markers_per_1k", "caught_frac")


def _last(methods: dict, method: str, key: str) -> list[float]:
    return [pts[-1][key] for pts in methods.get(method, {}).values() if pts and pts[-1].get(key) is not None]


def ablation_series(results: dict, name: str) -> dict:
    """What an ablation's figure draws, per reference format: the settings on its axis (c or β, the other at
    the paper's value), each seed's last-step value per key for Purified, and the baselines' means (base,
    OPSD, ...)."""
    member, axis = ABLATIONS[name]
    series = {}
    for fmt, methods in results.items():
        runs = sorted(((setting_of(m), m) for m in methods if setting_of(m) and member(*setting_of(m))),
                      key=lambda x: float("inf") if x[0][axis] is None else x[0][axis])
        if len(runs) < 2:
            continue
        series[fmt] = {
            "x": ["none" if s[axis] is None else f"{s[axis]:g}" for s, _ in runs],
            "series": {"Purified": {k: [_last(methods, m, k) for _, m in runs] for k in ABLATION_KEYS}},
            "lines": {m: {k: statistics.fmean(v) for k in ABLATION_KEYS if (v := _last(methods, m, k))}
                      # the support runs: supports.png
                      for m in ("base", "opsd", "opsd_fkl") if m in methods}}
    return series


SUPPORTS = ("full", "topk", "sampled", "full_rkl")


def support_series(results: dict) -> dict:
    """The supports' figure, per reference format: OPSD and Purified on each support run (x), each seed's
    last-step value per key, and the base's mean."""
    series = {}
    for fmt, methods in results.items():
        x = [s for s in SUPPORTS if s == "full" or f"opsd_{s}" in methods or f"purified_{s}" in methods]
        if len(x) < 2:
            continue
        name = lambda m, s: m if s == "full" else f"{m}_{s}"  # noqa: E731
        series[fmt] = {"x": x, "series": {label: {k: [_last(methods, name(m, s), k) for s in x]
                                                  for k in ABLATION_KEYS}
                                          for label, m in (("OPSD", "opsd"), ("Purified", "purified"))},
                       "lines": {"base": {k: statistics.fmean(v) for k in ABLATION_KEYS
                                          if (v := _last(methods, "base", k))}}}
    return series


def ablation_rows(results: dict) -> list[dict]:
    """Per reference format and method (every Purified setting, the baselines): final accuracy, markers,
    no-wait accuracy and caught (mean, sd over seeds), and accuracy − base paired by seed."""
    rows = []
    for fmt, method, step, stats, last in last_step_rows(results, TABLE):
        setting = setting_of(method) or (None, None)
        rows.append({"reference": fmt, "method": method, "c": setting[0], "beta": setting[1], "step": step,
                     **{k: stats.get(k) for k in ("accuracy", "markers_per_1k", "accuracy_no_wait",
                                                  "caught_frac")},
                     "vs_base": paired(results, fmt, method, "accuracy") if method != "base" else None,
                     "per_seed": [p["accuracy"] for p in last]})
    return rows


def ablation_markdown(results: dict) -> str:
    """The ablation table: every method and Purified setting at the last step, mean ± sd over seeds, and
    accuracy − base paired by seed (mean ± SE; * when it counts by the decision rule)."""
    lines = ["| reference | method | c | β | accuracy | markers/1k | no wait | caught | accuracy − base | "
             "per seed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]

    def cell(v, digits=3):
        return "" if v is None else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"
    for r in ablation_rows(results):
        d = r["vs_base"]
        diff = "" if d is None else f"{d['mean']:+.3f} ± {d['se']:.3f}" + (" *" if d["counts"] else "")
        c = "" if r["beta"] is None else "none" if r["c"] is None else f"{r['c']:g}"
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        lines.append(f"| {r['reference']} | {r['method']} | {c} | {beta} | {cell(r['accuracy'])} | "
                     f"{cell(r['markers_per_1k'], 1)} | {cell(r['accuracy_no_wait'])} | "
                     f"{cell(r['caught_frac'])} | {diff} | {' / '.join(f'{a:.3f}' for a in r['per_seed'])} |")
    return "\n".join(lines) + "\n"


PER_JOB = ("method", "seed", "reference_field", "pmi_clip", "beta", "out_dir", "threads")  # set for each run
FKL_KEYS = ("divergence", "term_clamp")  # set for each run too under --opsd-fkl
MARKER = "popsd_compare.json"  # written when a comparison folder is created: what --overwrite may remove


def prepare_out(out: Path, formats, overwrite: bool, seeds: int = 0):
    """A new or empty folder, or an earlier comparison's: its finished runs are reused where they match
    (compare checks each), or with --overwrite removed (only what it wrote, a link as a link). Any other
    folder is refused."""
    if out.exists() and (out.is_file() or any(out.iterdir())):
        marker = out / MARKER
        legacy = (out / "summary.json").is_file() and not marker.exists()  # written before the marker
        if not (marker.is_file() or legacy):
            raise FileExistsError(f"{out} is not empty and is not a comparison popsd wrote (no {MARKER}): "
                                  "choose another --out")
        entries = json.loads(marker.read_text())["entries"] if marker.is_file() else [
            "summary.json", "summary.md", "summary.png", "full", "sketch"]
        if overwrite:
            remove_entries(out, entries)
            entries = []
    else:
        entries = []
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(set(entries) | {*formats, "summary.json", "summary.md", "summary.png", "roles.json",
                                     "roles.md", *(f"base_seed_{s}.measured.json" for s in range(seeds))})
    (out / MARKER).write_text(json.dumps({"entries": entries}) + "\n")


def print_gates(world, measured: dict, console=None):
    """The gate table, and a loud banner when a gate fails: the comparison then cannot show what it is for."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    table = Table(title=f"{world.NAME} base: gates (held-out questions, one sample each at temperature 1)")
    for col in ("gate", "measured", "needed", ""):
        table.add_column(col)
    result = common.gates(world, measured)
    for g in result:
        table.add_row(g["gate"], f"{g['value']:.3f}", f"{g['bound']} {g['threshold']:.2f}",
                      "[green]pass[/]" if g["passed"] else "[bold red]FAIL[/]")
    console.print(table)
    contexts = Table(title="the base in each context", box=box.SIMPLE_HEAD,
                     caption="acc: accuracy; errors: first-"
                     "try errors per sample; P(w|✗), P(w|✓): P(wait | wrong step), P(wait | "
                     "right step); mk/1k: "
                     "markers per 1k tokens; len: tokens")  # short headers: 80 columns hold the table
    for col in ("context", "acc", "errors", "caught", "P(w|✗)", "P(w|✓)", "mk/1k", "len"):
        contexts.add_column(col, justify="left" if col == "context" else "right", no_wrap=True)
    for name, m in measured.items():
        contexts.add_row(name, f"{m['accuracy']:.3f}", f"{m['first_try_errors']:.2f}",
                         f"{m['caught_frac']:.2f}", f"{m['p_wait_wrong']:.2f}", f"{m['p_wait_right']:.2f}",
                         f"{m['markers_per_1k']:.1f}", f"{m['completion_len']:.1f}")
    console.print(contexts)
    failed = [g["gate"] for g in result if not g["passed"]]
    if failed:
        console.print(f"[bold white on red] THE {world.NAME.upper()} BASE FAILS {len(failed)} GATE(S): "
                      f"{'; '.join(failed)}. What follows is not evidence about reflection. [/]")
    return result


def planned_jobs(world, out: Path, formats, seeds, clips, betas, workers, gate_samples, overrides,
                 grid="product", opsd_fkl=False, supports=("full",), temperatures=(1.0,)) -> list[Job]:
    """Every argument checked, and every run's config resolved (make_config validates each), before any
    work: the jobs of the comparison, or a ValueError / PopsdError naming what is wrong."""
    from plumbing.config import make_config
    own = make_config(world.RECIPE, list(overrides)).eval_temperature
    if not temperatures or any(not (t > 0 and math.isfinite(t)) for t in temperatures) or \
            f"{own:g}" not in {f"{t:g}" for t in temperatures}:
        given = ",".join(f"{t:g}" for t in temperatures)
        raise ValueError(f"--temperatures {given}: numbers > 0 that include the runs' own evaluation "
                         f"temperature ({own:g}), which the sweep takes from the runs")
    known = list(world.references(common.held_out(world, 1)[0]))
    if not formats or any(f not in known for f in formats):
        raise ValueError(f"--formats {','.join(formats)}: {world.NAME}'s reference formats are "
                         f"{', '.join(known)}")
    if workers < 1 or seeds < 1 or gate_samples < 1:
        raise ValueError(f"--workers, --seeds and --gate-samples must be at least 1 (got {workers}, {seeds}, "
                         f"{gate_samples})")
    for flag, values in (("--clip", clips), ("--beta", betas)):
        if not values or any(v is not None and not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"{flag} {','.join('none' if v is None else f'{v:g}' for v in values)}: one or "
                             "more finite numbers > 0" + (" (or none: no clip)" if flag == "--clip" else ""))
    unknown = [s for s in supports if s not in ("full", *SUPPORT_ARGS)]
    if unknown:
        raise ValueError(f"--support {unknown[0]!r}: one of full, {', '.join(SUPPORT_ARGS)}")
    per_job = PER_JOB + (FKL_KEYS if opsd_fkl else ()) + (("support", "divergence") if {*supports} - {"full"}
                                                          else ())
    clash = [o for o in overrides if o.split("=", 1)[0].strip() in per_job]
    if clash:
        raise ValueError(f"override {clash[0]!r}: compare sets {', '.join(per_job)} for each run itself (use "
                         "--formats, --seeds, --clip, --beta, --out); an override would make "
                         "every run the same")
    common.held_out(world, gate_samples)  # enough held-out questions for the gates
    return compare_jobs(world, out.resolve(), formats, seeds, clips, betas, overrides, grid, opsd_fkl,
                        supports)


def compare(world, out: Path, formats, seeds, clips, betas, workers, gate_samples, overrides, overwrite,
            console, grid: str = "product", opsd_fkl: bool = False, supports=("full",),
            temperatures=(1.0, 0.7, 0.5)):
    import measure
    import plots
    out = out.resolve()  # one folder for the runs and for reading them back, whatever the working directory
    jobs = planned_jobs(world, out, formats, seeds, clips, betas, workers, gate_samples, overrides, grid,
                        opsd_fkl, supports, temperatures)
    prepare_out(out, formats, overwrite, seeds)
    t0 = time.time()
    tok, model = common.load_base(world)
    measured = world.measure_base(model, tok, gate_samples)
    gate_rows = print_gates(world, measured, console)
    del model
    if getattr(world, "GATED", False) and not all(g["passed"] for g in gate_rows):  # registered: none is run
        stopped = {"settings": {"world": world.NAME, "stopped": "a gate failed"}, "gates": gate_rows,
                   "base_measured": measured}
        (out / "summary.json").write_text(json.dumps(stopped, indent=1) + "\n")
        console.print(f"[bold red]the {world.NAME} base fails a gate: as registered, the comparison does not "
                      f"run (the gates are in {out / 'summary.json'})[/]")
        return None
    from plumbing.config import make_config
    cfg = make_config(world.RECIPE, [o for o in overrides])
    console.print(f"{len(jobs)} runs of recipes/{world.RECIPE}.py ({cfg.steps} steps, evaluation every "
                  f"{cfg.eval_every} steps on {cfg.eval_limit} held-out questions), runs in "
                  f"{out}/<reference>/<method>/seed_<n>/, their logs beside them (seed_<n>.log)")
    redo = {id(job): why_redo(job) for job in jobs}
    todo = [job for job in jobs if redo[id(job)]]
    console.print(f"{len(jobs) - len(todo)} runs reused (the same config, base, data, code and libraries: "
                  f"{out}/.../seed_<n>.done.json), {len(todo)} to run")
    for job in todo:
        if redo[id(job)] != "no finished run":
            console.print(f"redone, {redo[id(job)]}: {job.out}", soft_wrap=True)
    # an unfinished or different earlier run in this comparison's folder: compare's own, redone
    for job in todo:
        remove_entries(job.out.parent, [job.out.name, job.record.name])
    # training rows + step-0 row
    run_jobs(world, todo, workers, cfg.steps + 1 + cfg.steps // cfg.eval_every, console)
    results = collect(jobs)
    console.print("each trained student with \"wait\" forbidden ...")
    add_no_wait(world, jobs, results, measured, gate_samples)
    loaded = []

    def run_model():  # the runs' model and sampler, loaded once, only if something must be measured
        if not loaded:
            console.print("measuring (the temperature sweep, the roles) ...")
            loaded.append(measure.RunModel(cfg, world))
        return loaded[0]
    swept = sweep(world, jobs, results, temperatures, out, run_model)
    roles = role_study(world, jobs, results, swept, out, run_model)
    summary = {"settings": {"command": " ".join(sys.argv), "world": world.NAME, "recipe": world.RECIPE,
                            "overrides": list(overrides), "formats": list(formats), "seeds": seeds,
                            "clips": list(clips), "betas": list(betas),
                            "grid": grid, "opsd_fkl": opsd_fkl, "supports": list(supports),
                            "steps": cfg.steps, "eval_every": cfg.eval_every, "eval_samples": cfg.eval_limit,
                            "workers": workers, "machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores", "minutes": round((time.time() - t0) / 60, 2)},
               "gates": gate_rows, "base_measured": measured, "results": results}
    mismatches = base_mismatches(results)
    if mismatches:
        console.print(f"[bold red]step-0 evaluations differ between methods of one seed: {mismatches}[/]")
    summary["base_mismatches"] = mismatches
    summary["verdicts"] = verdicts(results)
    summary["sweep"], summary["beyond_sharpening"] = swept, beyond_sharpening(swept)
    summary["roles"] = roles
    if swept["mismatches"]:
        console.print(f"[bold red]the base evaluated again at T = {swept['own']} differs from the runs' "
                      f"step-0 evaluation: {swept['mismatches']}[/]")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown_table(results)
                                    + sweep_markdown(swept, summary["beyond_sharpening"]))
    (out / "roles.md").write_text(measure.roles_markdown(roles))
    (out / "summary.png").unlink(missing_ok=True)  # the comparison's own (its marker lists it)
    plots.plot_compare(summary, out / "summary.png")
    if any(setting_of(m) not in (None, (10.0, 1.0)) for methods in results.values() for m in methods):
        # every method and setting, with supports
        (out / "ablation.md").write_text(ablation_markdown(results))
        for name in ABLATIONS:
            series = ablation_series(results, name)
            if series:
                (out / f"ablation_{name}.png").unlink(missing_ok=True)  # the comparison's own
                plots.plot_ablation(series, "c (soft clip)" if name == "clip" else "β",
                                    f"{world.NAME}: Purified's {name} ablation", out / f"ablation_{name}.png")
    if any(support_series(results).values()):
        (out / "ablation.md").write_text(ablation_markdown(results))
        (out / "supports.png").unlink(missing_ok=True)
        plots.plot_ablation(support_series(results), "loss support",
                            f"{world.NAME}: OPSD and Purified on each loss support (sampled and full_rkl: "
                            "reverse KL)", out / "supports.png")
    for table in compare_table(results, console.width, world.NAME):
        console.print(table)
    for v in summary["verdicts"]:
        console.print(f"{v['reference']}: {v['hypothesis']}: {'holds' if v['holds'] else 'does not hold'} "
                      f"(paired difference {v['mean']:+.3f} ± {v['se']:.3f} SE, per seed "
                      f"{', '.join(f'{d:+.3f}' for d in v['per_seed'])})", soft_wrap=True)
    for table in (*sweep_tables(swept, summary["beyond_sharpening"], console.width, world.NAME),
                  *role_screen(roles, console.width, world.NAME)):
        console.print(table)
    if not all(g["passed"] for g in gate_rows):
        console.print(f"[bold white on red] reminder: the {world.NAME} base failed a gate (table above) [/]")
    console.print(f"{summary['settings']['minutes']:.1f} min; {out / 'summary.json'} and "
                  f"{out / 'summary.png'}")
    return summary

# ----------------------------------------------------------------------------- CLI

def pretrain_settings(world, pairs: list[str]) -> dict:
    """key=value pairs over world.PRETRAIN, each parsed as its default's type; an unknown key is an error."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in world.PRETRAIN:
            raise ValueError(f"pretrain setting {pair!r}: expected key=value with key one of "
                             f"{', '.join(world.PRETRAIN)}")
        out[key] = type(world.PRETRAIN[key])(value)
    return out


def floats(flag: str, text: str, none: bool = False) -> list:
    """A comma-separated list of numbers (with none: "none" too, no clip) → floats; anything else names the
    flag."""
    try:
        return [None if none and x.strip() == "none" else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: numbers, comma-separated{' (or none)' if none else ''}") from None


def main(argv: list[str]):
    import argparse
    import torch
    from rich.console import Console
    console = Console()  # a pipe or a log file gets 80 columns: the tables are made to fit them
    command = argv[0] if argv and argv[0] in ("gates", "pretrain", "data") else "compare"
    argv = argv[1:] if command != "compare" else argv
    p = argparse.ArgumentParser(prog=f"compare.py{'' if command == 'compare' else ' ' + command}",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", default="toyworld", help=f"{', '.join(worlds.NAMES)}; compare takes several, "
                   "comma-separated (each into runs/<world>_compare unless --out)")
    if command == "compare":
        p.add_argument("--out", default=None, help="default runs/<world>_compare")
        p.add_argument("--formats", help="reference formats, comma-separated (default: the world's arms, its "
                                         "FORMATS)")
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--clip", default="10",
                       help="Purified's soft clip c; a list (5,10,20) adds ablation runs")
        p.add_argument("--beta", default="1", help="Purified's β; a list (0.5,1,2) adds ablation runs")
        p.add_argument("--grid", choices=("product", "one-at-a-time"), default="product",
                       help="every (c, β) pair, or one factor at a time around c = 10, β = 1 (the "
                            "paper's ablations)")
        p.add_argument("--opsd-fkl", action="store_true",
                       help="also OPSD with the updated official code's loss: forward KL, term_clamp 0.05")
        p.add_argument("--support", default="full",
                       help="loss supports, comma-separated: full, topk, sampled, full_rkl "
                       "(each beyond full adds OPSD and Purified on it; full_rkl: reverse KL on the "
                       "full vocabulary)")
        p.add_argument("--temperatures", default="1,0.7,0.5",
                       help="the sweep: the base and every final student at each sampling temperature "
                            "(docs/toyworld.md)")
        p.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
        p.add_argument("--gate-samples", type=int, default=400)
        p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
        p.add_argument("overrides", nargs="*",
                       help="key=value for every run (e.g. steps=30); the same for all methods")
    elif command == "gates":
        p.add_argument("--samples", type=int, default=400)
        p.add_argument("--base", default=None, help="default: the world's shipped base")
    elif command == "pretrain":
        p.add_argument("--out", default=None,
                       help="default: the world's shipped base folder (with --replace)")
        p.add_argument("--replace", action="store_true",
                       help="write over a base already in --out (or the shipped one)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--from", dest="base", default=None,
                       help="for a world that continues another base's pre-training (FROM): the base to "
                       "start from")
        p.add_argument("settings", nargs="*", help="key=value over the world's PRETRAIN (a pilot's settings)")
    elif command == "data":
        p.add_argument("--out", default=None, help="default: the world's shipped data folder")
        p.add_argument("--replace", action="store_true",
                       help="write over files that differ from what the generator makes")
    args = p.parse_args(argv)
    try:
        names = [w.strip() for w in args.world.split(",") if w.strip()]
        if len(names) != 1 and (command != "compare" or args.out):
            raise ValueError(f"--world {args.world}: one world for {command}"
                             + (" with --out" if args.out else ""))
        # every name checked before the first world's runs start
        chosen = [worlds.get(name) for name in names]
        world = chosen[0]
        if command == "data":
            out = Path(args.out or world.DATA)
            for name, what in world.write_data(out, args.replace).items():
                console.print(f"{out / name}: {what}", soft_wrap=True)
        elif command == "gates":
            torch.set_num_threads(2)
            tok, model = common.load_base(world, args.base)
            print_gates(world, world.measure_base(model, tok, args.samples), console)
        elif command == "pretrain":
            import plots
            torch.set_num_threads(world.PRETRAIN["threads"])
            out = Path(args.out or world.BASE)
            # every run, checkpoint and evaluation made
            if (out / "config.json").exists() and not args.replace:
                shipped = (" (the shipped base, tracked by git)" if out.resolve() == world.BASE.resolve()
                           else "")
                raise ValueError(f"{out} already holds a base{shipped}: pre-training would write over it. "
                                 "Pre-train into a new folder with --out DIR (then train on it with "
                                 "model=DIR), or pass --replace to overwrite it")
            more = {"base": args.base} if hasattr(world, "FROM") and args.base else {}
            if args.base and not more:
                raise ValueError(f"--from: {world.NAME} is pre-trained from scratch, not from a base")
            _, _, log = world.pretrain(out, seed=args.seed, **more, **pretrain_settings(world, args.settings))
            (out / "pretrain.png").unlink(missing_ok=True)  # the base's, replaced with it
            # worlds three and four gate other quantities than the panels show: the gate table has them
            lines = [] if getattr(world, "GATED", False) else [(name, t) for name, _, t, *_ in world.GATES
                                                                if t <= 1]
            plots.plot_pretrain(log, lines, out / "pretrain.png")
            tok, model = common.load_base(world, out)
            print_gates(world, world.measure_base(model, tok), console)
        else:
            clips, betas = floats("--clip", args.clip, none=True), floats("--beta", args.beta)
            formats = [f.strip() for f in args.formats.split(",")] if args.formats else None
            supports = [x.strip() for x in args.support.split(",") if x.strip()]
            temperatures = floats("--temperatures", args.temperatures)
            for world in chosen:  # every world's arguments and runs checked before the first one starts
                planned_jobs(world, Path(args.out or f"runs/{world.NAME}_compare"), formats or world.FORMATS,
                             args.seeds, clips, betas, args.workers, args.gate_samples, args.overrides,
                             args.grid, args.opsd_fkl, supports, temperatures)
            for world in chosen:
                compare(world, Path(args.out or f"runs/{world.NAME}_compare"), formats or world.FORMATS,
                        args.seeds, clips, betas, args.workers, args.gate_samples, args.overrides,
                        args.overwrite, console, args.grid, args.opsd_fkl, supports, temperatures)
    except (FileExistsError, FileNotFoundError, RuntimeError, ValueError, PopsdError) as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
