"""eval.py --server: a real `transformers serve` process on loopback serving the tiny model, never a mock."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import eval as E
from plumbing import grading as G
from conftest import ROOT, free_port, run_main, serving

pytestmark = pytest.mark.xdist_group("transformers_serve")  # one server per module, one worker (-n 2)
FIVE = ROOT / "tests/data/five_questions.jsonl"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    """(url, served model name) of `transformers serve` pinned to the tiny model; always stopped."""
    port = free_port()
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_dir), "--host",
           "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with serving(cmd, ENV, port, tmp_path_factory.mktemp("serve") / "server.log",
                 "transformers serve") as url:
        yield url, str(tiny_dir)


def eval_run(*args):
    """eval.py's main in this process: (exit code, output)."""
    done = run_main(E.main, args)
    return done.returncode, done.stdout


def eval_cli(*args):  # its own process, to be interrupted
    return subprocess.Popen([sys.executable, str(ROOT / "eval.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_server_route_grades_what_the_server_generated(server, tiny_dir, tmp_path):
    url, name = server
    proc = eval_run("--server", url, "--served-model", name, "--model", str(tiny_dir), "--bench", str(FIVE),
                    "--n", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--thinking", "off",
                    "--concurrency", "4", "--out", str(tmp_path))
    code, output = proc
    assert code == 0, output
    assert "warning" not in output  # the server's count of prompt tokens is popsd's: the same prompt
    recs = records(tmp_path / "samples.jsonl")
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4] and all(len(r["samples"]) == 3 for r in recs)
    flat = [s for r in recs for s in r["samples"]]
    for r in recs:  # every verdict is the grader's on the stored completion
        for s in r["samples"]:
            assert s["correct"] == G.is_correct(s["completion"], r["gold"]) and 1 <= s["tokens"] <= 8
            assert s["truncated"] == (s["tokens"] == 8)
    assert len({s["completion"] for s in flat}) > 3  # sampled, one seed per sample
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["results"]["five_questions"]["samples"] == 15 and summary["settings"]["server"] == url
    # transformers serve refuses vLLM's fields: what it sampled with is then its own, and the record says so
    assert summary["settings"]["left_to_the_server"] == ["top_k", "min_p", "repetition_penalty"]
    assert not (tmp_path / "partial.jsonl").exists()  # complete: the progress file is gone


def test_server_route_resumes_after_an_interruption(server, tiny_dir, tmp_path):
    url, name = server
    args = ["--server", url, "--served-model", name, "--model", str(tiny_dir), "--bench", str(FIVE), "--n",
            "8", "--max-new-tokens", "96", "--temperature", "1.0", "--thinking", "off", "--concurrency", "1",
            "--out", str(tmp_path)]
    proc = eval_cli(*args)
    partial = tmp_path / "partial.jsonl"
    deadline = time.time() + 120
    while not (partial.exists() and partial.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C after the first question
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the same command resumes" in output, output
    kept = records(partial)
    assert 1 <= len(kept) < 5
    code, output = eval_run(*args)
    assert code == 0 and f"resuming: {len(kept)} questions already done" in output, output
    final = records(tmp_path / "samples.jsonl")
    assert [r["index"] for r in final] == [0, 1, 2, 3, 4]
    for r in kept:  # nothing done before the interruption was redone or lost
        assert final[r["index"]] == r


def test_server_errors_are_clear(server, tiny_dir, tmp_path):
    url, name = server
    common = ["--model", str(tiny_dir), "--bench", str(FIVE), "--thinking", "off", "--out", str(tmp_path)]
    code, output = eval_run("--server", url, "--served-model", "no-such-model", *common)
    assert code == 2 and "does not serve 'no-such-model'" in output and name in output
    code, output = eval_run("--server", f"http://127.0.0.1:{free_port()}", "--served-model", name, *common)
    assert code == 2 and "could not reach the server" in output and "Traceback" not in output


def test_every_sample_of_a_server_evaluation_has_its_own_seed_the_engines_seed(tmp_path):
    """Seeds per sample were seed + 1000·question + sample: with n > 1000 two samples shared one. They are now
    eval.evaluate's (engines.request_seed per question, + sample), so a server samples what an engine
    would."""
    import threading
    from plumbing import remote
    from rich.progress import Progress
    from engines import request_seed

    class Recorder:  # stands where a Server would: the seeds evaluate_remote asks for, nothing else
        url, openai_only, prompt_mismatch, lock, seeds = "recorder", False, 0, threading.Lock(), []
        probe_timeout, open, gone = 30.0, set(), None  # what the watchdog reads: nothing in flight to probe

        def abort(self, why):
            pass

        def complete(self, ids, text, seed, params):
            with self.lock:
                self.seeds.append(seed)
            return {"text": "\\boxed{1}", "tokens": 3, "truncated": False}

    class Words:
        def decode(self, ids):
            return ""
    benches = {"b": [("q0", "1"), ("q1", "1")]}
    server = Recorder()
    with Progress(disable=True) as bar:
        remote.evaluate_remote(server, Words(), benches, {"b": [[1], [2]]}, n=1001, seed=0, params={},
                               out=tmp_path, settings={}, grade=lambda samples, q, gold: None, concurrency=4,
                               progress=bar)
    assert len(server.seeds) == len(set(server.seeds)) == 2002
    assert sorted(server.seeds) == sorted(request_seed(0, "eval:b", i) + j for i in range(2)
                                          for j in range(1001))
