"""The scale paths: FSDP2 under torchrun (gloo on this CPU), CUDA (skipped without a GPU),
bench/gpu_memory.py."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def launch(args, ranks: int, timeout=400):
    """popsd.py (or a helper) as one plain process, or under torchrun with `ranks` processes."""
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                             if ranks > 1 else []), *map(str, args)]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return out.stdout


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_torchrun_tiny_recipe_end_to_end_then_resume_on_one_rank(tmp_path, tiny):
    stdout = launch([ROOT / "popsd.py", "--recipe", "tiny", "steps=4", "save_every=2", "eval_every=2",
                     "eval_limit=4",
                     # the EMA teacher: sharded like the adapter
                     "teacher=ema", f"out_dir={tmp_path}"], ranks=2)
    assert stdout.count("step    4/4") == 1 and stdout.count("eval at step 4") == 1  # rank 0 alone prints
    metrics = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]  # rank 0 alone writes
    assert all(r["tokens"] <= 8 * 32 and r["completion_len"] * 8 == pytest.approx(r["tokens"])
               for r in metrics[1:])
    assert [r["eval/toy_math_test/questions"] for r in metrics
            if "eval/toy_math_test/questions" in r] == [4, 4, 4]
    assert len(rows(tmp_path / "eval/step_000004/samples.jsonl")) == 4  # both ranks' questions, gathered
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).r == 8
    weights = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert weights.keys() == load_file(tmp_path / "checkpoints/step_000004/adapter_model.safetensors").keys()
    shapes = {n.replace(".default.", "."): p.shape for n, p in tiny[1].named_parameters() if p.requires_grad}
    assert {k: v.shape for k, v in weights.items()} == shapes  # one whole adapter, not shards
    teacher = torch.load(tmp_path / "checkpoints/step_000004/state.pt", weights_only=True)["ema"]
    assert {k.replace(".ema.", "."): v.shape for k, v in teacher.items()} == shapes  # whole, gathered
    assert not (tmp_path / "adapter/ema").exists() and "EMA teacher adapter" in stdout
    import popsd  # the 2-rank checkpoint, resumed by one process (this one)
    from plumbing.config import make_config
    popsd.train(make_config("tiny", ["steps=5", "eval_every=0", "resume=true", "teacher=ema",
                                           f"out_dir={tmp_path}"]))
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]


def adapter_at(out, step):
    return load_file(out / f"checkpoints/step_{step:06d}/adapter_model.safetensors")


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_two_ranks_give_the_update_of_one_and_checkpoints_cross_world_sizes(tmp_path, tiny_dir):
    import fsdp_update  # one rank: in this process; two: under torchrun
    helper = ROOT / "tests/fsdp_update.py"
    one, two = tmp_path / "one", tmp_path / "two"
    fsdp_update.main(str(tiny_dir), str(one), 2)
    launch([helper, tiny_dir, two, 2], ranks=2)
    r1, r2 = rows(one / "rows.jsonl"), rows(two / "rows.jsonl")
    for a, b in zip(r1, r2):  # the same global sums: loss, token count, gradient norm
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam's first step is lr·g/(|g|+ε): float32 rounding of a near-zero g moves a weight by a sliver of lr
    for step in (1, 2):
        assert_close(adapter_at(one, step), adapter_at(two, step), atol=0.02 * 1e-3)
        s1, s2 = (torch.load(d / f"checkpoints/step_{step:06d}/state.pt",
                             weights_only=False)["optimizer"]["state"]
                  for d in (one, two))
        assert s1.keys() == s2.keys()  # keyed by parameter name, whole tensors
        for k in s1:
            torch.testing.assert_close(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    # a step-1 checkpoint of either world size, resumed under the other, gives the same step 2
    for src, dst, ranks in ((one, tmp_path / "one_to_two", 2), (two, tmp_path / "two_to_one", 1)):
        shutil.copytree(src / "checkpoints/step_000001", dst / "checkpoints/step_000001")
        if ranks == 1:
            fsdp_update.main(str(tiny_dir), str(dst), 2, "resume=true")
        else:
            launch([helper, tiny_dir, dst, 2, "resume=true"], ranks=ranks)
        assert_close(adapter_at(dst, 2), adapter_at(one, 2), atol=0.02 * 1e-3)


def test_two_nodes_of_one_rank_each_train_the_adapter_one_node_of_two_ranks_trains(tmp_path, tiny_dir):
    """Multi-node for real: two torchrun launchers (--nnodes 2, one rank each, c10d rendezvous on loopback,
    as two machines would run them) against one launcher of two ranks: the same metrics and adapter."""
    from conftest import free_port
    args = [ROOT / "popsd.py", "--recipe", "tiny", f"model={tiny_dir}", "steps=3", "save_every=0",
            "eval_every=0"]
    launch([*args, f"out_dir={tmp_path / 'one_node'}"], ranks=2)
    port, nodes = free_port(), []
    for node in (0, 1):
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
             f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             "--rdzv_id=popsd-two-nodes", *map(str, args), f"out_dir={tmp_path / 'two_nodes'}"],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [n.communicate(timeout=400)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum(o.count("step    3/3") for o in outputs) == 1  # one rank 0 in all, which prints
    one, two = rows(tmp_path / "one_node/metrics.jsonl"), rows(tmp_path / "two_nodes/metrics.jsonl")
    keys = ("step", "loss", "grad_norm", "tokens", "markers_per_1k", "entropy")
    assert [{k: r[k] for k in keys} for r in two] == [{k: r[k] for k in keys} for r in one]
    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in (tmp_path / "one_node",
                                                                          tmp_path / "two_nodes"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides",
                         [["dtype=bf16"], ["dtype=bf16", "load_in_4bit=true", "optim=paged_adamw_8bit"]])
def test_tiny_recipe_on_cuda(tmp_path, overrides):
    launch([ROOT / "popsd.py", "--recipe", "tiny", "device=cuda", "steps=3", "eval_every=2", "eval_limit=4",
            "gradient_checkpointing=true", f"out_dir={tmp_path}", *overrides], ranks=1)
    metrics = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in metrics[1:])
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()


def test_gpu_memory_bench_runs_scaled_down_on_cpu():
    common = ["--cpu-test", "--lengths", "8,12", "--batch", "2", "--prompt-len", "8", "--reference-len", "16"]
    stdout = launch([ROOT / "bench/gpu_memory.py", "--models", "qwen3_1_7b", *common, "loss_impl=reference"],
                    ranks=1)
    synthetic = launch([ROOT / "bench/gpu_memory.py", "--models", "r1_distill_qwen_7b", *common,
                        "--synthetic"],
                       ranks=1)  # no sampling: random completions, the update phase alone
    got = [json.loads(line) for line in (stdout + synthetic).splitlines() if line.startswith("{")]
    assert [(r["model"], r["length"]) for r in got] == [("qwen3_1_7b", 8), ("qwen3_1_7b", 12),
                                                        ("r1_distill_qwen_7b", 8), ("r1_distill_qwen_7b", 12)]
    for r in got:
        # sampling forced to the length
        assert r["completion_tokens"] == 2 * r["length"] and r["sequences"] == 2
        made_up = r["model"] == "r1_distill_qwen_7b"
        assert r["settings"] | {"loss_impl": "fused"} == {  # the single_gpu recipe, with the override applied
            "load_in_4bit": True, "gradient_checkpointing": True, "loss_impl": "fused",
                                                          "optim": "paged_adamw_8bit",
            "micro_batch_size": 1, "gen_batch_size": 16, "lora_r": 64, "keep_cache": False, "prompt_len": 8,
            "reference_len": 16, "synthetic": made_up, "cap_gib": 0.0}
        assert (r["settings"]["loss_impl"] == "reference") != made_up
        assert list(r["phases"]) == ["sample", "score", "loss+backward", "step"]
        assert all((p["s"] > 0) != (made_up and name == "sample") and p["alloc_gib"] is None
                   for name, p in r["phases"].items())
    assert "peak reserved GiB" in stdout


def test_the_computed_memory_table_adds_up_its_terms_from_the_published_configs():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_gpu_memory", ROOT / "bench/gpu_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = json.loads((ROOT / "bench/configs/qwen3_8b.json").read_text())
    e = bench.estimate(config, 1024, 256, 1024)
    linear = 36 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 12288)  # Qwen3-8B's 6.95B linear weights
    assert e["weights"] == pytest.approx((linear * (0.5 + 1 / 64) + 2 * 151936 * 4096 * 2) / 2 ** 30)
    assert 5.5 < e["weights"] < 5.8  # the recipe's "about 5.5 GB of weights"
    assert e["update total"] == pytest.approx(e["weights"] + e["lora"] + e["checkpoints"] + e["loss"] +
                                              max(e["recompute"], e["frozen pass"]))
    longer = bench.estimate(config, 4096, 256, 1024)
    assert all(longer[k] > e[k] for k in ("checkpoints", "recompute", "loss", "frozen pass", "sample_kv"))
    assert longer["weights"] == e["weights"] and longer["lora"] == e["lora"]
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_memory.py"), "--estimate", "--models",
                          "qwen3_8b", "--lengths", "1024"], capture_output=True, text=True, timeout=120)
    row = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{")))
    assert out.returncode == 0 and row["computed"] and "computed, not measured" in out.stdout


def test_rollout_bench_checks_every_engine_then_times_it_on_cpu(tmp_path):
    out = tmp_path / "rollout.jsonl"
    stdout = launch([ROOT / "bench/rollout.py", "--cpu-test", "--max-new-tokens", "24", "--out", out],
                    ranks=1)
    got = rows(out)
    engines = ("dynamic", "static", "compile", "continuous", "graph", "graph-drop", "vllm")
    assert [(r["engine"], r["workload"]) for r in got] == [(e, w) for e in engines
                                                           for w in ("fixed", "longtail")]
    for r in got:
        if r["engine"] == "compile":
            assert r["skipped"] == "compile is measured on CUDA only"
            continue
        if r["engine"] == "vllm" and importlib.util.find_spec("vllm") is None and not os.environ.get("CI"):
            assert r["skipped"] == "vLLM is not installed"
            continue
        assert "skipped" not in r, r  # exact (greedy tokens and log-probs) and timed
        assert r["seconds"] > 0 and 0 < r["floor_fraction"] < 1 and r["bandwidth_gbs"] > 0
    fixed, longtail = got[0], got[1]
    assert fixed["tokens"] == 8 * 24 and longtail["tokens"] < fixed["tokens"] / 2  # most sequences stop early
    assert "% of floor" in stdout


def test_engine_check_lets_greedy_tokens_part_only_at_a_near_tie():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_rollout", ROOT / "bench/rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)  # [B, T, V]; EOS = 10
    logits[..., 10] = 30.0  # EOS would win, but it is banned: the near-tie test must ignore it
    ref = logits[..., :10].argmax(-1).tolist()
    def check(tokens, got_logits, tol=0.1):
        return bench.compare_greedy(tokens, got_logits, ref, logits, 10, tol)
    assert check(ref, logits) == "" and check(ref, None) == ""
    second = logits[0, 2, :10].topk(2).indices[1].item()
    parted = [ref[0][:2] + [second] + ref[0][3:], ref[1]]
    assert "row 0, step 2: no near-tie" in check(parted, None)  # a clear margin: a real difference
    tied = logits.clone()
    tied[0, 2, second] = tied[0, 2, ref[0][2]] - 0.05  # now within rounding of the top
    assert bench.compare_greedy(parted, None, ref, tied, 10, 0.1) == ""
    assert bench.compare_greedy(parted, tied + 0.01 * torch.randn(tied.shape, generator=g), ref, tied, 10,
                                0.1) == ""
    off = tied.clone()
    off[1, 1] += torch.linspace(0, 1, 11)  # log-probs 0.5 apart before any parting: not the same distribution
    assert "log-probs differ" in bench.compare_greedy(parted, off, ref, tied, 10, 0.1)


def test_forced_lengths_leave_the_raw_logits_raw():
    """HF's output_logits holds the tensor a processor gets: ForceLengths must not write into it (a trained
    model's EOS mass, overwritten there, once made an exact engine look 5.9 apart in log-prob)."""
    spec = importlib.util.spec_from_file_location("bench_rollout", ROOT / "bench/rollout.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    force = bench.ForceLengths([3, 5], prompt_width=4, eos=10)
    raw = torch.randn(2, 11)
    kept = raw.clone()
    scores = force(torch.zeros(2, 4 + 2, dtype=torch.long), raw)  # 2 tokens so far: row 0's next is its last
    assert torch.equal(raw, kept)
    assert scores[0].argmax() == 10 and scores[1, 10] == float("-inf")


def test_sampling_gathers_sharded_weights_once_with_the_same_tokens(tmp_path):
    out = tmp_path / "fsdp.jsonl"
    stdout = launch([ROOT / "bench/fsdp_generate.py", "--tokens", "16", "--repeats", "1", "--out", out],
                    ranks=2)
    got = rows(out)
    assert [r["gather_once"] for r in got] == [False, True] and all(r["same_tokens"] for r in got)
    assert all(r["ranks"] == 2 and r["seconds"] > 0 for r in got) and "speed-up" in stdout


def test_gpu_check_dry_run_finds_every_command_and_its_arguments(tmp_path):
    # this interpreter, not whatever python3 is on PATH (a venv's, say)
    env = ENV | {"PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split()[1] for line in out.stdout.splitlines()] == ["cuda-tests:", "loss-bf16:", "build:",
                                                                     "rollout-nf4:", "rollout-bf16:",
                                                                     "memory-update:", "gpu-memory:"]
    assert all(line.startswith("ok") for line in out.stdout.splitlines())
    script = (ROOT / "bench/gpu_check.sh").read_text()
    assert "fused-purified-compiled" in script  # the compiled loss is measured
    limits = re.findall(r'^  "[\w-]+\|(\d+)\|', script, flags=re.M)
    # the default check fits 5 minutes (gpu-memory: --long)
    assert len(limits) == 6 and sum(map(int, limits)) <= 300
    bad = subprocess.run([sys.executable, str(ROOT / "bench/rollout.py"), "--engines", "warp",
                          "--check-args"],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown engine" in bad.stderr  # what --dry-run would report as FAILED
    no_gpu = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    if not torch.cuda.is_available():
        assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr
