"""bench/toy_loss_impl.py: which loss path the toy recipes run. The readable one (loss_impl=reference,
loss.reference_loss) if one toy step's loss, gradient norm and stats equal the fused path's within 1e-5
relative, and a whole toy run with it is no slower.

    python bench/toy_loss_impl.py                  # both checks (about 4 min on 2 cores)
    python bench/toy_loss_impl.py --repeats 0      # the one-step check only

1. One step: the toy recipe's first step (seed 0), sampled once, then popsd.update run from the same weights
   and a fresh optimizer with each path; every number of its metrics row is compared (relatively; the
   sampler's log-prob gap, rounding error in both, absolutely).
2. Whole runs: `python popsd.py --recipe <recipe> loss_impl=...`, the two paths alternated --repeats times,
   one at a time; the wall time of each and the mean time_step of its metrics.jsonl.
Prints a table and one JSON line, appended to bench/results/toy_loss_impl.jsonl.
"""
import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engines  # noqa: E402
import popsd  # noqa: E402
from plumbing.config import make_config  # noqa: E402
from plumbing.data import DataStream, read_rows  # noqa: E402
from plumbing.models import eos_ids, load_model, make_optimizer, model_parts  # noqa: E402
from plumbing.session import prepare_contexts  # noqa: E402

TIMING = ("time_sample", "time_step", "time_sync")
# |log p_engine − log p_student| per token: on a CPU in fp32 both are rounding error (~1e-7), so their
# relative difference means nothing; it is compared absolutely
GAP = "sampler_logprob_gap"


def one_step(recipe: str) -> dict:
    """{impl: the metrics row of popsd.update} for the recipe's first step, both from the same weights."""
    cfg = make_config(recipe, ["out_dir=unused"])
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok, model = load_model(cfg, torch.device("cpu"), str(ROOT / cfg.model))
    rows, _ = read_rows(str(ROOT / cfg.data), cfg.data_split, (cfg.question_field, cfg.reference_field))
    examples, _ = prepare_contexts(rows, tok, cfg)
    batch = [examples[i] for i in DataStream(len(examples), cfg.seed).take(cfg.batch_size)]
    sampler = engines.make_sampler(cfg, model, tok, str(ROOT / cfg.model), eos_ids(model, tok),
                                   torch.device("cpu"), ROOT / "runs/unused", 0, 1)
    rollout = popsd.sample(sampler, batch, cfg, step=1, rank=0, world=1)
    body, head_weight = model_parts(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for impl in ("fused", "reference"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        run = dataclasses.replace(cfg, loss_impl=impl)
        optimizer = make_optimizer(run, [p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        out[impl] = popsd.update(model, body, head_weight, rollout, run, tok.pad_token_id, optimizer,
                                 scheduler)
    return out


def machine() -> str:
    """The CPU's model name (Linux) and core count: timings compare only on the same machine."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def whole_runs(recipe: str, repeats: int) -> dict:
    """{impl: [(wall seconds, mean time_step)]}: full runs, the paths alternated, one at a time."""
    times = {"fused": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for impl in ("fused", "reference") if r % 2 == 0 else ("reference", "fused"):
                out = Path(tmp) / f"{impl}_{r}"
                t0 = time.time()
                subprocess.run([sys.executable, str(ROOT / "popsd.py"), "--recipe", recipe,
                                f"loss_impl={impl}", f"out_dir={out}"], cwd=ROOT, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.time() - t0
                steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                step_times = [s["time_step"] for s in steps if "time_step" in s]
                times[impl].append((wall, sum(step_times) / len(step_times)))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="toy")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = one_step(args.recipe)
    keys = sorted(k for k, v in rows["fused"].items() if k not in TIMING + (GAP,) and isinstance(v, float))
    worst = max(relative(rows["fused"][k], rows["reference"][k]) for k in keys)
    print(f"one step of --recipe {args.recipe}, both paths from the same weights and samples:")
    print(f"  {'metric':<22}{'fused':>14}{'reference':>14}{'relative':>11}")
    for k in keys:
        a, b = rows["fused"][k], rows["reference"][k]
        print(f"  {k:<22}{a:>14.6e}{b:>14.6e}{relative(a, b):>11.1e}")
    print(f"  largest relative difference {worst:.1e} ({'within' if worst <= 1e-5 else 'OVER'} 1e-5)")
    gap = abs(rows["fused"][GAP] - rows["reference"][GAP])
    verdict = "within" if gap <= 1e-6 else "OVER"
    print(f"  {GAP} (rounding error itself: compared absolutely): {rows['fused'][GAP]:.1e} and "
          f"{rows['reference'][GAP]:.1e} nats/token, apart by {gap:.1e} ({verdict} 1e-6)")
    result = {"recipe": args.recipe, "one_step_max_relative": worst, "one_step_keys": keys,
              "sampler_gap_abs_difference": gap, "machine": machine(),
              "date": time.strftime("%Y-%m-%d")}
    if args.repeats:
        times = whole_runs(args.recipe, args.repeats)
        print(f"\nwhole runs (python popsd.py --recipe {args.recipe} loss_impl=...), alternated:")
        print(f"  {'path':<11}{'wall s (each)':>30}{'mean s/step':>14}")
        for impl, got in times.items():
            walls = ", ".join(f"{w:.1f}" for w, _ in got)
            print(f"  {impl:<11}{walls:>30}{sum(s for _, s in got) / len(got):>14.3f}")
        wall = {k: sum(w for w, _ in v) / len(v) for k, v in times.items()}
        ratio = wall["reference"] / wall["fused"]
        print(f"  reference / fused wall time: {ratio:.3f}")
        result |= {"wall_s": {k: [w for w, _ in v] for k, v in times.items()},
                   "step_s": {k: [s for _, s in v] for k, v in times.items()},
                   "reference_over_fused": ratio}
    line = json.dumps(result)
    print(line)
    with open(ROOT / "bench/results/toy_loss_impl.jsonl", "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
