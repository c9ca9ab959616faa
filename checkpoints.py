"""checkpoints.py: saving and restoring a run's state: LoRA adapter (PEFT format), optimizer, scheduler, RNG, data.

Weights and optimizer state are gathered whole from FSDP shards and keyed by parameter name, so a
checkpoint resumes under any number of ranks.
"""
import os
import random
import shutil
from pathlib import Path

import torch

import distributed as D
from data import DataStream


def trainable_state(model) -> dict:
    """The trainable (LoRA) weights by parameter name, whole, on the CPU. Under FSDP every rank must call it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, stream: DataStream, keep: int, rank: int = 0):
    """Adapter (PEFT format) + optimizer, scheduler, step, RNG and data position; written to .tmp, then renamed.

    Every checkpoint keeps its adapter (the paper reports the best of several steps); the resume state
    (state.pt: optimizer and RNG, the bulk for a large adapter) is kept for the newest `keep` only.
    Weights and optimizer state are saved whole (gathered from the FSDP shards, keyed by parameter name),
    so a checkpoint resumes under any number of ranks.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    weights = trainable_state(model)
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


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that can be resumed (adapter and state)."""
    found = sorted(p for p in (out / "checkpoints").glob("step_??????") if (p / "state.pt").exists())
    return found[-1] if found else None


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
    state = torch.load(path / "state.pt", weights_only=False)
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
