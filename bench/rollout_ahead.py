"""bench/rollout_ahead.py: the toy recipe through a vLLM server, synchronous against one step ahead
(rollout_ahead=1), side by side in one run of this script: the server on one core, the trainer on the other.

    python bench/rollout_ahead.py                 # CPU (vLLM's CPU build): about 4 min on 2 cores

The server (the toy base, fp32, eager, bound to core 0 with taskset and VLLM_CPU_OMP_THREADS_BIND) stays up
for every run; each run is `python popsd.py --recipe toy rollout_server=URL eval_every=0 threads=1 steps=N`
bound to core 1, the two modes alternating, --repeats each. Per run the medians over steps 2..N (step 1
samples synchronously in both modes): seconds per step, and of it, sampling (synchronous: S, the servers
working; one ahead: the wait for rollouts sampled meanwhile) and the rest (T: scoring, update, adapter push).
The ideal speed-up is (S + T) / max(S, T) from the synchronous runs; `share of ideal` is how much of the
possible gain one step ahead gets, (speed-up − 1) / (ideal − 1). Prints a table and one JSON line (appended to
--out).
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(base), "--served-model-name", "toy", "--host", "127.0.0.1", "--port", str(port), "--dtype",
           "float32", "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20),
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", "1", "--logprobs-mode", "raw_logprobs",
           "--no-enable-chunked-prefill"]
    env = ENV | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    server = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"the vLLM server exited: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            return server
        except OSError:
            time.sleep(1)
    server.kill()
    sys.exit("the vLLM server did not come up in 300 s")


@contextlib.contextmanager
def toy_server():
    """A vLLM server of a copy of the toy base on core 0: yields its URL and a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "data/toyworld/base", tmp / "toy")
        port = free_port()
        server = start_server(tmp / "toy", port, tmp / "server.log")
        try:
            yield f"http://127.0.0.1:{port}", tmp
        finally:
            server.terminate()
            server.wait(timeout=60)


def run(url: str, ahead: int, steps: int, out: Path) -> dict:
    """One toy run on core 1; the medians of its steps 2..N."""
    done = subprocess.run(["taskset", "-c", "1", sys.executable, "popsd.py", "--recipe", "toy",
                           f"rollout_server={url}", "eval_every=0", "threads=1", f"steps={steps}",
                           f"rollout_ahead={ahead}", f"out_dir={out}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"the run with rollout_ahead={ahead} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    shutil.rmtree(out)
    med = {k: statistics.median(r[k] for r in rows) for k in ("time_step", "time_sample", "time_sync")}
    return med | {"rest": statistics.median(r["time_step"] - r["time_sample"] for r in rows),
                  "policy_lag": max(r["policy_lag"] for r in rows)}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results/rollout_ahead.jsonl")
    args = p.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        sys.exit("this bench puts the server and the trainer on a core each: it needs 2 cores")
    runs = {0: [], 1: []}
    with toy_server() as (url, tmp):
        for i in range(args.repeats):
            for ahead in (0, 1):
                got = run(url, ahead, args.steps, tmp / f"run_{ahead}_{i}")
                runs[ahead].append(got)
                print(f"rollout_ahead={ahead} run {i + 1}: {got['time_step']:.3f} s/step", flush=True)
    best = {a: min(r, key=lambda x: x["time_step"]) for a, r in runs.items()}
    sample, rest = best[0]["time_sample"], best[0]["rest"]
    ideal = (sample + rest) / max(sample, rest)
    speedup = best[0]["time_step"] / best[1]["time_step"]
    print(f"\n{'mode':<22}{'s/step':>8}{'sampling':>10}{'rest':>8}{'sync':>8}{'lag':>5}")
    for a, name in ((0, "synchronous"), (1, "one step ahead")):
        b = best[a]
        print(f"{name:<22}{b['time_step']:>8.3f}{b['time_sample']:>10.3f}{b['rest']:>8.3f}"
              f"{b['time_sync']:>8.3f}{b['policy_lag']:>5}")
    print(f"speed-up {speedup:.2f}×, ideal (S + T) / max(S, T) = {ideal:.2f}×, share of ideal "
          f"{(speedup - 1) / (ideal - 1):.0%}")
    row = {"bench": "rollout_ahead", "steps": args.steps, "repeats": args.repeats,
           "synchronous": best[0], "ahead": best[1], "speedup": round(speedup, 3), "ideal": round(ideal, 3),
           "share_of_ideal": round((speedup - 1) / (ideal - 1), 3), "all_runs": runs,
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row))
    with open(ROOT / args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
