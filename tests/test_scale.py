"""The scale paths: FSDP2 under torchrun (gloo on this CPU), CUDA (skipped without a GPU), bench/gpu_memory.py."""
import json
import os
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
    stdout = launch([ROOT / "popsd.py", "--recipe", "tiny", "steps=4", "save_every=2", "eval_every=2", "eval_limit=4",
                     f"out_dir={tmp_path}"], ranks=2)
    assert stdout.count("step    4/4") == 1 and stdout.count("eval at step 4") == 1  # rank 0 alone prints
    metrics = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]  # rank 0 alone writes
    assert all(r["tokens"] <= 8 * 32 and r["completion_len"] * 8 == pytest.approx(r["tokens"]) for r in metrics[1:])
    assert [r["eval/toy_math_test/questions"] for r in metrics if "eval/toy_math_test/questions" in r] == [4, 4, 4]
    assert len(rows(tmp_path / "eval/step_000004/samples.jsonl")) == 4  # both ranks' questions, gathered
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(str(tmp_path / "adapter")).r == 8
    weights = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert weights.keys() == load_file(tmp_path / "checkpoints/step_000004/adapter_model.safetensors").keys()
    shapes = {n.replace(".default.", "."): p.shape for n, p in tiny[1].named_parameters() if p.requires_grad}
    assert {k: v.shape for k, v in weights.items()} == shapes  # one whole adapter, not shards
    launch([ROOT / "popsd.py", "--recipe", "tiny", "steps=5", "eval_every=0", "resume=true", f"out_dir={tmp_path}"],
           ranks=1)  # the 2-rank checkpoint, resumed by one process
    assert [r["step"] for r in rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]


def adapter_at(out, step):
    return load_file(out / f"checkpoints/step_{step:06d}/adapter_model.safetensors")


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_two_ranks_give_the_update_of_one_and_checkpoints_cross_world_sizes(tmp_path, tiny_dir):
    helper = ROOT / "tests/fsdp_update.py"
    one, two = tmp_path / "one", tmp_path / "two"
    launch([helper, tiny_dir, one, 2], ranks=1)
    launch([helper, tiny_dir, two, 2], ranks=2)
    r1, r2 = rows(one / "rows.jsonl"), rows(two / "rows.jsonl")
    for a, b in zip(r1, r2):  # the same global sums: loss, token count, gradient norm
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam's first step is lr·g/(|g|+ε): float32 rounding of a near-zero g moves a weight by a sliver of lr
    for step in (1, 2):
        assert_close(adapter_at(one, step), adapter_at(two, step), atol=0.02 * 1e-3)
        s1, s2 = (torch.load(d / f"checkpoints/step_{step:06d}/state.pt", weights_only=False)["optimizer"]["state"]
                  for d in (one, two))
        assert s1.keys() == s2.keys()  # keyed by parameter name, whole tensors
        for k in s1:
            torch.testing.assert_close(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"], rtol=1e-4, atol=1e-12)
    # a step-1 checkpoint of either world size, resumed under the other, gives the same step 2
    for src, dst, ranks in ((one, tmp_path / "one_to_two", 2), (two, tmp_path / "two_to_one", 1)):
        shutil.copytree(src / "checkpoints/step_000001", dst / "checkpoints/step_000001")
        launch([helper, tiny_dir, dst, 2, "resume=true"], ranks=ranks)
        assert_close(adapter_at(dst, 2), adapter_at(one, 2), atol=0.02 * 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [["dtype=bf16"], ["dtype=bf16", "load_in_4bit=true", "optim=paged_adamw_8bit"]])
def test_tiny_recipe_on_cuda(tmp_path, overrides):
    launch([ROOT / "popsd.py", "--recipe", "tiny", "device=cuda", "steps=3", "eval_every=2", "eval_limit=4",
            "gradient_checkpointing=true", f"out_dir={tmp_path}", *overrides], ranks=1)
    metrics = rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]
    assert all(r["loss"] > 0 and r["grad_norm"] > 0 for r in metrics[1:])
    assert (tmp_path / "adapter/adapter_model.safetensors").exists()


def test_gpu_memory_bench_runs_scaled_down_on_cpu():
    stdout = launch([ROOT / "bench/gpu_memory.py", "--cpu-test", "--models", "qwen3_1_7b,r1_distill_qwen_7b",
                     "--lengths", "8,12", "--batch", "2", "--prompt-len", "8", "--reference-len", "16",
                     "loss_impl=reference"], ranks=1)
    got = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [(r["model"], r["length"]) for r in got] == [("qwen3_1_7b", 8), ("qwen3_1_7b", 12),
                                                        ("r1_distill_qwen_7b", 8), ("r1_distill_qwen_7b", 12)]
    for r in got:
        assert r["completion_tokens"] == 2 * r["length"] and r["sequences"] == 2  # sampling forced to the length
        assert r["settings"] | {"loss_impl": "fused"} == {  # the single_gpu recipe, with the override applied
            "load_in_4bit": True, "gradient_checkpointing": True, "loss_impl": "fused", "optim": "paged_adamw_8bit",
            "micro_batch_size": 1, "gen_batch_size": 16, "lora_r": 64, "keep_cache": False, "prompt_len": 8,
            "reference_len": 16} and r["settings"]["loss_impl"] == "reference"
        assert list(r["phases"]) == ["sample", "score", "loss+backward", "step"]
        assert all(p["s"] > 0 and p["alloc_gib"] is None for p in r["phases"].values())
    assert "peak reserved GiB" in stdout
