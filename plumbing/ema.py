"""ema.py: the EMA teacher (teacher=ema): a second LoRA adapter in the same peft model, an exponential moving
average of the trained one, used by the teacher and reference-only passes (the clean base stays the initial
policy, LoRA off). After every optimizer step, for the LoRA factors A and B separately (not their product):

    θ_T ← (1 − rate)·θ_T + rate·θ          rate = ema_rate (TRL's default 0.05; OPSD's decay 0.999 is 0.001)

The EMA adapter never trains and is never the active adapter outside `active`: peft's set_adapter moves
requires_grad to the adapter it activates, so `active` switches the layers' active adapter directly.
Under FSDP2 the EMA factors are sharded like the trained ones, and the update is elementwise on the shards.
"""
from contextlib import contextmanager

import torch

NAME = "ema"


def add(model):
    """Adds the EMA adapter, a frozen copy of the trained one (at the start: the initial policy)."""
    trained = model.active_adapter
    model.add_adapter(NAME, model.peft_config[trained])
    with torch.no_grad():
        for target, source in pairs(model):
            target.copy_(source)
            target.requires_grad_(False)
    assert model.active_adapter == trained and not any(p.requires_grad for _, p in named(model))


def named(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if f".{NAME}." in n]


def pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(EMA factor, trained factor) pairs, matched by name."""
    params = dict(model.named_parameters())
    trained = model.active_adapter
    return [(p, params[n.replace(f".{NAME}.", f".{trained}.")]) for n, p in named(model)]


@torch.no_grad()
def update(model, rate: float):
    """θ_T ← (1 − rate)·θ_T + rate·θ (torch.lerp: exact at rate 1)."""
    for target, source in pairs(model):
        target.lerp_(source.detach(), rate)


@contextmanager
def active(model):
    """Inside, every LoRA layer runs the EMA adapter instead of the trained one; requires_grad untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [NAME]
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m._active_adapter = s


def state(model) -> dict:
    """The EMA factors, whole, on the CPU ({} without an EMA adapter). Under FSDP every rank must call it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in named(model)}


def load(model, saved: dict):
    """Restores state(model)'s dict, under any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    missing = {n for n, _ in named(model)} - set(saved)
    if missing:
        raise KeyError(f"the checkpoint holds no EMA teacher factor {sorted(missing)[0]}")
    set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))


def megabytes(model) -> float:
    return sum(p.numel() * p.element_size() for _, p in named(model)) / 2 ** 20
