"""Nothing lost when the rollout servers fail, one step ahead or not (tests/stand_in.py: a vLLM stand-in whose
completions depend on the adapter that answers, so a wrong adapter or a lost step shows in the metrics). A
server that comes back, or restarts, without the adapter a request names is given it or passed over; a failure
while the next step is sampled keeps this step's checkpoint; a stop aborts the rollouts in flight; every one
of these, resumed, is the straight run, policy_lag and all."""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import popsd
from conftest import ROOT, run_main
from engines.ahead import Ahead
from engines.client import Server, watched
from engines.server_pool import ServerPool
from stand_in import StandInServer

ARGS = ["--recipe", "toy", "eval_every=0", "threads=1", "method=opsd", "lr=1e-2", "sampler_gap_warn=1e6",
        "sampler_gap_stop=1e6"]  # the stand-in's log-probs are made up
KEYS = ("step", "policy_lag", "loss", "completion_len", "grad_norm")


def train(urls, out, *extra):
    return run_main(popsd.main, [*ARGS, f"rollout_server={','.join(urls)}", f"out_dir={out}", *extra])


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(a, b):
    """The same metrics, step for step (policy_lag included), and the same final adapter, bit for bit."""
    assert [{k: r[k] for k in KEYS} for r in rows(a)] == [{k: r[k] for k in KEYS} for r in rows(b)]
    x, y = (load_file(d / "adapter/adapter_model.safetensors") for d in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def when_logged(out, step, then):
    """A thread that runs then() once step `step`'s metrics row is in out/metrics.jsonl."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and any(r["step"] == step for r in rows(out)):
                return then()
            time.sleep(0.01)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The runs every fault is measured against: 5 steps, synchronous and one step ahead."""
    out = {}
    for ahead in (0, 1):
        with StandInServer() as server:
            run = tmp_path_factory.mktemp("straight") / f"ahead{ahead}"
            done = train([server.url], run, "steps=5", f"rollout_ahead={ahead}")
            assert done.returncode == 0, done.stdout[-3000:]
            out[ahead] = run
    assert [r["policy_lag"] for r in rows(out[1])] == [0, 1, 1, 1, 1]
    return out


def test_a_server_back_without_the_adapter_in_flight_is_passed_over_one_step_ahead(tmp_path, straight):
    """Server a is down when step 2's adapter is loaded and back for step 3's, while step 4's rollouts are
    still sampled (ahead) with step 2's adapter, which a never loaded: a's 404 sends them to b. (Before: the
    404 stopped the run.)"""
    with StandInServer(delay=0.3) as a, StandInServer(delay=0.3) as b:
        run = tmp_path / "run"
        when_logged(run, 1, a.down)
        when_logged(run, 2, a.up)
        done = train([a.url, b.url], run, "steps=5", "rollout_ahead=1", "rollout_concurrency=2")
    assert done.returncode == 0, done.stdout[-3000:]
    same_run(straight[1], run)


@pytest.mark.parametrize("ahead", [0, 1])
def test_a_server_that_restarts_and_loses_its_adapters_is_given_them_again(tmp_path, straight, ahead):
    with StandInServer(delay=0.2) as a, StandInServer(delay=0.2) as b:
        run = tmp_path / "run"
        when_logged(run, 2, a.forget)  # a restart while step 3 is sampled
        done = train([a.url, b.url], run, "steps=5", f"rollout_ahead={ahead}", "rollout_concurrency=2")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "did not hold the adapter" in done.stdout and "loaded it again" in done.stdout
    same_run(straight[ahead], run)


def test_a_failure_while_the_next_step_is_sampled_keeps_this_steps_checkpoint(tmp_path, straight):
    """Step 4's rollouts, sampled ahead during step 3, fail: the checkpoint of step 3 is saved all the same
    (with the adapter that samples step 4, since its rollouts are lost), then the error ends the run; resumed,
    it is the straight run. (Before: the error was raised before the checkpoint, and step 3 was lost.)"""
    run = tmp_path / "run"
    with StandInServer(fail_after=3 * 16) as server:  # steps 1-3 answered, step 4's not
        done = train([server.url], run, "steps=5", "rollout_ahead=1", "save_every=3")
    assert done.returncode == 2 and "stand-in failure" in done.stdout, done.stdout[-3000:]
    state = torch.load(run / "checkpoints/step_000003/state.pt", weights_only=True)
    assert state["sampling_step"] == 2 and "ahead" not in state
    assert (run / "checkpoints/step_000003/sampling_adapter/adapter_model.safetensors").is_file()
    with StandInServer() as server:
        done = train([server.url], run, "steps=5", "rollout_ahead=1", "save_every=3", "resume=true")
    assert done.returncode == 0, done.stdout[-3000:]
    same_run(straight[1], run)


def test_extending_a_finished_run_one_step_ahead_is_the_straight_run(tmp_path, straight):
    """The last step samples nothing ahead; its checkpoint keeps the adapter that would have, so steps=5 on a
    3-step run lags as the straight 5-step run did. (Before: the first new step was on-policy.)"""
    run = tmp_path / "run"
    with StandInServer() as server:
        assert train([server.url], run, "steps=3", "rollout_ahead=1").returncode == 0
        done = train([server.url], run, "steps=5", "rollout_ahead=1", "resume=true")
    assert done.returncode == 0, done.stdout[-3000:]
    same_run(straight[1], run)


def test_a_stop_one_step_ahead_aborts_the_rollouts_in_flight_and_resumes_as_the_straight_run(tmp_path,
                                                                                           straight):
    """SIGTERM while step 3's rollouts are sampled (each request takes 5 s): the run saves at once, without
    waiting for them (it keeps the adapter that samples them), and exits; resumed, the straight run. (Before:
    it waited for them, up to two steps of sampling.)"""
    run = tmp_path / "run"
    with StandInServer(delay=5.0) as server:
        command = [sys.executable, str(ROOT / "popsd.py"), *ARGS, f"rollout_server={server.url}",
                   f"out_dir={run}", "steps=5", "rollout_ahead=1"]
        proc = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 240
            while not ((run / "metrics.jsonl").exists() and len(rows(run)) >= 2):
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
                time.sleep(0.02)
            time.sleep(0.5)  # step 3's rollouts (sampled ahead since step 2 began) are in flight
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            output = proc.communicate(timeout=60)[0]
            took = time.time() - t0
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert took < 4.0, f"{took:.1f} s from SIGTERM to exit: it waited for the rollouts in flight"
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    state = torch.load(run / "checkpoints" / saved[-1] / "state.pt", weights_only=True)
    assert "ahead" not in state and state["sampling_step"] == state["step"] - 1
    with StandInServer() as server:
        done = train([server.url], run, "steps=5", "rollout_ahead=1", "resume=true")
    assert done.returncode == 0, done.stdout[-3000:]
    same_run(straight[1], run)


# ---- the pieces, alone

def test_every_rank_revives_the_servers_its_own_watchdog_dropped(tmp_path):
    """Each rank holds its own clients: rank 1's view of a server it dropped comes back at the next adapter,
    as rank 0's does. (Before: only rank 0 revived.)"""
    from transformers import AutoTokenizer
    from conftest import ROOT as root
    tok = AutoTokenizer.from_pretrained(root / "data/toyworld/base")
    with StandInServer() as server:
        pool = ServerPool(server.url, tok, [2], tmp_path, 2, "t", rank=1)
        pool.servers[0].abort("its watchdog dropped it")
        pool.publish(1, lambda folder: None)  # rank 1 writes and loads nothing; it learns what rank 0 did
        assert pool.servers[0].gone is None


def test_rollouts_sampled_ahead_name_the_adapter_held_when_they_were_started():
    """The adapter is pinned in the loop's thread: a sync that runs before the sampling thread gets going does
    not make that step on-policy."""
    class Sampler:
        name, step, local = "a", 1, threading.local()
        gate = threading.Event()

        def pin(self):
            return self.name, self.step

        def pinned(self, pin):
            import contextlib
            self.local.pin = pin
            return contextlib.nullcontext()

    def draw(sampler):
        sampler.gate.wait(5)
        return sampler.local.pin
    sampler, ahead = Sampler(), Ahead()
    ahead.start(3, draw, sampler)
    sampler.name, sampler.step = "b", 2  # the sync of the step being trained, before the thread samples
    sampler.gate.set()
    assert ahead.wait(3) == ("a", 1)


def test_the_watchdog_survives_the_server_list_emptied_under_it():
    errors = []
    threading.excepthook, hook = (lambda a: errors.append(a.exc_value)), threading.excepthook
    try:
        servers = [Server("http://127.0.0.1:9", probe_timeout=1.0)]
        with watched(servers):
            servers.clear()  # complete() drops the last server while the watchdog runs
            time.sleep(1.2)
    finally:
        threading.excepthook = hook
    assert errors == []


def test_a_folder_left_by_an_interrupted_replace_is_put_back(tmp_path):
    from plumbing.checkpoints import latest_checkpoint, recover_folders
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_000002.old").mkdir(parents=True)  # renamed aside; the new one never arrived
    (ckpts / "step_000002.old" / "state.pt").write_bytes(b"x")
    said = []
    recover_folders(ckpts, "step_??????", said.append)
    assert (ckpts / "step_000002/state.pt").exists() and not (ckpts / "step_000002.old").exists() and said
    (ckpts / "step_000002.old").mkdir()  # the new one arrived: the old one goes
    recover_folders(ckpts, "step_??????")
    assert not (ckpts / "step_000002.old").exists()
    with pytest.raises(Exception, match="damaged"):
        latest_checkpoint(tmp_path, lambda m: None)  # the put-back state.pt is junk here: skipped, then said
