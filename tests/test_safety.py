"""Nothing lost, nothing run that should not be: run folders, resume checks, damaged and malicious
checkpoints, same seed same result, the divergence guard, clear errors for bad input (fuzzed)."""
import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plumbing import checkpoints
import eval as E
from plumbing import guards
import popsd
from plumbing.config import make_config
import rollout
from plumbing import session
from plumbing.checkpoints import latest_checkpoint
from conftest import ROOT, run_main
from plumbing.data import PopsdError


def run_tiny(out, *overrides):
    quiet = [] if any(o.startswith("eval_every=") for o in overrides) else ["eval_every=0"]  # a key once
    return popsd.train(make_config("tiny", [f"out_dir={out}", *quiet, *overrides]))


def cli(*args, cwd=ROOT):
    return run_main(popsd.main, args, cwd)  # popsd.py's main in this process (its own process: kill -9 below)


def snapshot(out):
    """Every file of a run folder and its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---- 1. a second run never destroys the first

def test_a_second_run_into_the_same_folder_is_refused_and_changes_nothing(tmp_path):
    run_tiny(tmp_path, "steps=2", "save_every=1")
    before = snapshot(tmp_path)
    out = cli("--recipe", "tiny", f"out_dir={tmp_path}", "steps=3", "lr=1e-4")
    assert out.returncode == 2 and "already holds a run" in out.stdout and "resume=true" in out.stdout
    assert "overwrite=true" in out.stdout and "Traceback" not in out.stdout
    assert snapshot(tmp_path) == before
    run_tiny(tmp_path, "steps=1", "overwrite=true")  # explicit: the old run is replaced, not mixed
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and sorted(p.name
                                                       for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step_000001"]


# ---- 2. resume checks the config before anything on disk changes

def test_resume_with_a_changed_model_field_is_an_error_naming_it(tmp_path):
    run_tiny(tmp_path, "steps=2")
    before = snapshot(tmp_path)
    with pytest.raises(PopsdError, match=r"lora_r: 8 → 4; lr: 0.001 → 0.002"):
        run_tiny(tmp_path, "steps=4", "resume=true", "lora_r=4", "lr=2e-3")
    assert snapshot(tmp_path) == before  # config.json untouched


def test_resume_may_change_steps_and_evaluation_and_says_so(tmp_path, capsys):
    run_tiny(tmp_path, "steps=2")
    run_tiny(tmp_path, "steps=3", "resume=true", "save_every=5", "samples_per_step=1")
    printed = capsys.readouterr().out
    assert "steps changes 2 → 3" in printed and "resumed from" in printed
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_without_a_checkpoint(tmp_path, capsys):
    fresh = tmp_path / "empty"
    run_tiny(fresh, "steps=1", "resume=true")  # nothing to resume: starts afresh, and says so
    assert "holds no run, starting afresh" in capsys.readouterr().out
    half = tmp_path / "half"
    half.mkdir()
    (half / "popsd_run.json").write_text("{}")  # a popsd run that never saved a checkpoint
    (half / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(PopsdError, match="no checkpoint to resume from"):
        run_tiny(half, "steps=1", "resume=true")


# ---- 3. damaged checkpoints

@pytest.mark.parametrize("victim", ["state.pt", "adapter_model.safetensors"])
def test_a_damaged_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys, victim):
    run_tiny(tmp_path, "steps=2", "save_every=1")
    damaged = tmp_path / "checkpoints/step_000002" / victim
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a full disk or a kill during a copy
    run_tiny(tmp_path, "steps=3", "resume=true")
    printed = capsys.readouterr().out
    assert "skipping the damaged checkpoint" in printed and "step_000002" in printed and victim in printed
    assert "resumed from" in printed and "step 1" in printed
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    run_tiny(tmp_path, "steps=1")
    (tmp_path / "checkpoints/step_000001/state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PopsdError, match="every checkpoint .* is damaged"):
        run_tiny(tmp_path, "steps=2", "resume=true")


def test_a_damaged_newest_state_says_which_older_adapters_are_intact(tmp_path):
    # steps 1 and 2 keep their adapters only
    run_tiny(tmp_path, "steps=3", "save_every=1", "keep_checkpoints=1")
    (tmp_path / "checkpoints/step_000003/state.pt").write_bytes(b"torn")
    with pytest.raises(PopsdError,
                       match=r"that holds resume state \(step_000003\) is damaged .*the adapters of "
                                         r"step_000001, step_000002 are kept but hold no resume state"):
        run_tiny(tmp_path, "steps=4", "save_every=1", "keep_checkpoints=1", "resume=true")


def test_after_kill_9_a_torn_metrics_line_and_samples_past_the_checkpoint_are_dropped(tmp_path, capsys):
    """kill -9 can leave half a line in metrics.jsonl (resume crashed on it) and samples of steps after the
    checkpoint in samples.txt (they were kept, then written again by the resumed run, with other samples)."""
    run_tiny(tmp_path, "steps=4", "save_every=2", "samples_per_step=1")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.0')  # torn
    (tmp_path / "checkpoints/step_000004").rename(tmp_path / "gone")  # as if killed after step 4, saved at 2
    run_tiny(tmp_path, "steps=4", "save_every=2", "samples_per_step=1", "resume=true")
    assert "line 5 is cut short" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    headers = re.findall(r"(?m)^===== step (\d+) sample 0$", (tmp_path / "samples.txt").read_text())
    assert steps == [1, 2, 3, 4] and headers == ["1", "2", "3", "4"]


def test_overwrite_keeps_a_users_file_inside_the_runs_folders(tmp_path):
    run_tiny(tmp_path, "steps=1", "eval_every=1", "eval_limit=2")
    (tmp_path / "eval/my_notes.txt").write_text("mine")
    run_tiny(tmp_path, "steps=1", "overwrite=true")
    assert (tmp_path
            / "eval/my_notes.txt").read_text() == "mine" and not (tmp_path / "eval/step_000000").exists()


def test_a_run_that_stopped_before_its_first_step_does_not_block_the_plain_rerun(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name,
                        *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(PopsdError, match="vLLM is not installed"):
        run_tiny(tmp_path, "steps=1", "rollout_engine=vllm")
    assert not any(tmp_path.iterdir())  # refused before the folder was touched
    monkeypatch.undo()
    from conftest import free_port
    with pytest.raises(PopsdError, match="no rollout server answered"):  # a sampler found missing at start-up
        run_tiny(tmp_path, "steps=1", f"rollout_server=http://127.0.0.1:{free_port()}")
    assert (tmp_path / "config.json").exists()  # a run that never logged a step
    run_tiny(tmp_path, "steps=1")  # the plain rerun replaces it, saying so
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


# ---- 6. a checkpoint is data, never code

class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARK}",))


MARK = None


def test_a_malicious_checkpoint_does_not_run_code(tmp_path):
    global MARK
    run_tiny(tmp_path / "run", "steps=1")
    MARK = tmp_path / "pwned"
    state = tmp_path / "run/checkpoints/step_000001/state.pt"
    good = torch.load(state, weights_only=True)
    torch.save(dict(good, data={"epoch": 0, "cursor": Payload()}), state)  # a __reduce__ payload inside
    with open(state, "rb"):  # a real pickle payload: loading it unsafely would run it
        assert b"system" in state.read_bytes()
    with pytest.raises(PopsdError, match="every checkpoint .* is damaged"):
        run_tiny(tmp_path / "run", "steps=2", "resume=true")
    assert not MARK.exists()  # the payload never ran
    # (pickle itself is fine; torch.load(weights_only=True) refused the payload)
    pickle.loads(pickle.dumps(0))


# ---- 4. the same seed gives the same run, whatever is already on disk

def test_same_command_twice_gives_the_same_run(tmp_path):
    run_tiny(tmp_path, "steps=2")
    first = ((tmp_path / "metrics.jsonl").read_text(),
             load_file(tmp_path / "adapter/adapter_model.safetensors"))
    # the tiny model is rebuilt; RNG use must not depend on it
    run_tiny(tmp_path, "steps=2", "overwrite=true")
    second = ((tmp_path / "metrics.jsonl").read_text(),
              load_file(tmp_path / "adapter/adapter_model.safetensors"))
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if not k.startswith("time")}  # noqa: E731
                          for x in text.splitlines()]
    assert strip(first[0]) == strip(second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k
    (tmp_path / "x").mkdir()
    run_tiny(tmp_path / "x", "steps=2", f"model={tmp_path / 'tiny_model'}")  # the model already on disk
    assert strip((tmp_path / "x/metrics.jsonl").read_text()) == strip(first[0])


# ---- 5. divergence is noticed

def test_a_collapse_is_warned_on_screen_and_in_metrics(tmp_path, capsys):
    run_tiny(tmp_path, "steps=4", "lr=10")  # the reproduction: lr=10 ruins the student at once
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # flagged from step 2, the first at the full lr, to the end (a step in between may sit just under the
    # threshold, as its samples fall)
    flags = [bool(r.get("collapse")) for r in rows]
    assert flags[0] is False and flags[1] and flags[-1] and sum(flags) >= 2
    assert "looks collapsed" in capsys.readouterr().out
    cfg = make_config("tiny")
    base = {"step": 1, "skipped": False, "loss": 0.05, "grad_norm": 0.1, "entropy": 2.0, "lr": 1e-3}
    said = lambda row, c=cfg, stalls=0: " ".join(guards.health(row, stalls, 512, c)[1])  # noqa: E731
    assert guards.health(dict(base), 0, 512, cfg) == (0, [], None)
    for change in ({"entropy": 6.2}, {"grad_norm": 0.0}, {"loss": 0.66}):
        assert "collapsed" in said(dict(base, **change)) and "lower lr?" in said(dict(base, **change))
    assert guards.health(dict(base, skipped=True), 1, 512, cfg)[0] == 2
    assert guards.health(dict(base), 2, 512, cfg)[0] == 0  # a good step resets the count
    # the paper's other failure: long, repetitive output
    looping = dict(base, repeated_4grams=0.8, truncated=0.9)
    assert "repeats itself (80% of its 4-grams" in said(looping) and looping["repetition"]
    # short: not flagged
    assert guards.health(dict(base, repeated_4grams=0.8, truncated=0.1), 0, 512, cfg)[1] == []
    hot = make_config("tiny", ["temperature=50"])
    assert "temperature=50 samples near-uniform" in said(dict(base, entropy=6.2), hot)
    # the target, not the student, is what is off: name its knob
    flat = make_config("tiny", ["beta=1e-30"])
    assert "beta=1e-30 makes the target one-hot" in said(dict(base, loss=0.66), flat) and "lower lr" not in \
        said(dict(base, loss=0.66), flat)
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 9], [5, 6, 7, 8, 9, 0, 0, 0, 0]])
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    assert rollout.repeated_ngrams(ids, mask) == (1, 6 + 2)  # (1,2,3,4) seen twice; the padding not counted


def test_a_run_that_cannot_learn_stops_and_names_the_setting(tmp_path):
    """temperature=1e-30 makes every softmax one-hot: loss 0, gradient exactly 0, NaN cosines. It was a silent
    no-op (exit code 0); now each such step is warned and three in a row stop the run, naming τ."""
    out = cli("--recipe", "toy", f"out_dir={tmp_path}", "eval_every=0", "steps=6", "temperature=1e-30")
    assert out.returncode == 2 and "Traceback" not in out.stdout, out.stdout[-2000:]
    assert "3 steps in a row had no gradient at all" in out.stdout and "τ=1e-30" in out.stdout
    assert "the gradient is exactly zero" in out.stdout and "the Δ diagnostics are not finite" in out.stdout
    assert [json.loads(x)["grad_norm"]
            for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.0] * 3


def test_the_sampler_gap_warns_then_stops_the_run():
    cfg = make_config("toy")
    base = {"step": 4, "skipped": False, "loss": 0.05, "grad_norm": 0.1, "entropy": 2.0, "lr": 1e-3}
    assert guards.health(dict(base, sampler_logprob_gap=1e-6), 0, 128, cfg) == (0, [], None)
    _, warned, stop = guards.health(dict(base, sampler_logprob_gap=0.2), 0, 128, cfg)
    assert (stop is None and "differ from the student's by 0.2 nats" in warned[0]
            and "sampler_gap_warn=0.05" in warned[0])
    for gap in (12.0, float("nan")):  # a server's garbage log-probs; a NaN is never below a bound
        _, _, stop = guards.health(dict(base, sampler_logprob_gap=gap), 0, 128, cfg)
        assert "not sampling from the student" in stop and "raw_logprobs" in stop and "stale" in stop
    with pytest.raises(PopsdError, match="sampler_gap_stop.*at least sampler_gap_warn"):
        make_config("toy", ["sampler_gap_warn=1", "sampler_gap_stop=0.5"])


def test_lr_1e30_stops_with_a_clear_error_and_saves_no_broken_state(tmp_path):
    out = cli("--recipe", "tiny", f"out_dir={tmp_path}", "eval_every=0", "steps=8", "lr=1e30", "save_every=1")
    assert (out.returncode == 2 and "the run diverged" in out.stdout
            and "Traceback" not in out.stdout), out.stdout
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "adapter").exists()


def test_non_finite_steps_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch):
    real = popsd.loss_fused.fused_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # from step 3 on (two micro-batches a step) the loss is NaN
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] > 4 else (loss, stats)
    monkeypatch.setattr(popsd.loss_fused, "fused_loss", poisoned)
    with pytest.raises(PopsdError, match="3 steps in a row had a non-finite loss"):
        run_tiny(tmp_path, "steps=8", "save_every=1")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]  # logged, then stopped
    for ckpt in (tmp_path / "checkpoints").iterdir():  # the skipped steps changed no weights: all finite
        assert all(torch.isfinite(w).all() for w in load_file(ckpt / "adapter_model.safetensors").values())
    a4, a5 = (load_file(tmp_path / f"checkpoints/step_00000{i}/adapter_model.safetensors") for i in (2, 4))
    assert all(torch.equal(a4[k], a5[k]) for k in a4)  # step 2 → 4: two skipped updates, no change
    assert latest_checkpoint(tmp_path).name == "step_000004"


# ---- 8. bad values and rows: a PopsdError naming them, never a traceback (fuzzed)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from plumbing import config  # noqa: E402
from plumbing import data  # noqa: E402

TEXT = st.one_of(st.text(max_size=12), st.sampled_from(["0", "-1", "1e30", "nan", "inf", "-inf", "none",
                                                        "true", "", "1.5", "0.0", "jsd", "opsd", "x=y",
                                                        "{question}"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.one_of(st.sampled_from(sorted(config.FIELDS)), st.text(max_size=8)), value=TEXT)
def test_fuzzed_overrides_give_a_config_or_a_popsd_error(key, value):
    try:
        cfg = config.make_config("", [f"{key}={value}"])
    except PopsdError:
        return
    exercise(cfg)  # whatever is accepted works where it is used


def exercise(cfg):
    """The consumers of the config's numbers, on tiny inputs: no exception and finite numbers out."""
    import math
    import loss as L
    from plumbing.models import make_optimizer
    from peft import LoraConfig
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(dataclasses_replace(cfg, optim="adamw"), [param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: session.lr_factor(s, cfg))
    (param.sum() * 0 + 1).backward()
    torch.nn.utils.clip_grad_norm_([param], cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    assert torch.isfinite(param).all() and math.isfinite(scheduler.get_last_lr()[0])
    LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
               target_modules="all-linear")
    g = torch.Generator().manual_seed(0)
    h = [torch.randn(3, 4, generator=g) for _ in range(4)]
    loss, stats = L.reference_loss(*h, torch.randn(5, 4, generator=g), method=cfg.method, kind=cfg.divergence,
                                   jsd_mix=cfg.jsd_mix, beta=cfg.beta, pmi_clip=cfg.pmi_clip,
                                   term_clamp=cfg.term_clamp,
                                   temperature=cfg.loss_temperature or cfg.temperature)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in stats.values())


def dataclasses_replace(cfg, **changes):
    import dataclasses
    return dataclasses.replace(cfg, **changes)


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.sampled_from(["problem", "solution", "x"]),
                                                               inner, max_size=3)), max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.one_of(JSONISH.map(lambda v: __import__("json").dumps(v)), st.text(max_size=20)),
                      min_size=1, max_size=5))
def test_fuzzed_data_files_give_rows_or_a_popsd_error_naming_the_line(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        rows, bad = data.read_rows(str(path), "train", ("problem", "solution"))
    except PopsdError as e:
        assert "line" in str(e) or "no usable rows" in str(e), e
        return
    assert rows and all(isinstance(q, str) and isinstance(r, str) and q.strip() and r.strip() for q,
                        r in rows)


# ---- 9-14. the first hour

def test_no_arguments_print_usage_with_the_recipes_not_a_run(tmp_path):
    out = cli(cwd=tmp_path)
    assert out.returncode == 2 and "Recipes (recipes/*.py" in out.stdout and "toy " in out.stdout
    assert not (tmp_path / "runs").exists()  # nothing started


def test_help_lists_fields_with_type_default_and_comment_and_says_recipes_are_code():
    out = cli("--help")
    assert out.returncode == 0
    assert "  lr: float = 5e-06  # AdamW learning rate" in out.stdout
    assert "  pmi_clip: float | None = 10.0  # c: soft clip" in out.stdout
    assert ("vllm: vLLM in this process; graph: a static KV cache, the decoding step replayed as a CUDA "
            "graph (engines/: the table)\n  graph_keep_rows:") in out.stdout  # a comment on several lines
    assert "tiny                  the whole pipeline on a laptop CPU" in out.stdout
    assert "Python that popsd executes" in out.stdout
    assert len(config.field_docs()) == len(config.FIELDS) and all(c for *_, c in config.field_docs())


def test_missing_model_folder_and_trust_remote_code_are_said_plainly(tmp_path):
    out = cli("--recipe", "tiny", "model=./no-such-model-dir", f"out_dir={tmp_path}")
    assert out.returncode == 2 and "model folder './no-such-model-dir' does not exist" in out.stdout
    assert "huggingface-cli" not in out.stdout and "Repo id" not in out.stdout
    not_a_model = tmp_path / "etc"
    not_a_model.mkdir()
    (not_a_model / "hosts").write_text("127.0.0.1 localhost")
    out = cli("--recipe", "tiny", f"model={not_a_model}", f"out_dir={tmp_path / 'm'}")
    assert out.returncode == 2 and "holds no config.json: not a Hugging Face model folder" in out.stdout
    out = cli("--recipe", "tiny", "lora_targets=nope", "steps=1", f"out_dir={tmp_path / 'l'}")
    assert out.returncode == 2 and "'lora_targets' 'nope'" in out.stdout and "q_proj" in out.stdout
    out = cli("--recipe", "tiny", "trust_remote_code=true", "steps=1", "eval_every=0",
              f"out_dir={tmp_path / 'r'}")
    assert (out.returncode == 0
            and "trust_remote_code=true: code shipped with the model will run" in out.stdout)


def test_startup_table_shows_what_differs_and_fits_80_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(session.console, "width", 80)
    out = cli("--recipe", "tiny", "steps=1", "eval_every=0", "lr=2e-3", f"out_dir={tmp_path}")
    assert out.returncode == 0
    table = out.stdout.split("popsd config")[1].split("step    1/1")[0]
    assert "lr" in table and "0.002" in table and "micro-batches per step" in table
    assert "divergence" not in table and "jsd_mix" not in table  # defaults are in config.json, not on screen
    assert max(len(line) for line in table.splitlines()) <= 80 and "…" not in table


def test_samples_txt_is_text_even_when_completions_hold_control_bytes():
    assert session.printable("ok\x07\x1b[31m\ttab\nline") == "ok\\x07\\x1b[31m\ttab\nline"


def test_eval_errors_name_the_right_thing(tiny_dir, tmp_path):
    def ev(*args):
        return run_main(E.main, args, cwd=tmp_path)
    five = str(ROOT / "tests/data/five_questions.jsonl")
    for extra in ([], ["--model", str(tiny_dir)]):
        out = ev("--adapter", "runs/nope/adapter", "--bench", five, *extra)
        assert out.returncode == 2 and "--adapter runs/nope/adapter: no adapter_config.json" in out.stdout
        assert "Traceback" not in out.stdout + out.stderr
    out = ev("--model", str(tiny_dir), "--bench", five, "--answer-field", "solution")
    assert (out.returncode == 2 and "--answer-field" in out.stdout
            and "config" not in out.stdout.split("field")[-1])


def test_an_adapter_trained_from_a_relative_model_path_evaluates_from_anywhere(tmp_path):
    import shutil
    shutil.copytree(ROOT / "data/toyworld/base", tmp_path / "base")
    (tmp_path / "elsewhere").mkdir()
    out = cli("--recipe", "toy", "model=base", "steps=1", "eval_every=0", "batch_size=2",
              "micro_batch_size=2", f"out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:]
    ev = run_main(E.main, ["--adapter", tmp_path / "run/adapter", "--bench",
                           ROOT / "data/toyworld/test.jsonl", "--question-field", "question", "--grader",
                           "toyworld", "--n", "1", "--limit", "2", "--max-new-tokens", "16", "--dtype",
                           "fp32"],
                  cwd=tmp_path / "elsewhere")
    assert ev.returncode == 0, ev.stdout[-2000:]


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_run(tmp_path):
    import signal
    import time
    args = ["--recipe", "tiny", "eval_every=0", "steps=6", "save_every=1"]
    assert cli(*args, f"out_dir={tmp_path / 'straight'}").returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "popsd.py"), *args, f"out_dir={tmp_path / 'killed'}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "killed/checkpoints/step_000003").exists() and time.time() < deadline:
        time.sleep(0.02)
    busy = cli(*args, "resume=true", f"out_dir={tmp_path / 'killed'}")  # a second run while the first is live
    assert (busy.returncode == 2
            and f"in use by another run: process {proc.pid} on this machine" in busy.stdout)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: whatever was half-written stays half-written
    proc.wait()
    assert (tmp_path / "killed/popsd_run.lock").exists()  # left behind by the killed run
    resumed = cli(*args, "resume=true", f"out_dir={tmp_path / 'killed'}")
    assert (resumed.returncode == 0 and "taking over the stale lock" in resumed.stdout
            and str(proc.pid) in resumed.stdout)
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step logged exactly once
    a, b = (load_file(tmp_path / f"{r}/adapter/adapter_model.safetensors") for r in ("straight", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the run that was never killed


# ---- 7. a folder is a popsd run only if popsd marked it; one live run per folder; a full disk is said
# plainly

def foreign_folder(path):
    """A folder that never held a popsd run, with names a run also writes."""
    for name, text in (("config.json", '{"mine": 1}'), ("notes.txt", "keep me"), ("eval/result.txt", "42"),
                       ("checkpoints/a.bin", "x"), ("adapter/w.bin", "y"),
                       ("metrics.jsonl", '{"step": 1}\n')):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return snapshot(path)


@pytest.mark.parametrize("extra", [[], ["overwrite=true"], ["resume=true"]])
def test_a_folder_popsd_did_not_make_is_never_written(tmp_path, extra):
    before = foreign_folder(tmp_path)
    with pytest.raises(PopsdError, match="not a popsd run folder"):
        run_tiny(tmp_path, "steps=1", *extra)
    assert snapshot(tmp_path) == before
    link = tmp_path.parent / (tmp_path.name + "_link")  # the same folder through a symbolic link
    link.symlink_to(tmp_path)
    with pytest.raises(PopsdError, match="not a popsd run folder"):
        run_tiny(link, "steps=1", *extra)
    assert snapshot(tmp_path) == before
    here = cli("--recipe", "tiny", "out_dir=.", "steps=1", *extra, cwd=tmp_path)  # the current folder
    assert here.returncode == 2 and "not a popsd run folder" in here.stdout and snapshot(tmp_path) == before


def test_out_dir_holding_the_model_or_data_is_refused(tmp_path, tiny_dir):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    before = snapshot(tmp_path)
    for out in (model, tmp_path):
        with pytest.raises(PopsdError, match="which this run reads"):
            run_tiny(out, "steps=1", f"model={model}", "overwrite=true")
    assert snapshot(tmp_path) == before


def test_overwrite_removes_only_what_the_run_wrote_and_never_follows_a_link(tmp_path):
    run = tmp_path / "run"
    run_tiny(run, "steps=1")
    assert json.loads((run / "popsd_run.json").read_text())["popsd"] == "run folder"
    (run / "notes.txt").write_text("mine")
    outside = tmp_path / "outside.jsonl"
    outside.write_text("precious\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)  # a link inside the run folder
    with pytest.raises(PopsdError, match="metrics.jsonl is a symbolic link"):
        run_tiny(run, "steps=2", "resume=true")
    assert outside.read_text() == "precious\n"
    run_tiny(run, "steps=1", "overwrite=true")  # removes the link, not what it points to
    assert outside.read_text() == "precious\n" and not (run / "metrics.jsonl").is_symlink()
    assert (run / "notes.txt").read_text() == "mine"  # not popsd's: kept
    assert not (run / "popsd_run.lock").exists()  # released at the end


def test_a_run_from_before_the_marker_is_still_a_run(tmp_path):
    run_tiny(tmp_path, "steps=1")
    (tmp_path / "popsd_run.json").unlink()  # as written by popsd before the marker
    before = snapshot(tmp_path)
    with pytest.raises(PopsdError, match="already holds a run"):
        run_tiny(tmp_path, "steps=1")
    assert snapshot(tmp_path) == before
    run_tiny(tmp_path, "steps=2", "resume=true")
    assert (tmp_path / "popsd_run.json").exists()


def test_a_lock_held_elsewhere_is_an_error_naming_its_holder(tmp_path):
    import socket
    run_tiny(tmp_path, "steps=1")
    before = snapshot(tmp_path)
    lock = tmp_path / "popsd_run.lock"
    lock.write_text(json.dumps({"host": "other-node", "pid": 4242, "start": "1",
                                "since": "2026-12-02 00:00:00"}))
    with pytest.raises(PopsdError,
                       match=r"in use by a run on other-node \(pid 4242.*remove .*popsd_run.lock"):
        run_tiny(tmp_path, "steps=2", "resume=true")
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process on this host
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                    "start": checkpoints.process_start(sleeper.pid), "since": "now"}))
        with pytest.raises(PopsdError, match=f"in use by another run: process {sleeper.pid} on this machine"):
            run_tiny(tmp_path, "steps=2", "resume=true")
        assert snapshot(tmp_path) == before | {"popsd_run.lock": lock.read_bytes()}
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "start": "1",
                                    "since": "x"}))
        run_tiny(tmp_path, "steps=2", "resume=true")  # the same pid, started at another time: reused, stale
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not lock.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KB tmpfs (room for one tiny checkpoint, not two); skipped where mounting is refused."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is refused here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_said_plainly_and_resume_still_works(small_disk, tiny_dir):
    out = small_disk / "run"
    with pytest.raises(PopsdError,
                       match=r"the disk holding .*run is full \(.* MB free\) while writing the checkpoint "
                                         r"of step 2: nothing of it was kept"):
        run_tiny(out, "steps=3", "save_every=1", f"model={tiny_dir}")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]  # no step_000002.tmp
    assert checkpoints.checkpoint_problem(
        out / "checkpoints/step_000001") is None and not (out / "popsd_run.lock").exists()
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    run_tiny(out, "steps=3", "save_every=1", f"model={tiny_dir}", "resume=true")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_at_the_final_adapter_leaves_no_partial_adapter(small_disk, tiny_dir):
    out = small_disk / "run"  # the last checkpoint fits, the adapter and tokenizer after it do not
    with pytest.raises(PopsdError, match="while writing the final adapter: nothing of it was kept"):
        run_tiny(out, "steps=1", "save_every=0", f"model={tiny_dir}")
    assert not (out / "adapter").exists() and not (out / "adapter.tmp").exists()
    assert checkpoints.checkpoint_problem(out / "checkpoints/step_000001") is None
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    run_tiny(out, "steps=1", "save_every=0", f"model={tiny_dir}", "resume=true")  # the adapter, now
    assert (out / "adapter/adapter_model.safetensors").exists() and (out / "adapter/tokenizer.json").exists()


def test_a_base_replaced_in_its_folder_is_noticed_by_resume_and_by_the_eval_cache(tmp_path):
    """compare.py pretrain used to write over the shipped base in place: resume then trained on, and eval.py's
    cache answered for the old base. The base is fingerprinted (its weights' checksum) in config.json, every
    checkpoint and every evaluation record: both now refuse."""
    import shutil
    from safetensors.torch import load_file, save_file
    base = tmp_path / "base"
    shutil.copytree(ROOT / "data/toyworld/base", base)
    run = tmp_path / "run"
    common = ["--recipe", "toy", f"model={base}", f"out_dir={run}", "eval_every=0", "save_every=1"]
    assert cli(*common, "steps=1").returncode == 0
    saved = json.loads((run / "config.json").read_text())["base_sha256"]
    assert json.loads((run / "checkpoints/step_000001/popsd_base.json").read_text())["sha256"] == saved
    assert json.loads((run / "adapter/popsd_base.json").read_text())["sha256"] == saved
    ev = ["--adapter", run / "adapter", "--bench", ROOT / "data/toyworld/test.jsonl", "--question-field",
          "question", "--grader", "toyworld", "--n", "1", "--limit", "4", "--max-new-tokens", "32", "--dtype",
          "fp32", "--out", tmp_path / "eval"]
    assert run_main(E.main, ev).returncode == 0
    weights = load_file(base / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    again = cli(*common, "steps=2", "resume=true")
    assert again.returncode == 2 and "the base changed since" in again.stdout, again.stdout[-2000:]
    # untouched
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    cached = run_main(E.main, ev)  # the adapter on its base changed in place: refused, naming the way on
    assert (cached.returncode == 2 and "is another base (or that one, changed since)" in cached.stdout
            and "--other-base" in cached.stdout and "already evaluated" not in cached.stdout)
    import explain
    shown = run_main(explain.main, [run, "--samples", "1", "--out", tmp_path / "explained", "--quiet"])
    assert shown.returncode == 2 and "--other-base" in shown.stdout and not (tmp_path / "explained").exists()
    shown = run_main(explain.main, [run, "--samples", "1", "--out", tmp_path / "explained", "--quiet",
                                    "--other-base"])
    assert shown.returncode == 0, shown.stdout[-2000:]
    record = json.loads((tmp_path / "explained/explain.json").read_text())["settings"]
    assert record["base_check"] == "another base (--other-base)"
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})  # the weights back ...
    original = (base / "tokenizer_config.json").read_bytes()
    config = json.loads(original)
    (base / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 77}))  # ... but
    assert cli(*common, "steps=2", "resume=true").returncode == 2  # its tokenizer changed: another base
    (base / "tokenizer_config.json").write_bytes(original)
    (base / "notes.txt").write_text("a note beside the base is no change to it")
    assert cli(*common, "steps=2", "resume=true").returncode == 0


def test_pretraining_never_writes_over_a_base_unless_told():
    import compare
    for world in ("toyworld", "carryworld"):
        done = run_main(compare.main, ["pretrain", "--world", world])
        assert done.returncode == 2 and "already holds a base (the shipped base" in done.stdout, done.stdout
        assert "--replace" in done.stdout and f"data/{world}/base" in done.stdout


def test_the_data_command_remakes_the_shipped_files_and_never_writes_over_others_unless_told(tmp_path):
    """compare.py data used to rewrite a world's files in place, whatever they held. The generator is
    deterministic: it remakes the shipped files byte for byte, says so, and refuses to replace files that
    differ (a cut train.jsonl, say) unless --replace."""
    import compare
    for world in ("toyworld", "carryworld"):
        out = tmp_path / world
        made = run_main(compare.main, ["data", "--world", world, "--out", out])
        assert made.returncode == 0 and made.stdout.count(": written") == 2, made.stdout
        for split in ("train", "test"):
            shipped_file = ROOT / f"data/{world}/{split}.jsonl"
            assert (out / f"{split}.jsonl").read_bytes() == shipped_file.read_bytes()
        shipped = run_main(compare.main, ["data", "--world", world])  # the shipped folder: nothing to write
        assert shipped.returncode == 0 and shipped.stdout.count(": unchanged") == 2, shipped.stdout
    out = tmp_path / "toyworld"
    cut = "".join((out / "train.jsonl").read_text().splitlines(keepends=True)[:50])
    (out / "train.jsonl").write_text(cut)
    (out / "test.jsonl").unlink()
    refused = run_main(compare.main, ["data", "--world", "toyworld", "--out", out])
    assert refused.returncode == 2, refused.stdout
    assert "train.jsonl: 1950 of 2000 rows differ" in refused.stdout, refused.stdout
    assert "--replace" in refused.stdout and (out / "train.jsonl").read_text() == cut  # untouched
    assert not (out / "test.jsonl").exists()  # both files checked before either is written
    replaced = run_main(compare.main, ["data", "--world", "toyworld", "--out", out, "--replace"])
    assert "train.jsonl: replaced" in replaced.stdout and "test.jsonl: written" in replaced.stdout
    assert (out / "train.jsonl").read_bytes() == (ROOT / "data/toyworld/train.jsonl").read_bytes()
    into_a_file = run_main(compare.main, ["data", "--out", out / "train.jsonl"])
    assert into_a_file.returncode == 2 and "is a file" in into_a_file.stdout, into_a_file.stdout


def test_each_session_of_a_resumed_run_is_recorded_with_its_sampler(tmp_path):
    run_tiny(tmp_path, "steps=1", "save_every=1")
    run_tiny(tmp_path, "steps=2", "save_every=1", "resume=true", "rollout_engine=static")
    sessions = [json.loads(x) for x in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    assert [(s["from_step"], s["sampler"]) for s in sessions] == [(0, "dynamic"), (1, "static")]
    assert sessions[1]["changed"] == {"steps": [1, 2], "rollout_engine": ["dynamic", "static"]}
    assert sessions[0]["base_sha256"] == sessions[1]["base_sha256"] == \
        json.loads((tmp_path / "config.json").read_text())["base_sha256"]


def test_out_dir_tilde_is_the_home_folder_named_in_full(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".bashrc").write_text("mine")
    assert make_config("tiny", ["out_dir=~/runs/a"]).out_dir == str(tmp_path / "runs/a")
    with pytest.raises(PopsdError, match=f"^{tmp_path} is not a popsd run folder"):
        run_tiny("~", "steps=1", "overwrite=true")
    assert snapshot(tmp_path) == {".bashrc": b"mine"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message")
def test_a_gpu_recipe_on_a_cpu_machine_says_so_at_once(tmp_path):
    import time
    t0 = time.time()
    out = cli("--recipe", "single_gpu", f"out_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "no CUDA GPU" in out.stdout and "--recipe toy" in out.stdout
    assert time.time() - t0 < 30 and not (tmp_path / "r").exists()  # before the hub, the data or the folder


def test_a_question_holding_a_field_name_or_a_control_token_stays_text(tiny, capsys):
    from rollout import fill
    assert fill("Q: {question}\nR: {reference}", question="what is {reference}?", reference="42") == \
        "Q: what is {reference}?\nR: 42"  # one pass: the reference does not land inside the question
    tok, _ = tiny
    cfg = make_config("tiny", ["out_dir=unused"])
    kept, _ = session.prepare_contexts([("fine", "ok"), ("a <|im_end|> b", "ok")], tok, cfg)
    assert (len(kept) == 2
            and "data row 2 holds the chat template's control token(s) <|im_end|>" in capsys.readouterr().out)


def test_the_step_line_shows_small_numbers_the_rate_and_an_eta():
    row = {"step": 3, "loss": 2.1e-5, "lr": 1e-3, "grad_norm": 1.5e-4, "completion_len": 40.0, "entropy": 1.2,
           "markers_per_1k": 18.0, "time_step": 1.0}
    line = session.step_line(row, 28, pace=5.0)  # 5 s per step, 25 steps left
    assert "loss 2.10e-05" in line and "|g| 1.50e-04" in line and "5.0 s/step  eta 00:02:05" in line
    assert "2.50 step/s  eta 00:00:10" in session.step_line(row, 28, pace=0.4)
    assert "eta 1d 00:00:25" in session.step_line(row, 28, pace=(86400 + 25) / 25)  # a paper-scale run: days
    assert "eta" not in session.step_line(row, 28)


def test_prompt_settings_travel_with_the_adapter_and_the_toy_base_evaluates_with_no_flags(tmp_path):
    import shutil
    run = cli("--recipe", "toy", "steps=1", "eval_every=0", "batch_size=2", "micro_batch_size=2",
              f"out_dir={tmp_path / 'run'}")
    assert run.returncode == 0, run.stdout[-2000:]
    saved = json.loads((tmp_path / "run/adapter/popsd_prompts.json").read_text())
    assert saved["student_template"] == "Q:{question}" and saved["student_thinking"] is False
    assert (tmp_path / "run/checkpoints/step_000001/popsd_prompts.json").exists()
    shutil.copytree(tmp_path / "run/adapter", tmp_path / "copied")  # away from the run's config.json
    common = ["--bench", ROOT / "data/toyworld/test.jsonl", "--question-field", "question", "--grader",
              "toyworld", "--n", "1", "--limit", "16", "--temperature", "1", "--top-p", "1",
              "--max-new-tokens", "128", "--dtype", "fp32"]
    for what, name in ((["--adapter", tmp_path / "copied"], "a"),
                       (["--model", ROOT / "data/toyworld/base"], "b")):
        ev = run_main(E.main, [*what, *common, "--out", tmp_path / name])
        assert ev.returncode == 0 and "thinking mode: on" not in ev.stdout, ev.stdout[-2000:]
        acc = json.loads((tmp_path / name / "summary.json").read_text())["results"]["test"]["avg@1"]
        assert acc > 0.5, (what, acc)  # the base's own prompt: ~0.9 (the wrong prompt scored 0-10%)
    bad = run_main(E.main, ["--model", ROOT / "data/toyworld/base", *common, "--template", "no field"])
    assert bad.returncode == 2 and "has no {question} field" in bad.stdout


def test_bad_bytes_a_bom_duplicate_keys_and_huge_numbers_are_clear(tmp_path):
    rows = [b'{"problem": "1+1?", "solution": "2"}', b'{"problem": "caf\xe9?", "solution": "3"}',
            b'{"problem": "2+2?", "solution": "4"}']
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")  # a BOM, then a Latin-1 byte on line 2
    with pytest.raises(PopsdError, match=r"bad.jsonl line 2: not UTF-8 text"):
        data.read_rows(str(bad), "train", ("problem", "solution"))
    got, skipped = data.read_rows(str(bad), "train", ("problem", "solution"), skip_bad=True)
    assert got == [("1+1?", "2"), ("2+2?", "4")] and skipped == 1  # the BOM is not part of line 1
    with pytest.raises(PopsdError, match="'steps' is given twice"):
        make_config("tiny", ["steps=0", "steps=2"])
    with pytest.raises(PopsdError, match="'seed' must be between 0 and 2"):
        make_config("tiny", [f"seed={10 ** 30}"])
    with pytest.raises(PopsdError, match="'threads' must be at most"):
        make_config("tiny", ["threads=100000"])


def test_max_new_tokens_beyond_the_models_positions_is_cut_with_a_warning(tmp_path):
    ev = run_main(E.main, ["--model", ROOT / "data/toyworld/base", "--bench",
                           ROOT / "data/toyworld/test.jsonl", "--question-field", "question", "--grader",
                           "toyworld", "--n", "1", "--limit", "2",
                           # the default 32768 against 512 positions
                           "--dtype", "fp32", "--out", tmp_path / "e"])
    assert ev.returncode == 0 and "exceeds the model's 512 positions: cut to" in ev.stdout, ev.stdout[-2000:]
    settings = json.loads((tmp_path / "e/summary.json").read_text())["settings"]
    assert settings["max_new_tokens"] == 32768 and settings["max_new_tokens_run"] < 512  # asked, and what ran


def test_a_crafted_adapter_config_is_a_clear_error(tmp_path, tiny_dir):
    import shutil
    run_tiny(tmp_path / "run", "steps=1", f"model={tiny_dir}")
    five = ROOT / "tests/data/five_questions.jsonl"
    for change, message in (({"r": 4}, "does not fit"), ({"target_modules": ["nope"]}, "does not fit"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"r": "x"}, "rank r must be")):
        bad = tmp_path / f"bad_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "run/adapter", bad)
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps(config | change))
        out = run_main(E.main, ["--adapter", bad, "--model", tiny_dir, "--bench", five, "--n", "1", "--limit",
                                "1", "--max-new-tokens", "4", "--dtype", "fp32", "--out", bad / "eval"])
        assert out.returncode == 2 and message in out.stdout and "Traceback" not in out.stdout, (change,
                                                                                                 out.stdout)


def test_a_server_that_accepts_but_never_answers_is_named_in_bounded_time(tmp_path):
    """It used to hang eval.py --server and rollout_server with no output (up to an hour per request)."""
    from conftest import StallingProxy
    with StallingProxy() as hung:  # accepts every connection, answers nothing
        ev = run_main(E.main, ["--server", hung.url, "--served-model", "m", "--model",
                               ROOT / "data/toyworld/base", "--bench", ROOT / "data/toyworld/test.jsonl",
                               "--question-field", "question", "--server-timeout", "2", "--out",
                               tmp_path / "e"])
        said = (f"the server at {hung.url} accepted the connection but answered nothing to /v1/models "
                "within 2 s")
        assert ev.returncode == 2 and said in ev.stdout, ev.stdout[-2000:]
        run = cli("--recipe", "toy", f"rollout_server={hung.url}", "server_timeout=2",
                  f"out_dir={tmp_path / 'r'}")
        assert run.returncode == 2 and "no rollout server answered" in run.stdout and "answered nothing" in \
            run.stdout, run.stdout[-2000:]


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    import signal
    proc = subprocess.Popen([sys.executable, str(ROOT / "popsd.py"), "--recipe", "toy",
                             f"out_dir={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    while "popsd config" not in seen and proc.poll() is None:  # the start-up table: the model is loaded
        seen += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert (proc.returncode == 130 and "Traceback" not in seen + rest and "KeyboardInterrupt" not in seen
            + rest), rest


def test_bad_devices_a_malformed_server_and_plot_paths_are_one_line(tmp_path):
    import http.server
    import threading
    import plots
    assert "must be auto, cpu, cuda or cuda:N" in cli("--recipe", "tiny", "device=nosuch").stdout
    ev = run_main(E.main, ["--model", ROOT / "data/toyworld/base", "--bench",
                           ROOT / "data/toyworld/test.jsonl", "--question-field", "question", "--device",
                           "nosuch", "--out", tmp_path / "e"])
    assert ev.returncode == 2 and "device 'nosuch' is not a device" in ev.stdout
    assert "--top-k must be >= 0" in run_main(E.main, ["--model", "x", "--top-k", "-5"]).stdout

    # /v1/models answers a JSON list, not OpenAI's object
    class ListModels(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'["toy"]')

        def log_message(self, *args):
            pass
    httpd = http.server.HTTPServer(("127.0.0.1", 0), ListModels)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}"
        ev = run_main(E.main, ["--server", url, "--served-model", "toy", "--model",
                               ROOT / "data/toyworld/base", "--bench", ROOT / "data/toyworld/test.jsonl",
                               "--question-field", "question", "--out", tmp_path / "s"])
        assert ev.returncode == 2 and "answered /v1/models with \"['toy']\"" in ev.stdout, ev.stdout[-2000:]
        assert "Traceback" not in ev.stdout, ev.stdout[-2000:]
    finally:
        httpd.shutdown()
    run_tiny(tmp_path / "run", "steps=1")
    for out in ("README.md", "/nonexistent_dir/x.png"):
        done = run_main(plots.main, [tmp_path / "run", "--out", out])
        assert done.returncode == 2 and "a .png file in a folder that exists" in done.stdout + done.stderr
    assert not Path("/nonexistent_dir").exists()
    run_tiny(tmp_path / "other", "steps=1")
    assert run_main(plots.main, [tmp_path / "run", tmp_path / "other"]).returncode == 0
    assert (tmp_path / "plots.png").exists()  # the folder holding both runs, not the working directory


def test_eval_py_writes_only_into_its_own_folders_checked_before_any_work(tmp_path):
    run = tmp_path / "run"
    run_tiny(run, "steps=1")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "samples.jsonl").write_text("someone's\n")
    common = ["--adapter", run / "adapter", "--bench", ROOT / "data/toy_math_test.jsonl", "--n", "1",
              "--limit", "2", "--max-new-tokens", "4", "--dtype", "fp32"]
    for out, said in ((theirs, "holds no evaluation of eval.py's"), (ROOT / "README.md", "is a file"),
                      (run, "which this evaluation reads"), (run / "adapter", "which this evaluation reads"),
                      (ROOT / "data/toyworld/base", "is a training run, a model"),
                      (ROOT, "which this evaluation reads")):
        done = run_main(E.main, [*common, "--out", out])
        assert done.returncode == 2 and said in done.stdout and "Traceback" not in done.stdout, (out,
                                                                                                 done.stdout)
        assert "eval " not in done.stdout  # refused before any sampling
    assert (theirs / "samples.jsonl").read_text() == "someone's\n"
    mine = tmp_path / "mine"
    assert run_main(E.main, [*common, "--out", mine]).returncode == 0 and (mine / "popsd_eval.json").exists()
    assert "already evaluated" in run_main(E.main, [*common, "--out", mine]).stdout


# ---- 8. round four: the lock, the data, resume from any stop, a full disk at an evaluation, the record

def _hold_lock(folder, index, barrier, holders, overlaps, rounds, stale):
    """One racer: each round, on the barrier, take the lock (or be refused), hold it a moment, release; with
    stale, racer 0 then leaves a dead run's lock for the next round."""
    from plumbing.checkpoints import LOCK, RunLock
    for _ in range(rounds):
        barrier.wait()
        try:
            lock = RunLock(folder, warn=lambda m: None).acquire()
        except PopsdError:
            lock = None
        if lock is not None:
            with holders.get_lock():
                holders.value += 1
                if holders.value > 1:
                    overlaps.value += 1
            time.sleep(0.005)
            with holders.get_lock():
                holders.value -= 1
            lock.release()
        barrier.wait()
        if stale and index == 0:
            (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 7,
                                                   "start": "1", "since": "long ago"}))
        barrier.wait()


@pytest.mark.parametrize("stale", [False, True])
def test_two_runs_started_at_once_never_both_hold_the_lock(tmp_path, stale):
    """Two processes released together by a barrier take the run folder's lock, 120 times, on a fresh folder
    and on a dead run's lock: never both. (Before: the lock was created empty and written a moment later, and
    a racer that read it in between took it for stale: 2 and 5 overlaps in 100.)"""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    barrier, holders, overlaps = ctx.Barrier(2), ctx.Value("i", 0), ctx.Value("i", 0)
    procs = [ctx.Process(target=_hold_lock, args=(tmp_path, i, barrier, holders, overlaps, 120, stale))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs) and overlaps.value == 0


def test_a_lock_taken_but_not_yet_written_is_not_taken_over(tmp_path):
    """The moment between a run taking the lock and writing its name in it: another run must be refused, not
    read the empty file as a dead run's. (Before: it took the lock over.)"""
    import fcntl
    lock = tmp_path / checkpoints.LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # taken, its contents not written yet
    try:
        with pytest.raises(PopsdError, match="in use by another run"):
            checkpoints.RunLock(tmp_path, warn=lambda m: None).acquire()
    finally:
        os.close(fd)
    checkpoints.RunLock(tmp_path, warn=lambda m: None).acquire().release()  # released: free


def test_a_training_file_changed_between_sessions_is_refused_unless_told(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text((ROOT / "data/toy_math.jsonl").read_text())
    run = tmp_path / "run"
    run_tiny(run, "steps=2", f"data={data}")
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:-3]))  # three rows fewer
    before = snapshot(run)
    with pytest.raises(PopsdError, match=r"training data changed since the run started \(.*train.jsonl: "
                                         r"\d+ rows → \d+, checksum"):
        run_tiny(run, "steps=3", f"data={data}", "resume=true")
    assert snapshot(run) == before  # nothing changed
    run_tiny(run, "steps=3", f"data={data}", "resume=true", "resume_data_changed=true")
    sessions = [json.loads(x) for x in (run / "sessions.jsonl").read_text().splitlines()]
    assert "data_sha256" in sessions[-1]["changed"] and "data_rows" in sessions[-1]["changed"]


def test_a_stop_before_the_first_step_resumes_as_the_straight_run(tmp_path):
    """SIGTERM while step 1 samples: the checkpoint "at step 0" resumes to the straight run, bit for bit, and
    its step-0 evaluation is not run (nor logged) twice. (Before: AdamW's state was initialised by a zero-lr
    step as the checkpoint was saved, so the resumed optimizer counted a step more: the runs parted from step
    2 on.)"""
    args = ["--recipe", "tiny", "steps=3", "save_every=0", "eval_every=3", "batch_size=64",
            "gen_batch_size=1"]
    straight = run_tiny(tmp_path / "straight", *args[2:])
    proc = popsd_process(*args, f"out_dir={tmp_path / 'stopped'}")
    deadline = time.time() + 120
    while not (tmp_path / "stopped/eval/step_000000").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # step 1 is sampling
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert "stopped while sampling step 1" in output and "saved at step 0" in output, output[-2000:]
    stopped = run_tiny(tmp_path / "stopped", *args[2:], "resume=true")
    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, stopped))
    assert [r["step"] for r in b] == [0, 1, 2, 3]  # the step-0 evaluation once
    keys = ("loss", "grad_norm", "eval/toy_math_test/avg@2")
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    x, y = (load_file(d / "adapter/adapter_model.safetensors") for d in (straight, stopped))
    assert all(torch.equal(x[k], y[k]) for k in x)


def popsd_process(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "popsd.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_full_disk_at_an_evaluation_is_one_line_and_keeps_the_step(small_disk, tiny_dir):
    """The evaluation's files are written as a checkpoint is (to a .tmp folder, then renamed): a full disk
    there leaves no half-written samples.jsonl, is said in one line, and the step is kept if there is room
    for its checkpoint. (Before: a traceback, a half-written samples.jsonl beside a whole summary.json, and
    every step since the last checkpoint lost.)"""
    subprocess.run(["mount", "-o", "remount,size=3m", str(small_disk)], check=True)
    out = small_disk / "run"
    # an evaluation's files ~180 KB, a checkpoint ~75 KB (LoRA rank 1)
    big = ["eval_every=1", "eval_n=120", "eval_limit=8", "eval_max_new_tokens=32", "lora_r=1", "lora_alpha=2"]
    ballast = small_disk / "ballast"

    def fill():  # after the step-0 evaluation: room for a checkpoint, not for another evaluation
        deadline = time.time() + 120
        while not (out / "eval/step_000000/samples.jsonl").exists() and time.time() < deadline:
            time.sleep(0.01)
        free = shutil.disk_usage(small_disk).free
        ballast.write_bytes(b"\0" * max(free - (130 << 10), 0))
    import threading
    filler = threading.Thread(target=fill)
    filler.start()
    with pytest.raises(PopsdError, match=r"is full .* while writing the evaluation's files \(step_000001\).*"
                                         r"checkpoint saved at step 1"):
        run_tiny(out, "steps=2", "save_every=0", f"model={tiny_dir}", *big)
    filler.join()
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_000000"]  # no step_000001(.tmp)
    assert checkpoints.checkpoint_problem(out / "checkpoints/step_000001") is None
    ballast.unlink()
    run_tiny(out, "steps=2", "save_every=0", f"model={tiny_dir}", *big, "resume=true")
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_resume_of_a_finished_run_asking_for_fewer_steps_changes_nothing(tmp_path):
    run_tiny(tmp_path, "steps=3")
    before = snapshot(tmp_path)
    done = cli("--recipe", "tiny", "eval_every=0", "steps=2", "resume=true", f"out_dir={tmp_path}")
    assert done.returncode == 0 and "done up to step 3 (steps=2 asks for no more)" in done.stdout
    assert snapshot(tmp_path) == before  # config.json still says 3 steps


def test_recipe_is_chosen_with_dash_dash_recipe_and_a_dangling_link_out_dir_is_one_line(tmp_path):
    done = cli("--recipe", "toy", "recipe=carry", f"out_dir={tmp_path / 'x'}")
    assert done.returncode == 2 and "a recipe is chosen with --recipe carry" in done.stdout
    assert not (tmp_path / "x").exists()
    link = tmp_path / "gone"
    link.symlink_to(tmp_path / "nowhere")
    done = cli("--recipe", "tiny", "steps=1", f"out_dir={link}")
    assert done.returncode == 2 and "is a symbolic link to" in done.stdout and "Traceback" not in done.stdout


def test_plots_never_writes_over_a_file_it_did_not_write(tmp_path):
    import plots
    for name in ("a", "b"):
        run_tiny(tmp_path / "runs" / name, "steps=2")
    mine = tmp_path / "runs/plots.png"
    mine.write_bytes(b"my own figure")
    done = run_main(plots.main, [tmp_path / "runs/a", tmp_path / "runs/b"])
    assert done.returncode == 2 and "plots.py did not write it" in done.stdout + done.stderr
    assert mine.read_bytes() == b"my own figure"
    own = (tmp_path / "runs/a/plots.png").read_bytes()  # run a's own figure (popsd wrote it, marked)
    assert run_main(plots.main, [tmp_path / "runs/a", tmp_path / "runs/a"]).returncode == 0  # run a once
    assert plots.ours(tmp_path / "runs/a/plots.png") and len(own) > 1000
    done = run_main(plots.main, [tmp_path / "runs/a", tmp_path / "runs/a/../a"])
    assert done.returncode == 0


def test_a_run_that_diverges_from_an_extreme_setting_names_it_and_no_checkpoint_that_is_not_there():
    """beta=1e-45 makes every target non-finite: the stop names beta, not lr or max_grad_norm, and says that
    no checkpoint was saved yet (before: "lower lr ... resume from the last checkpoint": there was none)."""
    cfg = make_config("tiny", ["beta=1e-45"])
    row = {"step": 3, "skipped": True, "loss": float("nan"), "grad_norm": float("nan"), "lr": 1e-3}
    stalls, _, stop = guards.health(dict(row), 2, 512, cfg, saved=None)
    assert stalls == 3 and "beta=1e-45" in stop and "lower lr" not in stop
    assert "no checkpoint was saved yet" in stop
    _, _, stop = guards.health(dict(row), 2, 512, make_config("tiny"), saved=2)
    assert "lower lr or max_grad_norm" in stop and "last checkpoint (step 2)" in stop
