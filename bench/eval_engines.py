"""bench/eval_engines.py: the README's evaluation command (400 held-out toy questions, one sample each, on a
toy run's adapter) timed with each sampler eval.py offers, side by side in one run of this script, on an idle
machine and with one other process busy on a core (what a 2-core machine running anything else is like).

    python bench/eval_engines.py                  # CPU: a 2-step toy run's adapter, best of --repeats each

  before   what eval.py did before it read the run's sampling settings: HF generate (dynamic KV cache),
          torch's
           default threads, the generation batch from the memory budget (256 here)
  dynamic  HF generate, one thread, the toy recipe's batch of 400
  graph    engines/graph.py eagerly (the toy recipe's rollout_engine=graph graph_keep_rows=false), one thread,
           400 rows: what eval.py now uses by default on a toy run's adapter
Each variant is `python eval.py ...` in its own process (start-up included: what a user waits for); the rows
are seconds of wall time and the ratio to `before`. Prints a table and one JSON line per variant (appended to
--out).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ["--bench", "data/toyworld/test.jsonl", "--question-field", "question",
          "--grader", "toyworld", "--n", "1", "--limit", "400", "--temperature", "1", "--top-p", "1",
          "--max-new-tokens", "128", "--dtype", "fp32"]
VARIANTS = {"before": ["--engine", "dynamic", "--threads", "0"],
            "dynamic": ["--engine", "dynamic", "--threads", "1", "--batch-size", "400"],
            "graph": ["--engine", "graph", "--graph-keep-rows", "off", "--threads", "1", "--batch-size",
                      "400"]}


def timed(adapter: Path, extra: list[str]) -> tuple[float, float]:
    """(seconds, accuracy) of one eval.py run in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        done = subprocess.run([sys.executable, "eval.py", "--adapter", str(adapter), *README, *extra, "--out",
                               tmp],
                              cwd=ROOT, capture_output=True, text=True,
                              env=os.environ | {"HF_HUB_OFFLINE": "1"})
        seconds = time.time() - t0
        if done.returncode:
            sys.exit(f"eval.py {' '.join(extra)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return seconds, json.loads((Path(tmp) / "summary.json").read_text())["results"]["test"]["avg@1"]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results/eval_engines.jsonl")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "toy"
        subprocess.run([sys.executable, "popsd.py", "--recipe", "toy", "steps=2", "eval_every=0",
                        f"out_dir={run}"],
                       cwd=ROOT, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        for load in ("idle", "one busy core"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
            try:
                for name, extra in VARIANTS.items():
                    got = [timed(run / "adapter", extra) for _ in range(args.repeats)]
                    rows.append({"bench": "eval_engines", "load": load, "variant": name,
                                 "seconds": round(min(t for t, _ in got), 2), "accuracy": got[0][1],
                                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                                            "cores",
                                 "date": time.strftime("%Y-%m-%d"), "args": extra})
            finally:
                if hog is not None:
                    hog.kill()
    print(f"{'load':<15}{'variant':<10}{'seconds':>9}{'× before':>10}{'accuracy':>10}")
    for r in rows:
        before = next(x["seconds"] for x in rows if x["load"] == r["load"] and x["variant"] == "before")
        r["speedup"] = round(before / r["seconds"], 2)
        print(f"{r['load']:<15}{r['variant']:<10}{r['seconds']:>9.1f}{r['speedup']:>10.2f}"
              f"{r['accuracy']:>10.3f}")
    with open(ROOT / args.out, "a") as f:
        for r in rows:
            print(json.dumps(r))
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
