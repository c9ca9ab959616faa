"""eval.py: math benchmarks: avg@k, pass@k, completion lengths, truncation and epistemic markers.

    python eval.py --model Qwen/Qwen3-8B --adapter runs/single_gpu/adapter --bench aime24,aime25,hmmt25 --n 12
    python eval.py --adapter runs/single_gpu/checkpoints --bench aime24     # every checkpoint, the best step
    python eval.py --server http://localhost:8000 --served-model popsd ...  # sampled by a server (vLLM & co)
    python eval.py merge --adapter runs/single_gpu/adapter --out merged       # base + adapter as one model

Prompts use the student's template and thinking mode: --template/--thinking, else the adapter's
popsd_prompts.json (saved with every adapter), the run's config.json above it, or the model folder's
popsd_prompts.json (the toy base ships one); with none, popsd's template and thinking on, said so.
Each completion is graded by plumbing.grading.grade: the last \\boxed{} after the reasoning block against
the gold answer with math-verify. Writes summary.json and samples.jsonl (every completion, the answer
extracted from it and its verdict) to --out. During training (eval_every) plumbing/session.py calls
`in_training`, which runs `evaluate` with the run's sampler. Through a server: plumbing/remote.py.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import worlds
from engines import request_seed
from engines.client import VLLM_FIELDS, Server
from engines.graph import GraphSampler, plan as graph_plan
from engines.hf import HFSampler
from plumbing.adapters import (base_model_of, check_adapter_base, load_for_eval, load_tokenizer, run_config,
                               run_sampling, run_settings, swap_adapter)
from plumbing.checkpoints import MARKER, check_out_dir, disk_full, replace_folder
from plumbing.data import PopsdError, read_rows, resolve_local
from plumbing.distributed import gather
from plumbing.grading import grade, pass_at_k
from plumbing.models import (base_fingerprint, eos_ids, fit_new_tokens, generation_batch, memory_budget,
                             merge_adapter, pick_device)
from rollout import STUDENT_TEMPLATE, chat_ids, fill, marker_counts
from worlds.common import Check, summarize

console = Console()

BENCHMARKS = {  # name: (hub id, split, question field, answer field)
    "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": ("MathArena/aime_2025", "train", "problem", "answer"),
    "hmmt25": ("MathArena/hmmt_feb_2025", "train", "problem", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "amc23": ("math-ai/amc23", "test", "question", "answer"),
}
# ----------------------------------------------------------------------------- benchmarks

CLI_FIELDS = ("Name the fields with --question-field and --answer-field (defaults: problem, answer), "
              "or fix the row.")


def load_bench(spec: str, question_field: str = "problem", answer_field: str = "answer", limit: int = 0,
               advice: str = CLI_FIELDS):
    """(name, [(question, gold)]) for a benchmark name or a local .jsonl/.json/.parquet file."""
    if spec in BENCHMARKS:
        source, split, q_field, a_field = BENCHMARKS[spec]
        name = spec
    elif resolve_local(spec) is not None or Path(spec).suffix in (".jsonl", ".json", ".parquet"):
        source, split, q_field, a_field = spec, "train", question_field, answer_field
        name = Path(spec).stem
    else:
        raise PopsdError(f"unknown benchmark {spec!r}: use one of {', '.join(BENCHMARKS)} or a local "
                         ".jsonl/.json/.parquet file (with --question-field/--answer-field)")
    rows, _ = read_rows(source, split, (q_field, a_field), advice=advice)
    return name, rows[:limit] if limit else rows


def checker_of(grader: str):
    """--grader / eval_grader: None for math-verify, else the named world's exact checker (looked up by
    name)."""
    return None if grader == "math" else worlds.get(grader).check


def bench_metrics(verdicts: list[list[bool]], lengths: list[int], truncated: list[bool],
                  markers: int) -> dict:
    """Per-benchmark numbers from Q questions × n samples (lengths/truncated flat over all samples)."""
    n = len(verdicts[0])
    flat = [v for row in verdicts for v in row]
    out = {f"avg@{n}": sum(flat) / len(flat)}
    for k in sorted({1, n}):
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(n, sum(row), k) for row in verdicts)
    return out | {"len_mean": statistics.fmean(lengths), "len_median": statistics.median(lengths),
                  "truncated": sum(truncated) / len(truncated),
                  "markers_per_1k": 1000 * markers / max(sum(lengths), 1),
                  "questions": len(verdicts), "samples": len(flat)}


def advance(bar, task, k: int, every: float = 10.0, end_line: bool = True):
    """The bar moves; where it cannot be drawn (stdout a pipe or a file), a line says how far it is, at most
    every `every` seconds, and at the end (with end_line=False only after a line was printed: short work stays
    quiet)."""
    bar.advance(task, k)
    if not bar.console.is_terminal and not bar.console.quiet:
        t = bar.tasks[[x.id for x in bar.tasks].index(task)]
        now, printed = time.monotonic(), t.fields.get("printed")
        if (t.completed >= (t.total or 0) and (end_line or printed)) or \
                now - (printed or t.start_time or now) >= every:
            t.fields["printed"] = now
            bar.console.print(f"{t.description}: {t.completed:.0f}/{t.total:.0f} samples, "
                              f"{t.elapsed or 0:.0f} s")


def evaluate(model, tokenizer, benches: dict, *, n: int, max_new_tokens: int, temperature: float,
             top_p: float, top_k: int, eos_ids: list[int], batch_size: int, device,
             template: str = STUDENT_TEMPLATE, thinking: bool = False, seed: int = 0, progress=None,
             rank: int = 0, world: int = 1, grader: str = "math",
             sampler=None):
    """Sample n completions per question of each benchmark, grade them; returns (metrics, records) per bench.

    sampler: who generates (an engine of engines/; during training, the run's own, so an engine evaluates
    too); None: HF generate on `model`. Every engine takes a seed per question (engines.request_seed).
    grader: "math" (is_correct: the last \\boxed{} against the gold answer) or a world's name (worlds/: its
    exact checker, which also counts step errors, caught errors and false reflections).
    thinking: the chat template's thinking mode; then only the text after the reasoning block is graded, and
    a completion that never closes the block is wrong (grading.grade).

    Seeded per question (the benchmark's name and the question's index), so a benchmark's results do not
    depend on which others run with it or on the ranks; the caller's RNG state is left as it was. Under
    torchrun each rank takes every world-th question and rank 0's results hold them all.
    """
    from rich.progress import Progress
    sampler = sampler or HFSampler(model, tokenizer, engine="dynamic", batch_size=batch_size, device=device,
                                   eos_ids=eos_ids)
    metrics, records = {}, {}
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        for name, rows in benches.items():
            mine = list(range(rank, len(rows), world))
            # as many generate calls on every rank
            padded = mine + [0] * (math.ceil(len(rows) / world) - len(mine))
            prompts = [chat_ids(tokenizer, fill(template, question=rows[i][0]), thinking) for i in padded]
            with contextlib.nullcontext(progress) if progress else Progress(
                    console=console, transient=True) as bar:
                task = bar.add_task(f"eval {name}", total=len(prompts) * n)
                got = sampler.generate(
                    prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k,
                    seeds=[request_seed(seed, f"eval:{name}", i) for i in padded],
                    on_batch=lambda k: advance(bar, task, k))
                bar.remove_task(task)
            lengths, truncated, texts = got.mask.sum(1).tolist(), got.truncated.tolist(), got.texts
            recs = []
            for k, i in enumerate(mine):
                q, gold = rows[i]
                samples = [{"completion": texts[j], "tokens": lengths[j], "truncated": truncated[j]}
                           for j in range(k * n, (k + 1) * n)]
                grade(samples, q, gold, checker_of(grader), thinking)
                recs.append({"bench": name, "index": i, "question": q, "gold": gold, "samples": samples})
            if world > 1:
                recs = sorted((r for part in gather(recs) for r in part), key=lambda r: r["index"])
            metrics[name], records[name] = records_metrics(recs), recs
    return metrics, records


def records_metrics(recs: list[dict]) -> dict:
    """bench_metrics from the records written to samples.jsonl: what is reported is what can be audited."""
    flat = [s for r in recs for s in r["samples"]]
    out = bench_metrics([[s["correct"] for s in r["samples"]] for r in recs], [s["tokens"] for s in flat],
                        [s["truncated"] for s in flat], marker_counts([s["completion"] for s in flat]))
    if flat and "reasoning_closed" in flat[0]:  # thinking on: cut inside the reasoning block (counted wrong)
        out["unclosed_reasoning"] = sum(not s["reasoning_closed"] for s in flat) / len(flat)
    if flat and "check" in flat[0]:  # toy world: caught errors, false reflections, ...
        world = summarize([Check(**s["check"]) for s in flat], sum(s["tokens"] for s in flat))
        out |= {k: v for k,
                v in world.items() if k not in ("accuracy", "samples", "markers_per_1k", "completion_len")}
    return out


EVAL_MARKER = "popsd_eval.json"  # in every folder eval.py writes: a later --out there is an evaluation's


def check_eval_out(out: Path, reads: list[Path]):
    """eval.py writes only into a new or empty folder or one of its own evaluations (its marker, or, from
    before the marker, a summary.json with settings or a server route's partial.jsonl), checked before any
    work: never over a file, into a training run, the model's or the adapter's folder, or someone's folder
    (`.`)."""
    check_out_dir(out, reads, key="--out", who="evaluation")
    if not out.exists():
        return
    if not out.is_dir():
        raise PopsdError(f"--out {out} is a file: eval.py writes a folder (summary.json, samples.jsonl); "
                         "choose another --out")
    if (out / MARKER).exists() or (out / "adapter_config.json").exists() or (out / "config.json").exists():
        raise PopsdError(f"--out {out} is a training run, a model or an adapter: write the evaluation "
                         "elsewhere (by default it goes to runs/eval/<what is evaluated>)")
    if (out / EVAL_MARKER).is_file() or (out / "partial_settings.json").is_file() or not any(out.iterdir()):
        return
    try:
        legacy = "settings" in json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        legacy = False
    if not legacy:
        raise PopsdError(f"--out {out} is not empty and holds no evaluation of eval.py's (no {EVAL_MARKER}): "
                         "eval.py writes only into a new or empty folder or one of its own; "
                         "choose another --out")


def write_results(out: Path, metrics: dict, records: dict, settings: dict):
    """out/: summary.json, samples.jsonl and the evaluation's marker, written into out.tmp and renamed (as a
    checkpoint is): an interruption or a full disk leaves the folder whole or as it was, never half-written;
    a full disk is one clear error. Files of someone else's in out stay (eval.py --out checked the folder)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(out, tmp) if out.is_dir() else tmp.mkdir(parents=True)
        (tmp / EVAL_MARKER).write_text(json.dumps({"popsd": "evaluation"}) + "\n")
        (tmp / "summary.json").write_text(json.dumps({"settings": settings, "results": metrics}, indent=2)
                                          + "\n")
        with (tmp / "samples.jsonl").open("w") as f:
            for recs in records.values():
                f.writelines(json.dumps(r) + "\n" for r in recs)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_full(e, out.parent, f"the evaluation's files ({out.name})") or e
    replace_folder(tmp, out)


def results_table(metrics: dict, title: str = "eval") -> Table:
    table = Table(title=title)
    first = next(iter(metrics.values()))
    hidden = {"questions", "samples", "p_wait_wrong",
              "p_wait_right"} | ({"pass@1"} if "avg@1" in first else set())
    cols = [k for k in first if k not in hidden]
    short = {"len_mean": "len", "len_median": "med len", "truncated": "trunc", "markers_per_1k": "markers/1k",
             "first_try_errors": "errors/sample", "caught_frac": "caught",
             "false_reflections": "false refl/sample"}
    heads = ["bench", "Q", *(short.get(c, c) for c in cols)]
    def cell(c, v):
        if c.startswith(("avg@", "pass@")) or c in ("truncated", "caught_frac"):
            return f"{100 * v:.1f}%"
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    body = [[name, str(m["questions"]), *(cell(c, m[c]) for c in cols)] for name, m in metrics.items()]
    wide = sum(max(len(h), *(len(r[i]) for r in body)) + 3 for i, h in enumerate(heads)) + 1
    # too wide for the terminal (or a pipe's 80 columns): one row per metric, no header cut
    if wide > console.width:
        table.add_column("metric", justify="left")
        for r in body:
            table.add_column(r[0], justify="right")
        for i, h in enumerate(heads[1:], 1):
            table.add_row(h, *(r[i] for r in body))
        return table
    for i, h in enumerate(heads):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in body:
        table.add_row(*r)
    return table


# ----------------------------------------------------------------------------- during training (popsd.py,
# eval_every)

def named_benches(pairs) -> dict:
    """{name: rows}, a name given twice (a/test.jsonl, b/test.jsonl) made unique with its folder, then a
    count."""
    benches = {}
    for spec, (name, rows) in pairs:
        if name in benches:
            name = f"{Path(spec).parent.name}_{name}" if Path(spec).parent.name else name
        base, k = name, 2
        while name in benches:
            name, k = f"{base}_{k}", k + 1
        benches[name] = rows
    return benches


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def adapter_sha(folder) -> str | None:
    """A checksum of an adapter's weights: saved results name the very adapter that produced them."""
    weights = Path(folder or "") / "adapter_model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if folder and weights.exists() else None


def held_out_benches(cfg, train_rows) -> dict:
    """Held-out benchmarks for eval_every; questions also in the training data are dropped and counted."""
    seen, benches = {q.strip() for q, _ in train_rows}, {}
    q_field, a_field = (f.strip() for f in cfg.eval_fields.split(","))
    specs = list(filter(None, (s.strip() for s in cfg.eval_bench.split(","))))
    advice = "Name the fields with eval_fields=question,answer in the config, or fix the row."
    loaded = named_benches((spec, load_bench(spec, q_field, a_field, advice=advice)) for spec in specs)
    for spec, (name, rows) in zip(specs, loaded.items()):
        held_out = [r for r in rows if r[0].strip() not in seen]
        if len(held_out) < len(rows):
            console.print(f"[yellow]eval {name}: {len(rows) - len(held_out)} questions are in the training "
                          "data and are left out[/]")
        if not held_out:
            raise PopsdError(f"eval benchmark {spec!r}: every question is in the training data")
        benches[name] = held_out[:cfg.eval_limit] if cfg.eval_limit else held_out
    return benches


def in_training(step: int, sampler, tokenizer, benches: dict, cfg, out: Path, bar, rank: int = 0,
                world: int = 1, base_sha: str | None = None):
    """Evaluate the student (adapters on) with the run's sampler (HF generate or its engine); results in
    out/eval/step_N/ (with the step and the base's checksum), metrics as eval/<bench>/<name>."""
    metrics, records = evaluate(
        None, tokenizer, benches, n=cfg.eval_n, max_new_tokens=cfg.eval_max_new_tokens,
        temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, top_k=0, eos_ids=sampler.eos_ids,
        batch_size=0, device=getattr(sampler, "device", "cpu"), template=cfg.student_template,
        thinking=cfg.student_thinking, seed=cfg.seed, progress=bar, rank=rank, world=world,
        grader=cfg.eval_grader, sampler=sampler)
    if rank == 0:
        write_results(out / "eval" / f"step_{step:06d}", metrics, records,
                      {"step": step, "model_sha256": base_sha})
    console.print(results_table(metrics, f"eval at step {step}"))
    return {f"eval/{b}/{k}": v for b, m in metrics.items() for k, v in m.items()}


# ----------------------------------------------------------------------------- CLI

ENGINES = ("dynamic", "static", "graph")  # HF generate's caches, engines/graph.py (vLLM: --server)


def eval_sampler(engine: str, model, tokenizer, rows: int, device, eos: list[int], keep_rows: bool):
    """The sampler for --engine: HF generate (dynamic | static) or the graph sampler, on the evaluated
    model."""
    if engine == "graph":
        return GraphSampler(model, tokenizer, batch_size=rows, device=device, eos_ids=eos,
                            keep_rows=keep_rows)
    return HFSampler(model, tokenizer, engine=engine, batch_size=rows, device=device, eos_ids=eos)


def thinking_mode(flag: str | None, run: dict) -> bool:
    """--thinking on|off, else the training run's student_thinking, else on (the paper's models think), said
    aloud."""
    if flag is not None:
        return flag == "on"
    if "student_thinking" in run:
        return run["student_thinking"]
    console.print("[yellow]thinking mode: on (no --thinking and no training run's config.json to read it "
                  "from; pass --thinking off for a model that does not think)[/]")
    return True


def evaluate_server(args, tokenizer, benches: dict, template: str, thinking: bool, out: Path, settings: dict):
    """The --server route: the same prompts, grader, metrics and files as `evaluate`, generated by the
    server."""
    from rich.progress import Progress
    from plumbing import remote
    server = Server(args.server, args.served_model, probe_timeout=args.server_timeout)
    server.check_model()
    prompts = {name: [chat_ids(tokenizer, fill(template, question=q), thinking) for q, _ in rows]
               for name, rows in benches.items()}
    params = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k")}
    with Progress(console=console, transient=True) as bar:
        records = remote.evaluate_remote(
            server, tokenizer, benches, prompts, n=args.n, seed=args.seed, params=params, out=out,
                                         settings=settings,
            grade=lambda samples, q, gold: grade(samples, q, gold, checker_of(args.grader), thinking),
            concurrency=args.concurrency, progress=bar)
    left = list(VLLM_FIELDS) if server.openai_only else []  # what the server sampled with is then its own
    return {name: records_metrics(recs) for name, recs in records.items()}, records, left


def default_out(args, benches: dict) -> Path:
    """runs/eval/<adapter or model>_<benchmarks>: two plain calls on different things do not share a
    folder."""
    what = Path(args.adapter or args.model or "model")
    name = "_".join(what.parts[-2:] if args.adapter else what.parts[-1:]) + "_" + "+".join(benches)
    return Path("runs/eval") / re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.")[:120]


def checkpoint_folders(adapter: str | None) -> list[Path]:
    """The step_N checkpoints in step order when --adapter is a folder of them (a run's checkpoints/), else
    []."""
    if not adapter or (Path(adapter) / "adapter_config.json").exists() or not Path(adapter).is_dir():
        return []
    good, other = [], []
    for p in Path(adapter).iterdir():
        ok = re.fullmatch(r"step_\d+", p.name) and p.is_dir() and (p / "adapter_config.json").exists() and \
            (p / "adapter_model.safetensors").exists()
        (good if ok else other).append(p)
    if good and other:
        console.print(f"[yellow]warning: left out of the sweep, not complete step_N checkpoints: "
                      f"{', '.join(sorted(repr(p.name) for p in other))}[/]", soft_wrap=True)
    return sorted(good, key=lambda p: int(p.name[5:]))  # step order, not text order


NOT_SETTINGS = ("seconds", "generation_batch", "out", "left_to_the_server", "max_new_tokens_run",
                "concurrency", "sources", "other_base",
                # recorded, not compared: how long, how it ran (what a server did not take, the
                "server_timeout", "threads")
# budget cut to the model's positions, how many requests at once, how long one may stay silent), where


def saved_results(out: Path, settings: dict) -> dict | None:
    """The results in out/summary.json when they were written with these settings (the same questions and
    adapter, checksums included): an evaluation done is read back, not redone. Other settings: an error."""
    done = out / "summary.json"
    if not done.exists():
        return None
    try:
        saved = json.loads(done.read_text())
        same = {k: v for k, v in saved["settings"].items() if k not in NOT_SETTINGS} == \
            {k: v for k, v in settings.items() if k not in NOT_SETTINGS}
    except (ValueError, KeyError, TypeError, AttributeError):
        same = False
    if not same:
        raise PopsdError(f"{done} holds an evaluation with other settings (or other questions, or another "
                         "adapter): use another --out for this one")
    console.print(f"{out}: already evaluated with these settings, read from {done}")
    return saved["results"]


def sweep(model, tokenizer, folders: list[Path], benches: dict, out: Path, settings: dict, **kwargs):
    """Evaluates every checkpoint in step order into out/step_N/; a checkpoint already evaluated with the same
    settings is read back instead (an interrupted sweep resumes). Writes sweep.json, sweep.png, the best
    step."""
    import plots
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_MARKER).write_text(json.dumps({"popsd": "evaluation sweep"}) + "\n")
    results = {}
    for path in folders:
        step = int(path.name.split("_")[-1])
        mine = settings | {"adapter": str(path), "adapter_sha": adapter_sha(path)}
        saved = saved_results(out / path.name, mine)
        if saved is not None:
            results[step] = saved
            continue
        swap_adapter(model, path)
        t0 = time.time()
        metrics, records = evaluate(model, tokenizer, benches, **kwargs)
        write_results(out / path.name, metrics, records, mine | {"seconds": round(time.time() - t0, 1)})
        console.print(results_table(metrics, f"{path}"))
        results[step] = metrics
    key = next(k for k in next(iter(results.values()))[next(iter(benches))] if k.startswith("avg@"))
    mean = {s: statistics.fmean(m[b][key] for b in m) for s, m in results.items()}
    best = max(mean, key=lambda s: (mean[s], -s))  # ties: the earlier step
    summary = {"metric": key, "steps": {str(s): m for s, m in results.items()},
               "mean": {str(s): v for s, v in mean.items()},
               "best_step": best, "best_mean": mean[best]}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots.plot_sweep(summary, out / "sweep.png")
    table = Table(title=f"{key} by checkpoint (best: step {best})")
    for col in ["step", *benches, "mean"]:
        table.add_column(col, justify="right")
    for s, m in results.items():
        style = "bold green" if s == best else None
        table.add_row(str(s), *(f"{100 * m[b][key]:.1f}%" for b in benches), f"{100 * mean[s]:.1f}%",
                      style=style)
    console.print(table)
    console.print(f"best step {best} ({key} {100 * mean[best]:.1f}% averaged over {len(benches)} "
                  f"benchmark(s)); {out / 'sweep.json'} and {out / 'sweep.png'}")
    return summary


# each flag eval.py takes from the adapter's training run when left out: its config.json key (or the value
# the run's own evaluations used), and the default with no run
EVAL_DEFAULTS = {"bench": "aime24,aime25,hmmt25", "question_field": "problem", "answer_field": "answer",
                 "n": 12, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 32768, "limit": 0,
                 "dtype": "bf16", "seed": 0, "grader": "math"}
FROM_RUN = {"bench": "eval_bench", "n": "eval_n", "temperature": "eval_temperature", "top_p": "eval_top_p",
            "max_new_tokens": "eval_max_new_tokens", "limit": "eval_limit", "dtype": "dtype", "seed": "seed",
            "grader": "eval_grader"}


def fill_from_run(args) -> dict:
    """Every flag the user left out, from the adapter's training run (its config.json: what its own
    evaluations ran with; top-k 0, as they sample) when there is one, else from EVAL_DEFAULTS. Returns
    {flag: where its value came from}, which the screen and the record show."""
    folders = checkpoint_folders(args.adapter)
    run = run_config(folders[0] if folders else args.adapter)
    sources = {}
    for key, default in EVAL_DEFAULTS.items():
        if getattr(args, key) is not None:
            sources[key] = "flag"
            continue
        value = None
        if run:
            if key in ("question_field", "answer_field") and "eval_fields" in run:
                value = run["eval_fields"].split(",")[0 if key == "question_field" else 1].strip()
            elif key == "top_k":
                value = 0  # in-training evaluations sample with top-k off
            elif FROM_RUN.get(key) in run:
                value = run[FROM_RUN[key]]
        setattr(args, key, default if value is None else value)
        sources[key] = "default" if value is None else "the run's config.json"
    return sources


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF id or local dir (default: the adapter's base model)")
    p.add_argument("--adapter",
                   help="PEFT adapter folder (a run's adapter/ or checkpoints/step_N/), or a run's\n"
                                     "checkpoints/ folder: every checkpoint in step order, resumable")
    p.add_argument("--bench", help=f"comma-separated: {', '.join(BENCHMARKS)} or local .jsonl/.json/.parquet "
                   "files\n(each of these flags, left out, comes from the adapter's training run when it has "
                   "one,\nas its own evaluations ran; else from the defaults: " + ", ".join(
                       f"{k.replace('_', '-')} {v}" for k, v in EVAL_DEFAULTS.items()) + ")")
    p.add_argument("--question-field", help="question field of local benchmark files")
    p.add_argument("--answer-field", help="gold answer field of local benchmark files")
    p.add_argument("--n", type=int, help="samples per question (avg@n, pass@1, pass@n)")
    p.add_argument("--temperature", type=float, help="0: greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, help="0: off")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="first K questions per benchmark (0: all)")
    p.add_argument("--template",
                   help="the prompt, with {question} (default: the adapter's saved prompt settings,\n"
                                      "the run's, or the model folder's popsd_prompts.json; else popsd's "
                                      "own)")
    p.add_argument("--thinking", choices=("on", "off"),
                   help="chat-template thinking mode (default: the training run's; with no run: "
                        "on, said aloud)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="sequences per generate call (0: as many as the KV cache of prompt + max-new-tokens\n"
                        "allows in --memory-gb)")
    p.add_argument("--memory-gb", type=float, default=0,
                   help="memory generation may use (0: 90%% of the GPU's free memory; 8 on a CPU)")
    p.add_argument("--engine", choices=ENGINES,
                   help="the sampler: HF generate's dynamic or static KV cache, or\n"
                   "engines/graph.py (default: the training run's rollout_engine, else dynamic)")
    p.add_argument("--graph-keep-rows", choices=("on", "off"),
                   help="--engine graph: step every row to the end (on), or halve the batch as rows finish "
                        "(off)\n(default: the training run's graph_keep_rows, else on)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (0: torch's default; default: the training run's)")
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--load-in-4bit", action="store_true", help="nf4 weights (bitsandbytes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--grader", choices=("math", *worlds.NAMES),
                   help="math: math-verify on the last \\boxed{}; a world's name (worlds/): its exact "
                        "checker")
    p.add_argument("--other-base", action="store_true",
                   help="evaluate the adapter on a base other than the one it was trained from (its\n"
                        "popsd_base.json); refused without this flag, and the record says it was given")
    p.add_argument("--out", help="folder for summary.json and samples.jsonl (default: runs/eval/<what is "
                                 "evaluated>);\none holding an evaluation with the same settings is read "
                                 "back, with others refused")
    p.add_argument("--server",
                   help="an OpenAI-compatible server (vLLM, SGLang, transformers serve) to generate\n"
                        "with, e.g. http://localhost:8000; popsd builds the prompts (plumbing/remote.py)")
    p.add_argument("--served-model", help="the model name the server serves (its /v1/models), with --server")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once, with --server")
    p.add_argument("--server-timeout", type=float, default=30.0,
                   help="seconds the server may leave a connection, /v1/models or /health unanswered (a "
                        "completion\nmay take longer: /health is probed meanwhile), with --server")
    args = p.parse_args(argv)
    args.sources = fill_from_run(args)
    if args.server and not args.served_model:
        p.error("--server needs --served-model (the name the server lists at /v1/models)")
    for key in ("n", "max_new_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)) or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 (0: greedy) and --top-p in (0, 1]")
    if args.threads is not None and not 0 <= args.threads <= (os.cpu_count() or 1):
        p.error(f"--threads must be between 0 (torch's default) and this machine's {os.cpu_count()} cores")
    if args.top_k < 0:
        p.error("--top-k must be >= 0 (0: off)")
    if not (args.server_timeout > 0 and math.isfinite(args.server_timeout)) or args.concurrency < 1:
        p.error("--server-timeout must be > 0 seconds and --concurrency at least 1")
    if args.batch_size < 0 or args.memory_gb < 0 or args.limit < 0:
        p.error("--batch-size, --memory-gb and --limit must be >= 0 (--limit 0: every question)")
    return args


def merge_main(argv: list[str]):
    """python eval.py merge --adapter runs/X/adapter --out runs/X/merged: one model folder for any engine."""
    p = argparse.ArgumentParser(prog="eval.py merge", description=merge_main.__doc__)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--trust-remote-code", action="store_true")
    args = p.parse_args(argv)
    try:
        console.print("merged model in "
                      f"{merge_adapter(args.adapter, args.out, args.dtype, args.trust_remote_code)}")
    except PopsdError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)


def show_settings(args, engine: str, keep_rows: bool, threads: int, sampling: dict):
    """The sampling settings the evaluation runs with, each with where it came from."""
    table = Table(title="sampling settings", box=None, show_header=False)
    rows = [(k, getattr(args, k), args.sources[k]) for k in ("bench", "limit", "n", "temperature", "top_p",
                                                              "top_k", "max_new_tokens", "dtype", "seed",
                                                              "grader")]
    run = "the run's config.json"
    rows += [("engine", engine, "flag" if args.engine else run if "rollout_engine" in sampling
              else "default"),
             ("graph_keep_rows", keep_rows, "flag" if args.graph_keep_rows else run
              if "graph_keep_rows" in sampling else "default"),
             ("threads", threads, "flag" if args.threads is not None else run if "threads" in sampling
              else "default")]
    for key, value, source in rows:
        table.add_row(key.replace("_", "-"), str(value), f"({source})")
    console.print(table)


def main(argv: list[str]):
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = parse_args(argv)
    out = Path(args.out or "runs/eval")
    try:
        folders = checkpoint_folders(args.adapter)
        first = str(folders[0]) if folders else args.adapter
        if args.adapter and folders == [] and not (Path(args.adapter) / "adapter_config.json").exists():
            raise PopsdError(f"--adapter {args.adapter}: no adapter_config.json there, nor step_* "
                             "checkpoints in it")
        model_path = args.model or base_model_of(first)
        if model_path is None:
            raise PopsdError("--model is required (or --adapter with an adapter_config.json naming "
                             "its base model)")
        run, sampling = run_settings(first, model_path), run_sampling(first)
        engine = args.engine or (sampling.get("rollout_engine") if sampling.get("rollout_engine") in ENGINES
                                 else
                                 "dynamic")
        keep_rows = sampling.get("graph_keep_rows", True) if args.graph_keep_rows is None else \
            args.graph_keep_rows == "on"
        threads = sampling.get("threads", 0) if args.threads is None else args.threads
        specs = [s.strip() for s in args.bench.split(",") if s.strip()]
        benches = named_benches((s, load_bench(s, args.question_field, args.answer_field, args.limit))
                                for s in specs)
        thinking = thinking_mode(args.thinking, run)
        template = args.template or run.get("student_template", STUDENT_TEMPLATE)
        if "{question}" not in template:
            raise PopsdError(f"--template {template!r} has no {{question}} field")
        out = Path(args.out or default_out(args, benches))
        check_eval_out(out, [Path(p) for p in (model_path, first, *specs) if p and Path(p).exists()])
        model_sha = base_fingerprint(model_path, console.print)
        base_check = check_adapter_base(first, model_path, model_sha, args.other_base,
                                        lambda m: console.print(f"[yellow]{m}[/]", soft_wrap=True))
        settings = vars(args) | {"model": model_path, "thinking": thinking,
                                 "questions_sha": fingerprint(benches), "engine": engine,
                                 "graph_keep_rows": keep_rows, "threads": threads,
                                 "adapter_sha": adapter_sha(first),  # and the base's: a base replaced in its
                                 # folder is another
                                 "model_sha256": model_sha, "base_check": base_check}
        show_settings(args, engine, keep_rows, threads, sampling)
        if not folders and (saved := saved_results(out, settings)) is not None:
            console.print(results_table(saved,
                                        f"{model_path}" + (f" + {args.adapter}" if args.adapter else "")))
            return
        t0 = time.time()
        if args.server:  # generation by the server; prompts, grading and files as below
            if folders:
                raise PopsdError("--server evaluates the one model the server serves: evaluate each "
                                 "checkpoint with its own --served-model, or sweep the folder "
                                 "without --server")
            tokenizer = load_tokenizer(model_path, first, args.trust_remote_code)
            metrics, records, left = evaluate_server(args, tokenizer, benches, template, thinking, out,
                                                     {k: v for k,
                                                      v in settings.items() if k != "concurrency"})
            if left:
                # not sent: the server's defaults (its generation_config)
                settings["left_to_the_server"] = left
        else:
            device = pick_device(args.device)
            if threads:
                torch.set_num_threads(threads)
            tokenizer, model = load_for_eval(model_path, first, args.dtype, args.load_in_4bit, device,
                                             args.trust_remote_code)
            longest = max(len(chat_ids(tokenizer, fill(template, question=q), thinking))
                          for rows in benches.values() for q, _ in rows)
            settings["max_new_tokens_run"] = args.max_new_tokens = fit_new_tokens(
                model, longest, args.max_new_tokens, "--max-new-tokens",
                lambda m: console.print(f"[yellow]{m}[/]", soft_wrap=True))
            budget = memory_budget(device, args.memory_gb)
            batch = args.batch_size or (sampling.get("gen_batch_size", 0) if engine == sampling.get(
                # the run's own batch: with graph_keep_rows=false it shapes the samples
                "rollout_engine") else 0)
            if not batch:
                batch, why = generation_batch(model, longest + args.max_new_tokens, budget)
                console.print(why)
            if engine == "graph":
                batch, why = graph_plan(model, batch, longest + args.max_new_tokens, budget, keep_rows)
                console.print(f"graph sampler: {why}")
            # what ran (--batch-size 0: the run's or the budget's choice)
            settings["generation_batch"] = batch
            eos = eos_ids(model, tokenizer)
            kwargs = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, eos_ids=eos, batch_size=batch, device=device,
                          template=template, thinking=thinking, seed=args.seed, grader=args.grader,
                          sampler=eval_sampler(engine, model, tokenizer, batch, device, eos, keep_rows))
            if folders:
                sweep(model, tokenizer, folders, benches, out, settings, **kwargs)
                return
            metrics, records = evaluate(model, tokenizer, benches, **kwargs)
    except PopsdError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        kept = (f"; finished questions are in {out / 'partial.jsonl'}, the same command resumes"
                if args.server else "")
        console.print(f"[yellow]interrupted{kept}[/]")
        sys.exit(130)
    write_results(out, metrics, records, settings | {"seconds": round(time.time() - t0, 1)})
    for leftover in ("partial.jsonl", "partial_settings.json"):  # the server route's progress, now complete
        (out / leftover).unlink(missing_ok=True)
    console.print(results_table(metrics, f"{model_path}" + (f" + {args.adapter}" if args.adapter else "")))
    console.print(f"summary.json and samples.jsonl in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
