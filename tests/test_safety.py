"""Nothing lost, nothing run that should not be: run folders, resume checks, damaged and malicious checkpoints,
same seed same result, the divergence guard, clear errors for bad input (fuzzed)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import popsd
from checkpoints import latest_checkpoint
from conftest import ROOT
from data import PopsdError


def run_tiny(out, *overrides):
    return popsd.train(popsd.make_config("tiny", [f"out_dir={out}", "eval_every=0", *overrides]))


def cli(*args, cwd=ROOT):
    env = {**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "popsd.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


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
    assert [r["step"] for r in rows] == [1] and sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
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
    pickle.loads(pickle.dumps(0))  # (pickle itself is fine; torch.load(weights_only=True) refused the payload)


# ---- 4. the same seed gives the same run, whatever is already on disk

def test_same_command_twice_gives_the_same_run(tmp_path):
    run_tiny(tmp_path, "steps=2")
    first = ((tmp_path / "metrics.jsonl").read_text(), load_file(tmp_path / "adapter/adapter_model.safetensors"))
    run_tiny(tmp_path, "steps=2", "overwrite=true")  # the tiny model is rebuilt; RNG use must not depend on it
    second = ((tmp_path / "metrics.jsonl").read_text(), load_file(tmp_path / "adapter/adapter_model.safetensors"))
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
    assert [bool(r.get("collapse")) for r in rows] == [False, True, True, True]
    assert "looks collapsed" in capsys.readouterr().out
    cfg = popsd.make_config("tiny")
    base = {"step": 1, "skipped": False, "loss": 0.05, "grad_norm": 0.1, "entropy": 2.0, "lr": 1e-3}
    assert popsd.health(dict(base), 0, 512, cfg) == (0, None)
    for change in ({"entropy": 6.2}, {"grad_norm": 0.0}, {"loss": 0.66}):
        assert "collapsed" in popsd.health(dict(base, **change), 0, 512, cfg)[1]
    assert popsd.health(dict(base, skipped=True), 1, 512, cfg)[0] == 2
    assert popsd.health(dict(base), 2, 512, cfg)[0] == 0  # a good step resets the count


def test_lr_1e30_stops_with_a_clear_error_and_saves_no_broken_state(tmp_path):
    out = cli("--recipe", "tiny", f"out_dir={tmp_path}", "eval_every=0", "steps=8", "lr=1e30", "save_every=1")
    assert out.returncode == 2 and "the run diverged" in out.stdout and "Traceback" not in out.stdout, out.stdout
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "adapter").exists()


def test_non_finite_steps_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch):
    real = popsd.L.fused_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # from step 3 on (two micro-batches a step) the loss is NaN
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan"), stats) if calls["n"] > 4 else (loss, stats)
    monkeypatch.setattr(popsd.L, "fused_loss", poisoned)
    with pytest.raises(PopsdError, match="3 steps in a row had a non-finite loss"):
        run_tiny(tmp_path, "steps=8", "save_every=1")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]  # logged, then stopped
    for ckpt in (tmp_path / "checkpoints").iterdir():  # the skipped steps changed no weights: all finite
        assert all(torch.isfinite(w).all() for w in load_file(ckpt / "adapter_model.safetensors").values())
    a4, a5 = (load_file(tmp_path / f"checkpoints/step_00000{i}/adapter_model.safetensors") for i in (2, 4))
    assert all(torch.equal(a4[k], a5[k]) for k in a4)  # step 2 → 4: two skipped updates, no change
    assert latest_checkpoint(tmp_path).name == "step_000004"
