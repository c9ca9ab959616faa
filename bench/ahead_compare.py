"""bench/ahead_compare.py: does one step ahead change what the toy student learns? The comparison
pre-registered in docs/engines.md: rollout_ahead=1 against rollout_ahead=0, OPSD and Purified, sketch
reference, seeds 0-2, the toy recipe as it ships through one vLLM CPU server; judged by compare.py's rule.

    python bench/ahead_compare.py                 # CPU (vLLM's CPU build): about 25 min on 2 cores

The server (the toy base) runs on core 0 and each run on core 1, one after the other; a run whose folder
holds a finished adapter is reused (delete runs/ahead_compare to redo them). Writes
docs/ahead_compare/summary.json (every run's step-60 evaluation, the paired differences and verdicts) and
summary.md, and prints the table.
"""
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import compare  # noqa: E402
from rollout_ahead import ENV, toy_server  # noqa: E402

RUNS, DOCS = ROOT / "runs/ahead_compare", ROOT / "docs/ahead_compare"
METHODS, SEEDS, KEYS = ("opsd", "purified"), (0, 1, 2), ("accuracy", "markers_per_1k")


def train(url: str, method: str, ahead: int, seed: int) -> Path:
    out = RUNS / f"{method}_ahead{ahead}_seed{seed}"
    if (out / "adapter/adapter_model.safetensors").is_file():
        print(f"{out.name}: finished already, reused")
        return out
    t0 = time.time()
    done = subprocess.run(["taskset", "-c", "1", sys.executable, "popsd.py", "--recipe", "toy",
                           f"rollout_server={url}", f"rollout_ahead={ahead}", f"method={method}",
                           "reference_field=sketch", f"seed={seed}", "threads=1", f"out_dir={out}",
                           "overwrite=true"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{out.name} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)
    return out


def main():
    RUNS.mkdir(parents=True, exist_ok=True)
    with toy_server() as (url, _):
        runs = {(m, a, s): train(url, m, a, s) for m in METHODS for s in SEEDS for a in (0, 1)}
    last = {k: compare.run_points(out)[-1] for k, out in runs.items()}
    assert all(p["step"] == 60 for p in last.values())
    # compare.paired's layout: the synchronous run is the "base" of each seed, one ahead the "method"
    results = {m: {"base": {str(s): [last[m, 0, s]] for s in SEEDS},
                   "ahead": {str(s): [last[m, 1, s]] for s in SEEDS}} for m in METHODS}
    verdicts = [{"method": m, "measure": k, **compare.paired(results, m, "ahead", k)} for m in METHODS
                for k in KEYS]
    lines = ["Written by `python bench/ahead_compare.py` (the toy recipe, sketch reference, through one vLLM "
             "CPU server; step 60, 400 held-out questions).", "",
             "| method | seed | accuracy sync | accuracy ahead | markers/1k sync | markers/1k ahead |",
             "|---|--:|--:|--:|--:|--:|"]
    for m in METHODS:
        for s in SEEDS:
            a, b = last[m, 0, s], last[m, 1, s]
            lines.append(f"| {m} | {s} | {a['accuracy']:.3f} | {b['accuracy']:.3f} | "
                         f"{a['markers_per_1k']:.1f} | {b['markers_per_1k']:.1f} |")
    lines += ["", "| method | measure | ahead − sync, mean | 2 standard errors | per seed | counts |",
              "|---|---|--:|--:|---|---|"]
    for v in verdicts:
        lines.append(f"| {v['method']} | {v['measure']} | {v['mean']:+.4f} | {2 * v['se']:.4f} | "
                     f"{', '.join(f'{d:+.3f}' for d in v['per_seed'])} | {'yes' if v['counts'] else 'no'} |")
    DOCS.mkdir(exist_ok=True)
    (DOCS / "summary.json").write_text(json.dumps(
        {"runs": {f"{m}_ahead{a}_seed{s}": p for (m, a, s), p in last.items()}, "verdicts": verdicts,
         "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
         "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    (DOCS / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
