"""checkpoints.py: a run's state on disk: its folder, its checkpoints, and resuming it safely.

A run folder belongs to one run: a second run into it is refused (resume=true continues it,
overwrite=true replaces it). Resuming checks the new config against the run's saved one before
anything on disk changes. Checkpoints are verified before use: a damaged one is skipped with a warning
(and kept for inspection). Everything is read as data only (safetensors, JSON, torch weights_only):
a checkpoint from someone else cannot run code. Weights and optimizer state are gathered whole from
FSDP shards and keyed by parameter name, so a checkpoint resumes under any number of ranks.
"""
import json
import os
import random
import shutil
from pathlib import Path

import torch

import distributed as D
from data import DataStream, PopsdError

RUN_FILES = ("config.json", "metrics.jsonl", "samples.txt", "plots.png", "adapter", "checkpoints", "eval",
             "tiny_model")  # what a run writes into its folder: all overwrite=true removes
MAY_CHANGE = {  # config fields a resumed run may change: run control, evaluation, speed knobs
    "steps", "save_every", "keep_checkpoints", "resume", "overwrite", "samples_per_step", "threads", "device",
    "gen_batch_size", "micro_batch_size", "loss_chunk_mb", "rollout_engine", "sample_gathered", "recipe", "out_dir",
    "rollout_server", "rollout_adapter_dir", "rollout_concurrency", "vllm_gpu_memory", "vllm_kv_cache_gb",
    "vllm_enforce_eager",
    "eval_every", "eval_bench", "eval_fields", "eval_n", "eval_limit", "eval_max_new_tokens", "eval_temperature",
    "eval_top_p", "eval_grader"}


def trainable_state(model) -> dict:
    """The trainable (LoRA) weights by parameter name, whole, on the CPU. Under FSDP every rank must call it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, weights: dict, folder: Path):
    """An adapter in PEFT format (adapter_config.json + adapter_model.safetensors) for a sampling engine."""
    model.save_pretrained(folder, state_dict=weights)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card: not needed by an engine


def check_finite(weights: dict):
    """A non-finite adapter is never saved."""
    bad = [n for n, w in weights.items() if not torch.isfinite(w).all()]
    if bad:
        raise PopsdError(f"the adapter holds non-finite values ({bad[0]}{' and more' if len(bad) > 1 else ''}): "
                         "not saved; the run diverged (lower lr or max_grad_norm)")


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, stream: DataStream, keep: int, rank: int = 0):
    """Adapter (PEFT format) + optimizer, scheduler, step, RNG and data position; written to .tmp, then renamed.

    Every checkpoint keeps its adapter (the paper reports the best of several steps); the resume state
    (state.pt: optimizer and RNG, the bulk for a large adapter) is kept for the newest `keep` only.
    Weights and optimizer state are saved whole (gathered from the FSDP shards, keyed by parameter name),
    so a checkpoint resumes under any number of ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    weights = trainable_state(model)
    check_finite(weights)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = D.gather({"python": random.getstate(), "torch": torch.get_rng_state(),
                  "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
    final = out / "checkpoints" / f"step_{step:06d}"
    if rank == 0:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        torch.save({"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(),
                    "data": {"epoch": stream.epoch, "cursor": stream.cursor}, "rng": rng}, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted((out / "checkpoints").glob("step_??????"))[:-keep]:  # every adapter stays: the best
            (old / "state.pt").unlink(missing_ok=True)  # step is chosen later; only resume state is pruned
    D.barrier()
    return final


def latest_checkpoint(out: Path, warn=print) -> Path | None:
    """The newest checkpoint that can be resumed (adapter and state, both readable); damaged ones are skipped
    with a warning and left in place. None when there is none; an error when every one is damaged."""
    found = sorted(p for p in (out / "checkpoints").glob("step_??????") if (p / "state.pt").exists())
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warn(f"warning: skipping the damaged checkpoint {path} ({problem}); it is left there for inspection")
    if found:
        raise PopsdError(f"every checkpoint in {out / 'checkpoints'} is damaged (see the warnings above): start "
                         "afresh with overwrite=true, or another out_dir")
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed (unreadable adapter or state), or None."""
    from safetensors.torch import load_file
    try:
        load_file(path / "adapter_model.safetensors")
    except Exception as e:
        return f"adapter_model.safetensors: {str(e).splitlines()[0][:200]}"
    try:
        state = torch.load(path / "state.pt", weights_only=True)
        assert {"step", "optimizer", "scheduler", "data", "rng"} <= set(state), "fields missing"
    except Exception as e:
        return f"state.pt: {str(e).splitlines()[0][:200]}"
    return None


def prepare_run_folder(out: Path, config: dict, resume: bool, overwrite: bool, warn=print) -> Path | None:
    """Checks the run folder before anything in it changes; returns the checkpoint to resume, or None.

    A folder holding another run is refused unless resume=true (then the new config must agree with the
    saved one on every field outside MAY_CHANGE) or overwrite=true (the run's files are removed)."""
    held = [f for f in RUN_FILES if (out / f).exists()]
    if not held:
        if resume:
            warn(f"resume=true: {out} holds no run, starting afresh")
        return None
    if overwrite and not resume:
        for f in held:
            shutil.rmtree(out / f) if (out / f).is_dir() else (out / f).unlink()
        warn(f"overwrite=true: removed the previous run's {', '.join(held)} from {out}")
        return None
    if not resume:
        raise PopsdError(f"{out} already holds a run ({', '.join(held)}): continue it with resume=true, write this "
                         "one elsewhere with out_dir=..., or replace it with overwrite=true")
    saved_path = out / "config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    changed = {k: (saved[k], v) for k, v in config.items() if k in saved and saved[k] != v}
    fixed = {k: ov for k, ov in changed.items() if k not in MAY_CHANGE}
    if fixed:
        raise PopsdError(f"resume=true: this config differs from the run's ({saved_path}) in fields that change the "
                         "model, the data order or the algorithm: " +
                         "; ".join(f"{k}: {o!r} → {n!r}" for k, (o, n) in fixed.items()) +
                         ". Use the run's values, or start a new run in another out_dir")
    for k, (o, n) in changed.items():
        if k not in ("resume", "overwrite"):
            warn(f"resume: {k} changes {o!r} → {n!r}")
    ckpt = latest_checkpoint(out, warn)
    if ckpt is None:
        raise PopsdError(f"resume=true: {out} holds a run ({', '.join(held)}) but no checkpoint to resume from: "
                         "replace it with overwrite=true, or use another out_dir")
    return ckpt


def load_checkpoint(path: Path, model, optimizer, scheduler, stream: DataStream, seed: int = 0, rank: int = 0,
                    world: int = 1) -> int:
    """Restores a checkpoint written under any number of ranks. Each rank's RNG state comes back when the
    world size is the same; under another world size each rank's sampling RNG is reseeded from (seed, step, rank)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    saved = load_file(path / "adapter_model.safetensors")  # PEFT leaves the adapter name out of the keys
    name = model.active_adapter
    weights = {n: saved[n.replace(f".{name}.", ".")] for n, p in model.named_parameters() if p.requires_grad}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    state = torch.load(path / "state.pt", weights_only=True)  # data only: a checkpoint cannot run code
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    stream.epoch, stream.cursor = state["data"]["epoch"], state["data"]["cursor"]
    if len(state["rng"]) == world:
        rng = state["rng"][rank]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:
        random.seed(seed + state["step"])
        torch.manual_seed(seed + 1000 * state["step"] + rank)
    return state["step"]
