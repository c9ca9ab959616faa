"""popsd.py: config, data errors, the loop, checkpoints and resume, signals, the CLI end to end."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from plumbing import config
from plumbing import data
import eval as E
from plumbing import models
import popsd
from plumbing.config import make_config
from plumbing import session
from plumbing.checkpoints import latest_checkpoint
from conftest import ROOT, run_main
from plumbing.data import PopsdError


def run_tiny(out, *overrides):
    quiet = [] if any(o.startswith("eval_every=") for o in overrides) else ["eval_every=0"]  # a key once
    return popsd.train(make_config("tiny", [f"out_dir={out}", *quiet, *overrides]))


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


# ---- config

def test_overrides_are_typed_and_unknown_keys_named():
    cfg = make_config("tiny", ["steps=3", "lr=1e-4", "resume=true", "pmi_clip=none", "term_clamp=0.05"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.pmi_clip, cfg.term_clamp) == (3, 1e-4, True, None, 0.05)
    assert cfg.out_dir == "runs/tiny" and cfg.model == "tiny"
    with pytest.raises(PopsdError, match="unknown config key 'lrr' \\(did you mean 'lr'\\?\\)"):
        make_config("tiny", ["lrr=1"])
    with pytest.raises(PopsdError, match="config key 'steps' expects int, got 'three'"):
        make_config("tiny", ["steps=three"])
    with pytest.raises(PopsdError, match="config key 'resume' expects bool"):
        make_config("", ["resume=maybe"])
    with pytest.raises(PopsdError, match="'method' must be one of"):
        make_config("", ["method=grpo"])
    with pytest.raises(PopsdError, match="expected key=value"):
        make_config("", ["steps"])
    with pytest.raises(PopsdError, match="recipe 'nope' not found"):
        make_config("nope")


def test_renamed_keys_keep_working_with_a_note_naming_the_new_key(capsys):
    """jsd_beta, clip and token_clip were renamed (no two knobs share a name): the old names still work, for
    now."""
    cfg = make_config("tiny", ["jsd_beta=0.3", "clip=5", "token_clip=0.05"])
    assert (cfg.jsd_mix, cfg.pmi_clip, cfg.term_clamp) == (0.3, 5.0, 0.05)
    err = capsys.readouterr().err
    for old, new in (("jsd_beta", "jsd_mix"), ("clip", "pmi_clip"), ("token_clip", "term_clamp")):
        assert f"config key {old!r} is now {new!r}" in err
    with pytest.raises(PopsdError, match="given twice"):
        make_config("tiny", ["clip=5", "pmi_clip=6"])


@pytest.mark.parametrize("override, message", [
    ("jsd_mix=1.0", "'jsd_mix' must be in \\(0, 1\\) for divergence=jsd.*forward_kl.*reverse_kl"),
    ("jsd_mix=0", "'jsd_mix' must be in \\(0, 1\\)"),
    ("lr=0", "'lr' must be > 0"), ("lr=nan", "'lr' must be > 0"), ("lr=inf", "'lr' must be > 0"),
    ("temperature=0", "'temperature' must be > 0"), ("beta=0", "'beta' must be > 0"),
    ("max_grad_norm=0", "'max_grad_norm' must be > 0"), ("top_p=0", "'top_p' must be in \\(0, 1\\]"),
    ("eval_top_p=1.5", "'eval_top_p' must be in"), ("top_k=-1", "'top_k' must be >= 0"),
    ("pmi_clip=0", "'pmi_clip' must be > 0 \\(or none: off\\)"),
                                               ("term_clamp=-0.1", "'term_clamp' must be > 0"),
    ("loss_temperature=0", "'loss_temperature' must be > 0"), ("lora_dropout=1", "'lora_dropout' must be in"),
    ("lora_alpha=0", "'lora_alpha' must be > 0"), ("keep_checkpoints=0",
                                                   "'keep_checkpoints' must be at least 1"),
    ("warmup_steps=-1", "'warmup_steps' must be >= 0"), ("data= ", "'data' must not be empty"),
    ("prompts=trl", "'prompts' must be one of"), ("student_template=Solve it", "must contain {question}"),
    ("support=sampled", "'support' is the sampled-token estimator of reverse KL.*divergence=jsd"),
    ("support=top", "'support' must be one of"), ("topk=0", "'topk' must be at least 1"),
    # a loss identically 0: one renormalised token
    (["support=topk", "topk=1"], "'topk' must be at least 2 with support=topk and topk_tail=false"),
    (["eval_every=5", "eval_bench="], "'eval_bench' names no benchmark while eval_every=5"),  # was silent
])
def test_values_that_would_waste_a_run_are_errors(override, message):
    with pytest.raises(PopsdError, match=message):
        make_config("tiny", override if isinstance(override, list) else [override])


def test_prompt_presets_fill_the_templates(capsys):
    from rollout import PROMPTS
    cfg = make_config("", ["prompts=opsd_wording"])
    assert (cfg.student_template, cfg.teacher_template, cfg.refonly_template) == PROMPTS["opsd_wording"]
    assert "explore different approaches" in cfg.teacher_template and "{question}" not in cfg.refonly_template
    assert cfg.refonly_template in cfg.teacher_template  # the teacher's prompt with the problem removed
    mine = make_config("", ["prompts=opsd_wording", "student_template=Q: {question}"])
    assert mine.student_template == "Q: {question}" and mine.teacher_template == PROMPTS["opsd_wording"][1]
    assert make_config("").teacher_template == PROMPTS["popsd"][1]
    # the old name of the preset (it read like method=opsd) still works, with a note
    assert make_config("", ["prompts=opsd"]).prompts == "opsd_wording"
    assert "prompts=opsd is now prompts=opsd_wording" in capsys.readouterr().err
    from plumbing.config import current_names
    assert current_names({"prompts": "opsd", "jsd_beta": 0.5}) == {"prompts": "opsd_wording", "jsd_mix": 0.5}
    for name in ("single_gpu", "fsdp_8gpu", "paper_qwen3_8b", "paper_qwen3_4b"):  # the paper's models think
        cfg = make_config(name)
        assert cfg.student_thinking and cfg.teacher_thinking and cfg.prompts == "opsd_wording", name
        doc = (ROOT / "recipes" / f"{name}.py").read_text().split('"""')[1]
        assert "Thinking: on" in doc and "prompts=opsd_wording" in doc


def test_recipe_values_are_checked(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("stepz = 3\n")
    with pytest.raises(PopsdError, match="unknown config key 'stepz' \\(did you mean 'steps'\\?\\)"):
        make_config(str(bad))
    bad.write_text("steps = '3'\n")
    with pytest.raises(PopsdError, match="'steps' expects int"):
        make_config(str(bad))


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "recipes").glob("*.py")))
def test_every_recipe_loads_and_documents_itself(name):
    cfg = make_config(name)
    doc = (ROOT / "recipes" / f"{name}.py").read_text().split('"""')[1]
    command = "torchrun --nproc_per_node 8 popsd.py --recipe " if name == "fsdp_8gpu" else ("python popsd.py "
                                                                                            "--recipe ")
    assert "Hardware:" in doc and command + name in doc and "Expected" in doc
    if name == "single_gpu":
        assert cfg.load_in_4bit and cfg.model == "Qwen/Qwen3-8B" and (cfg.lora_r, cfg.lora_alpha) == (64, 128)
    if name == "fsdp_8gpu":  # the paper's hyper-parameters, 32 prompts split over 8 ranks
        assert (cfg.batch_size, cfg.n_samples, cfg.lr, cfg.max_new_tokens,
                cfg.lora_r) == (32, 1, 5e-6, 1024, 64)
        assert cfg.batch_size % 8 == 0 and not cfg.load_in_4bit


def test_derived_sizes():
    cfg = make_config("", ["batch_size=32", "n_samples=2", "micro_batch_size=5", "steps=100"])
    sizes = config.derived_sizes(cfg, 1600)
    assert (sizes["sequences per step"] == 64 and sizes["micro-batches per step"] == 13 and sizes["epochs"]
            == 2.0)


def test_lr_schedule():
    cfg = make_config("", ["warmup_steps=4", "steps=14", "lr_schedule=cosine"])
    f = [session.lr_factor(s, cfg) for s in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and f[9] == pytest.approx(0.5) and f[-1] > 0


# ---- data

def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "q1", "solution": "r1"},
                                              {"problem": "q2", "solution": " "}, "{not json",
                                              {"question": "q4", "solution": "r4"}])
    fields = ("problem", "solution")
    with pytest.raises(data.PopsdError, match="d.jsonl line 2: field 'solution' is missing or empty"):
        data.read_rows(path, "train", fields)
    rows, bad = data.read_rows(path, "train", fields, skip_bad=True)
    assert rows == [("q1", "r1")] and bad == 3
    with pytest.raises(data.PopsdError,
                       match="line 1: field 'question' is missing or empty \\(fields: problem, solution\\)"):
        data.read_rows(path, "train", ("question", "solution"))


def test_a_value_that_is_not_text_or_a_key_named_twice_is_an_error_naming_the_row(tmp_path):
    """JSON true would become the text "True", NaN "nan"; a key named twice silently kept the last."""
    (tmp_path / "d.jsonl").write_text('{"problem": "q1", "solution": true}\n')
    with pytest.raises(data.PopsdError, match="d.jsonl line 1: field 'solution' holds true, not text"):
        data.read_rows(str(tmp_path / "d.jsonl"), "train", ("problem", "solution"))
    (tmp_path / "d.jsonl").write_text('{"problem": "q1", "solution": "r", "solution": "s"}\n')
    with pytest.raises(data.PopsdError, match="d.jsonl line 1: the key 'solution' appears twice"):
        data.read_rows(str(tmp_path / "d.jsonl"), "train", ("problem", "solution"))
    (tmp_path / "d.json").write_text('[{"problem": "q1", "problem": "q2", "solution": "r"}]')
    with pytest.raises(data.PopsdError, match="appears twice"):
        data.read_rows(str(tmp_path / "d.json"), "train", ("problem", "solution"))
    (tmp_path / "d.jsonl").write_text('{"problem": "q1", "solution": 42}\n')  # a number is its own text
    assert data.read_rows(str(tmp_path / "d.jsonl"), "train", ("problem", "solution"))[0] == [("q1", "42")]


def test_json_and_parquet_files_load(tmp_path):
    import datasets
    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.json", "d.parquet"):
        assert data.read_rows(str(tmp_path / name), "train",
                              ("q", "a")) == ([(r["q"], r["a"]) for r in rows], 0)


def test_offline_hub_ids_give_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # offline, empty cache
    for args, want in ((["data=someone/not-cached-dataset"],
                        "could not load dataset 'someone/not-cached-dataset'"),
                       (["model=someone/not-cached-model"],
                        "could not load model 'someone/not-cached-model'")):
        proc = popsd_cli("--recipe", "tiny", f"out_dir={tmp_path}", *args, env=env)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and want in output and "Traceback" not in output, output
        assert "offline" in output and ("local .jsonl" in output or "local directory" in output)
    with pytest.raises(data.PopsdError, match="data file 'missing.jsonl' not found"):
        data.read_rows("missing.jsonl", "train", ("problem", "solution"))


def test_overlong_prompts_are_skipped_and_counted(tiny):
    tok, _ = tiny
    rows = [("What is 1 + 1?", "2"), ("What is 1 + 1? " * 80, "2")]
    cfg = make_config("tiny", ["max_prompt_len=300"])
    kept, too_long = session.prepare_contexts(rows, tok, cfg)
    assert len(kept) == 1 and too_long == 1
    assert max(len(kept[0].teacher), len(kept[0].student)) <= 300


def test_data_stream_resumes_mid_epoch():
    a = data.DataStream(10, seed=3)
    first = a.take(4) + a.take(4) + a.take(4)
    assert sorted(first[:10]) == list(range(10))  # one full permutation, then the next epoch
    b = data.DataStream(10, seed=3)
    b.take(4)
    c = data.DataStream(10, seed=3, epoch=b.epoch, cursor=b.cursor)
    assert c.take(8) == first[4:]


# ---- the loop

def test_run_folder_and_metrics(tmp_path):
    out = run_tiny(tmp_path, "steps=3", "save_every=2")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "completion_len", "truncated", "markers_per_1k", "entropy",
                "cos_total_ref", "cos_total_it", "norm_ratio", "time_step"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["loss"] > 0 and rows[0]["lr"] == pytest.approx(5e-4)  # warm-up: step 1 of 2
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    assert "===== step 3 sample 1" in (out / "samples.txt").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    umask = os.umask(0)
    os.umask(umask)
    for f in [*(out / "adapter").iterdir(), *(out / "checkpoints/step_000003").iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # safetensors' 0600 too: one mode for every file


def test_every_adapter_is_kept_and_only_old_resume_state_pruned(tmp_path):
    out = run_tiny(tmp_path, "steps=4", "save_every=1", "keep_checkpoints=2")
    steps = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in steps] == [f"step_00000{i}" for i in (1, 2, 3, 4)]
    assert all((p / "adapter_model.safetensors").exists() for p in steps)
    assert [(p / "state.pt").exists() for p in steps] == [False, False, True, True]
    assert latest_checkpoint(out).name == "step_000004"
    (steps[3] / "state.pt").unlink()  # a newest checkpoint without resume state is skipped by resume
    assert latest_checkpoint(out).name == "step_000003"
    from peft import PeftConfig
    assert PeftConfig.from_pretrained(str(out / "adapter")).r == 8  # PEFT format


def test_adapter_changes_only_lora_and_base_stays_frozen(tmp_path, tiny_dir):
    out = run_tiny(tmp_path, "steps=2")
    weights = adapter(out / "adapter")
    assert all("lora_" in k for k in weights) and any(v.abs().sum() > 0 for k,
                                                      v in weights.items() if "lora_B" in k)
    built = load_file(out / "tiny_model" / "model.safetensors")
    again = load_file(tiny_dir / "model.safetensors")  # the same seed builds the same base
    assert all(torch.equal(built[k], again[k]) for k in built)


@pytest.mark.parametrize("optim, extra", [("adamw", ()), ("paged_adamw_8bit", ()),
                                          ("adamw", ("support=topk", "topk=8")),
                                         ("adamw",
                                          ("method=opsd", "support=sampled", "divergence=reverse_kl")),
                                         ("adamw", ("rollout_engine=graph",))])
def test_resume_gives_the_same_adapter_as_a_straight_run(tmp_path, optim, extra):
    straight = run_tiny(tmp_path / "a", "steps=4", "save_every=2", f"optim={optim}", *extra)
    run_tiny(tmp_path / "b", "steps=2", "save_every=2", f"optim={optim}", *extra)
    resumed = run_tiny(tmp_path / "b", "steps=4", "save_every=2", "resume=true", f"optim={optim}", *extra)
    assert_same_adapter(adapter(straight / "adapter"), adapter(resumed / "adapter"))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_micro_batching_does_not_change_the_update(tmp_path):
    one = run_tiny(tmp_path / "a", "steps=1", "micro_batch_size=8")
    many = run_tiny(tmp_path / "b", "steps=1", "micro_batch_size=3")
    # Adam's first step is lr·g/(|g|+ε): float32 rounding of a near-zero g moves a weight by a sliver of lr
    assert_same_adapter(adapter(one / "adapter"), adapter(many / "adapter"), atol=0.02 * 5e-4)


def test_fused_and_reference_losses_give_the_same_update(tmp_path, capsys):
    fused = run_tiny(tmp_path / "a", "steps=2", "loss_impl=fused", "loss_chunk_mb=0")  # one token per chunk
    reference = run_tiny(tmp_path / "b", "steps=2", "loss_impl=reference")
    # so a run may change its loss path on resume (a checkpoint from before the toy recipes ran the
    # reference path resumes after)
    switched = run_tiny(tmp_path / "d", "steps=1", "loss_impl=fused")
    run_tiny(tmp_path / "d", "steps=2", "resume=true", "loss_impl=reference")
    assert "loss_impl changes 'fused' → 'reference'" in capsys.readouterr().out
    assert_same_adapter(adapter(switched / "adapter"), adapter(reference / "adapter"), atol=0.02 * 1e-3)
    # the CUDA default, on CPU
    compiled = run_tiny(tmp_path / "c", "steps=2", "loss_impl=fused", "loss_compile=on")
    assert_same_adapter(adapter(fused / "adapter"), adapter(reference / "adapter"), atol=0.02 * 1e-3)
    assert_same_adapter(adapter(compiled / "adapter"), adapter(reference / "adapter"), atol=0.02 * 1e-3)
    rows = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            for out in (fused, reference, compiled)]
    for a, b, c in zip(*rows):
        assert c["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert (a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["cos_total_it"]
                == pytest.approx(b["cos_total_it"], abs=1e-4))


@pytest.mark.parametrize("overrides", [["method=opsd", "divergence=forward_kl", "term_clamp=0.05"],
                                       ["method=opsd", "diagnostics=false"],
                                       ["teacher=live", "divergence=reverse_kl", "n_samples=2"],
                                       ["support=topk", "topk=8", "topk_tail=true"],
                                       ["method=opsd", "support=sampled", "divergence=reverse_kl"],
                                       ["rollout_engine=graph", "graph_keep_rows=false"]])
def test_variants_run(tmp_path, overrides):
    out = run_tiny(tmp_path, "steps=2", "batch_size=2", *overrides)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 2 and ("cos_total_ref" in row) == ("diagnostics=false" not in overrides)
    assert row["grad_norm"] > 0 and math.isfinite(row["loss"]) and "logprob" not in row
    if "rollout_engine=graph" in overrides:  # it reports log-probs: the sampler-trainer gap is logged
        assert row["sampler_logprob_gap"] < 1e-4


def test_topk_above_the_vocabulary_is_a_config_error(tmp_path):
    with pytest.raises(PopsdError, match="'topk' must be at most the model's vocabulary size"):
        run_tiny(tmp_path, "steps=1", "support=topk", "topk=100000")


def test_a_lora_rank_beyond_the_layers_or_the_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    """lora_r=100000 was accepted: the process grew to 22.8 GB and the kernel killed it."""
    from plumbing import models
    with pytest.raises(PopsdError,
                       match="'lora_r' is 100000, beyond the dimensions .*k_proj: 64 → 32.* above 32"):
        run_tiny(tmp_path / "a", "steps=1", "lora_r=100000")
    monkeypatch.setattr(models, "free_memory", lambda device: 1 << 20)  # a machine with 1 MiB left
    with pytest.raises(PopsdError,
                       match=r"'lora_r'=32: the adapter, its gradient and AdamW's states need [0-9.]+ "
                                         r"MiB, and cpu has 1\.0 MiB free"):
        run_tiny(tmp_path / "b", "steps=1", "lora_r=32")


def test_qlora_4bit_gradients_survive_an_eval_forward(tiny_dir):
    # sampling runs in eval mode first; the student's 4-bit backward must still reach the first layer
    cfg = make_config("tiny", ["load_in_4bit=true", "dtype=bf16", "out_dir=unused"])
    x = torch.tensor([[1, 20, 30, 40, 50, 60]])

    def first_layer_grad(eval_first):
        torch.manual_seed(0)
        _, model = models.load_model(cfg, torch.device("cpu"), str(tiny_dir))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x).logits.float().pow(2).mean().backward()
        return next(p.grad for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n)

    plain = first_layer_grad(False)
    assert plain.abs().max() > 0
    torch.testing.assert_close(first_layer_grad(True), plain)


def test_qlora_4bit_runs_on_cpu(tmp_path):
    out = run_tiny(tmp_path, "steps=1", "batch_size=2", "load_in_4bit=true", "dtype=bf16",
                   "gradient_checkpointing=true")
    row = json.loads((out / "metrics.jsonl").read_text())
    assert row["loss"] > 0 and row["grad_norm"] > 0


def test_eval_during_training_is_what_eval_py_gives_and_leaves_training_alone(tmp_path):
    out = run_tiny(tmp_path / "a", "steps=2", "eval_every=2", "eval_limit=4")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "loss" not in rows[0]
    assert [("eval/toy_math_test/avg@2" in r, "eval/toy_math_test/pass@2" in r) for r in rows] == [
        (True, True), (False, False), (True, True)]
    assert rows[2]["eval/toy_math_test/questions"] == 4
    plain = run_tiny(tmp_path / "b", "steps=2")  # evaluation consumes no training randomness
    assert_same_adapter(adapter(out / "adapter"), adapter(plain / "adapter"))
    # eval.py on the step-2 checkpoint: the run's template and thinking mode, the same completions
    ckpt = out / "checkpoints/step_000002"
    cli = run_main(E.main, ["--adapter", ckpt, "--bench", "data/toy_math_test.jsonl", "--n", "2", "--limit",
                            "4", "--max-new-tokens", "32", "--batch-size", "8", "--dtype", "fp32", "--device",
                            "cpu", "--out", tmp_path / "cli"])
    assert cli.returncode == 0, cli.stdout
    assert (tmp_path / "cli/samples.jsonl").read_text() == (out
                                                            / "eval/step_000002/samples.jsonl").read_text()


def test_eval_questions_seen_in_training_are_left_out(tmp_path):
    cfg = make_config("tiny", [f"out_dir={tmp_path}", "eval_bench=data/toy_math.jsonl",
                                     "eval_fields=problem,solution"])
    with pytest.raises(PopsdError, match="every question is in the training data"):
        popsd.train(cfg)
    with pytest.raises(PopsdError, match="eval_fields"):
        make_config("tiny", ["eval_fields=problem"])


# ---- the CLI, as a user runs it

def popsd_cli(*args, cwd=ROOT, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "popsd.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_tiny_recipe_end_to_end(tmp_path):
    proc = popsd_cli("--recipe", "tiny", f"out_dir={tmp_path}", cwd=tmp_path)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "sequences per step" in output and "step   20/20" in output and "done: adapter" in output
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(21))  # step 0: the evaluation before training
    assert [r["step"] for r in rows
            if "eval/toy_math_test/avg@2" in r] == [0, 10, 20] and "eval at step 20" in output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    png = tmp_path / "plots.png"  # the curves of the run, written at the end
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
    import plots
    both = run_main(plots.main, [tmp_path, tmp_path, "--out", tmp_path / "two.png"])
    assert both.returncode == 0 and (tmp_path / "two.png").stat().st_size > 30_000


def test_plots_panels_cover_training_and_eval_metrics(tmp_path):
    import plots
    rows = [{"step": 0, "eval/b/avg@1": 0.1, "eval/b/pass@1": 0.1, "eval/b/caught_frac": 0.2,
             "eval/b/samples": 8}]
    rows += [{"step": s, "loss": 1.0 / s, "norm_ratio": 1.2, "markers_per_1k": 20.0} for s in (1, 2)]
    assert plots.panel_keys([rows]) == ["loss", "norm_ratio", "markers_per_1k", "eval/b/avg@1",
                                        "eval/b/caught_frac"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plots.plot_runs([tmp_path], tmp_path / "p.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        plots.plot_runs([tmp_path / "nope"], tmp_path / "q.png")
    # a small change is not drawn as a swing: markers span at least 5 per 1k, fractions 0.1 (in [0, 1])
    assert plots.least_range(18.6, 18.8, "markers_per_1k", False) == pytest.approx((16.2, 21.2))
    assert plots.least_range(0.0, 1.0, "markers_per_1k", False) == (0.0, 5.0)
    assert plots.least_range(0.99, 1.0, "accuracy", True) == pytest.approx((0.9, 1.0))
    assert plots.least_range(0.3, 0.9, "accuracy", True) == (0.3, 0.9)  # wide enough: untouched
    assert plots.least_range(1e-5, 2e-5, "loss", False) == (1e-5, 2e-5)


def test_cli_errors_are_one_clear_line(tmp_path):
    proc = run_main(popsd.main, ["--recipe", "tiny", "stpes=3"])
    output = proc.stdout
    assert proc.returncode == 2 and "unknown config key 'stpes' (did you mean 'steps'?)" in output
    assert "Traceback" not in output


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    proc = popsd_cli("--recipe", "tiny", "steps=500", "save_every=0", "eval_every=0", f"out_dir={tmp_path}")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    ckpt = latest_checkpoint(tmp_path)
    step = torch.load(ckpt / "state.pt", weights_only=False)["step"]
    assert step >= 2 and "checkpoint saved at step" in output
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    out = run_tiny(tmp_path, f"steps={step + 1}", "resume=true")
    assert [json.loads(line)["step"]
            for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == step + 1


def test_sigterm_while_sampling_drops_the_step_at_once_and_resume_gives_the_straight_run(tmp_path):
    """A step's sampling can take long (64 generate calls here, hours on a real model): a stop asked for then
    ends it after the current batch, the step is dropped, the checkpoint of the step before is saved with the
    data position and random states the step started from, and resuming gives the run that was never
    stopped."""
    args = ["--recipe", "tiny", "steps=2", "save_every=0", "eval_every=0", "batch_size=64",
            "gen_batch_size=1"]
    straight = popsd_cli(*args, f"out_dir={tmp_path / 'straight'}")
    proc = popsd_cli(*args, f"out_dir={tmp_path / 'stopped'}")
    metrics = tmp_path / "stopped/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(1.0)  # step 1 logged and saved: step 2 is sampling (~4 s of it)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    output, _ = proc.communicate(timeout=120)
    took = time.time() - sent
    stopped = re.search(r"stopped while sampling step 2 \((\d+) of its 64 sequences sampled\)", output)
    assert proc.returncode == 128 + signal.SIGTERM and stopped, output[-2000:]
    # ended at the next generate call, not after the step's 64 (counted, as a loaded machine's timing says
    # little), and in bounded time
    assert int(stopped[1]) < 64 and took < 30
    assert latest_checkpoint(tmp_path / "stopped").name == "step_000001"
    assert straight.communicate(timeout=120) and straight.returncode == 0
    run_tiny(tmp_path / "stopped", "steps=2", "save_every=0", "batch_size=64", "gen_batch_size=1",
             "resume=true")
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("straight", "stopped")]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]] and len(rows[1]) == 2
    a, b = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_step_larger_than_the_data_is_refused_naming_both_numbers(tmp_path):
    out = run_main(popsd.main, ["--recipe", "toy", "batch_size=100000", f"out_dir={tmp_path}"])
    assert (out.returncode == 2 and "asks for 100000 prompts per step" in out.stdout
            and "holds 2000 rows" in out.stdout)


def test_plots_draw_a_comparison_folder_and_name_each_runs_questions(tmp_path):
    import shutil
    import plots
    shutil.copy(ROOT / "docs/toy_compare/summary.json", tmp_path / "summary.json")
    done = run_main(plots.main, [tmp_path])  # a comparison folder, not a run: its figure
    assert done.returncode == 0 and (tmp_path / "summary.png").stat().st_size > 30_000
    rows = [{"step": s, "eval/t/avg@1": a, "eval/t/questions": 400, "eval/t/samples": 400}
            for s, a in ((0, 0.918), (20, 0.913))]
    assert plots.questions_note(rows) == " (400 questions)" and plots.questions_note(rows + [
        {"step": 40, "eval/t/questions": 8}]) == ""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plots.plot_runs([run], run / "p.png").stat().st_size > 10_000


# ---- trackers (report_to)

def tensorboard_scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder)).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_tensorboard_gets_every_row_and_a_resume_replaces_the_steps_after_its_checkpoint(tmp_path):
    out = run_tiny(tmp_path / "run", "steps=4", "save_every=2", "report_to=tensorboard")
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    logged = tensorboard_scalars(out / "tensorboard", "loss")
    assert logged == pytest.approx({s: r["loss"] for s, r in rows.items()}, rel=1e-6)  # float32 events
    assert set(tensorboard_scalars(out / "tensorboard", "time_step")) == {1, 2, 3, 4}
    run_tiny(tmp_path / "run", "steps=6", "save_every=2", "report_to=tensorboard", "resume=true")
    # step 4 once, not twice
    assert sorted(tensorboard_scalars(out / "tensorboard", "loss")) == [1, 2, 3, 4, 5, 6]


def test_wandb_offline_logs_the_run_and_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run_tiny(tmp_path / "run", "steps=2", "report_to=wandb")
    run_id = (out / "wandb" / "popsd_run_id").read_text().strip()
    runs = list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "wandb").iterdir())
    run_tiny(tmp_path / "run", "steps=3", "report_to=wandb", "resume=true")
    assert (out / "wandb" / "popsd_run_id").read_text().strip() == run_id
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same W&B run id, resumed
    run_tiny(tmp_path / "run", "steps=1", "overwrite=true")  # overwrite removes what the tracker wrote
    assert not (out / "wandb").exists()


def test_wandb_without_a_login_is_one_line_naming_offline_mode_and_leaves_nothing_in_the_way(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")} | {
        # its own process: W&B keeps its settings per process
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config")}
    proc = popsd_cli("--recipe", "tiny", "steps=1", "eval_every=0", "report_to=wandb",
                     f"out_dir={tmp_path / 'run'}", env=env)
    output, _ = proc.communicate(timeout=300)
    assert (proc.returncode == 2 and "could not start a W&B run" in output
            and "WANDB_MODE=offline" in output), output
    assert "Traceback" not in output
    run_tiny(tmp_path / "run", "steps=1")  # the half-made run does not block the plain rerun


def test_trackers_are_imported_only_when_asked_and_a_missing_one_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    run_tiny(tmp_path / "a", "steps=1")  # report_to=none: neither is imported
    with pytest.raises(PopsdError, match="report_to=wandb needs its package .*pip install wandb"):
        run_tiny(tmp_path / "b", "steps=1", "report_to=wandb")
    with pytest.raises(PopsdError, match="report_to: unknown tracker 'mlflow'"):
        make_config("tiny", ["report_to=tensorboard,mlflow"])


# ---- teacher=ema: a second LoRA adapter, an EMA of the trained one

def ema_at(out, step):
    return torch.load(out / f"checkpoints/step_{step:06d}/state.pt", weights_only=True)["ema"]


def test_ema_teacher_at_rate_1_is_the_live_teacher_and_near_0_the_frozen_one(tmp_path):
    live = run_tiny(tmp_path / "live", "steps=2", "teacher=live")
    one = run_tiny(tmp_path / "one", "steps=2", "teacher=ema", "ema_rate=1")
    assert_same_adapter(adapter(live / "adapter"), adapter(one / "adapter"))
    frozen = run_tiny(tmp_path / "frozen", "steps=2")
    still = run_tiny(tmp_path / "still", "steps=2", "teacher=ema", "ema_rate=1e-30")
    assert_same_adapter(adapter(frozen / "adapter"), adapter(still / "adapter"))
    assert not torch.equal(adapter(live / "adapter")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           adapter(frozen / "adapter")[
                               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_ema_teacher_follows_its_recurrence_saves_apart_from_the_adapter_and_resumes_exactly(tmp_path):
    out = run_tiny(tmp_path / "a", "steps=3", "save_every=1", "keep_checkpoints=3", "teacher=ema",
                   "ema_rate=0.3")
    first = {k.replace(".ema.", "."): v for k, v in ema_at(out, 1).items()}
    b_keys = [k for k in first if "lora_B" in k]
    for k in b_keys:  # θ_T,0 = θ_0, whose lora_B is 0: after step 1, θ_T's lora_B is 0.3·θ_1's
        torch.testing.assert_close(first[k], 0.3 * adapter_at_step(out, 1)[k], atol=1e-8, rtol=1e-6)
    assert any(torch.count_nonzero(first[k]) for k in b_keys)
    previous = None
    for step in range(1, 4):  # θ_T,k = 0.7·θ_T,k−1 + 0.3·θ_k, θ_T,0 = θ_0 (lora_B = 0, lora_A its init)
        theta, got = adapter_at_step(out, step), {k.replace(".ema.", "."): v for k,
                                                  v in ema_at(out, step).items()}
        assert got.keys() == theta.keys()
        if previous is not None:
            for k in got:
                torch.testing.assert_close(got[k], torch.lerp(previous[k], theta[k], 0.3), atol=1e-7, rtol=0)
        previous = got
    for folder in (out / "adapter", out / "checkpoints/step_000003"):  # the adapter alone, in PEFT format
        assert not (folder / "ema").exists() and not any(".ema." in k for k in adapter(folder))
    resumed = tmp_path / "b"
    run_tiny(resumed, "steps=2", "save_every=2", "teacher=ema", "ema_rate=0.3")
    run_tiny(resumed, "steps=3", "save_every=2", "teacher=ema", "ema_rate=0.3", "resume=true")
    assert_same_adapter(adapter(out / "adapter"), adapter(resumed / "adapter"))
    assert_same_adapter(ema_at(out, 3), ema_at(resumed, 3))


def adapter_at_step(out, step):
    return adapter(out / f"checkpoints/step_{step:06d}")


def test_ema_rate_is_checked():
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(PopsdError, match="'ema_rate' must be in \\(0, 1\\]"):
            make_config("tiny", ["teacher=ema", f"ema_rate={bad}"])
