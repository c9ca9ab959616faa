"""popsd.py: Purified OPSD (arXiv 2607.02234) in one training loop. Config, recipes, models, data, loop.

    python popsd.py --recipe tiny                     # CPU, under a minute, numbers mean nothing
    python popsd.py --recipe single_gpu               # one 24 GB card, 4-bit QLoRA
    python popsd.py --recipe tiny steps=3 lr=1e-4     # key=value overrides any Config field

Each step: sample → score → target → loss → step → log → save.
  1. the student (base + LoRA) samples ŷ from the question alone;
  2. three frozen passes of the same weights, LoRA disabled, score every position of ŷ:
     teacher (question + reference), reference-only (reference), clean base (question);
  3. the target is the Purified PMI target (or π_T for method=opsd), see loss.py;
  4. the loss is the per-token divergence summed over tokens, divided by the number of valid
     completion tokens of the whole optimizer step, so micro-batching does not change the update.
Departures from the paper: HF generate instead of vLLM; teacher=live applies to the teacher and
reference-only passes, the clean base stays the frozen initial policy.
"""
import dataclasses
import difflib
import json
import logging
import math
import os
import random
import runpy
import shutil
import signal
import sys
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import distributed as D
import eval as E
import loss as L
import plots
from data import DataStream, PopsdError, build_tiny_model, model_load_error, read_rows
from rollout import (REFONLY_TEMPLATE, STUDENT_TEMPLATE, TEACHER_TEMPLATE, Rollout, build_contexts,
                     check_templates, completion_hidden, marker_counts, sample)

ROOT = Path(__file__).resolve().parent
console = Console()
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional hub kernel, not needed
warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")


@dataclass
class Config:
    # model
    model: str = "Qwen/Qwen3-8B"  # HF id or local dir; "tiny" builds a random-init tiny Qwen3 from the data
    trust_remote_code: bool = False  # run code shipped with hub models (off: safer)
    dtype: str = "bf16"  # bf16 | fp32: weights and activations
    load_in_4bit: bool = False  # QLoRA: nf4 weights, double quantisation, bf16 compute (bitsandbytes)
    gradient_checkpointing: bool = True  # recompute activations in the student backward (off while sampling)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    lora_r: int = 64  # LoRA rank (paper: 64)
    lora_alpha: int = 128  # LoRA alpha (paper: 128)
    lora_dropout: float = 0.0  # LoRA dropout
    lora_targets: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    # data
    data: str = "siyanzhao/Openthoughts_math_30k_opsd"  # hub dataset id, or a local .jsonl/.json/.parquet
    data_split: str = "train"  # split of a hub dataset
    question_field: str = "problem"  # field holding the question q
    reference_field: str = "solution"  # field holding the reference solution r
    skip_bad_rows: bool = False  # skip (and count) rows with a missing/empty field instead of stopping
    max_prompt_len: int = 4096  # rows whose longest context is longer (tokens) are skipped and counted
    # prompts: {question} and {reference} are replaced; thinking mode is passed to the chat template
    student_template: str = STUDENT_TEMPLATE  # student and clean base
    teacher_template: str = TEACHER_TEMPLATE  # teacher: question + reference
    refonly_template: str = REFONLY_TEMPLATE  # reference-only teacher: no question
    student_thinking: bool = False  # enable_thinking for the student and clean base contexts
    teacher_thinking: bool = False  # enable_thinking for the teacher and reference-only contexts
    # sampling
    n_samples: int = 1  # rollouts per prompt (paper: 1)
    max_new_tokens: int = 1024  # completion budget (paper: 1024)
    temperature: float = 1.1  # sampling temperature
    top_p: float = 0.95  # nucleus sampling
    top_k: int = 20  # top-k sampling (0: off)
    gen_batch_size: int = 32  # sequences per generate call
    # algorithm
    method: str = "purified"  # purified (PMI target) | opsd (target = teacher)
    teacher: str = "frozen"  # frozen (LoRA disabled) | live (current weights, detached)
    divergence: str = "jsd"  # jsd | forward_kl | reverse_kl
    jsd_beta: float = 0.5  # JSD mixture weight of the target
    beta: float = 1.0  # β: KL strength of the PMI target
    clip: float | None = 10.0  # c: soft clip of the centred PMI (none: no clip)
    loss_temperature: float | None = None  # τ dividing all logits in the loss (none: the sampling temperature)
    token_clip: float | None = None  # clamp each (token, vocab) term before the vocab sum (OPSD: 0.05)
    diagnostics: bool = True  # also run the reference-only pass under opsd, to log the signal cosines
    loss_impl: str = "fused"  # fused (chunked, memory flat in N) | reference (materialised logits, readable)
    loss_chunk_mb: int = 512  # fused: memory for one chunk's [tokens, V] float32 buffers
    # optimisation
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # prompts per optimizer step
    micro_batch_size: int = 4  # sequences per forward/backward
    lr: float = 5e-6  # AdamW learning rate
    lr_schedule: str = "constant"  # constant | cosine (to 0), after linear warm-up
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    optim: str = "adamw"  # adamw | paged_adamw_8bit (bitsandbytes: 8-bit states, paged out under memory pressure)
    max_grad_norm: float = 0.1  # gradient-norm clip (OPSD: 0.1)
    seed: int = 0  # seeds data order, LoRA init and sampling
    # evaluation (eval.py) on held-out benchmarks: before step 1, every eval_every steps and at the end
    eval_every: int = 0  # steps between evaluations (0: off); logged as eval/<bench>/avg@<n> etc.
    eval_bench: str = "aime24,aime25,hmmt25"  # benchmark names (eval.BENCHMARKS) or local files, comma-separated
    eval_fields: str = "problem,answer"  # question and gold-answer fields of local benchmark files
    eval_n: int = 12  # samples per question (paper: avg@12)
    eval_limit: int = 0  # first K questions per benchmark (0: all)
    eval_max_new_tokens: int = 32768  # completion budget at evaluation
    eval_temperature: float = 0.6  # sampling temperature at evaluation
    eval_top_p: float = 0.95  # nucleus sampling at evaluation
    eval_grader: str = "math"  # math (math-verify on the last \boxed{}) | toyworld (the toy world's exact checker)
    # run
    recipe: str = ""  # set by --recipe
    out_dir: str = ""  # run folder (default runs/<recipe>)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in out_dir
    samples_per_step: int = 2  # completions written to samples.txt each step
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is often fastest for tiny models


CHOICES = {"loss_impl": ("fused", "reference"), "dtype": ("bf16", "fp32"), "method": ("purified", "opsd"),
           "teacher": ("frozen", "live"), "divergence": L.KINDS, "lr_schedule": ("constant", "cosine"),
           "optim": ("adamw", "paged_adamw_8bit"), "eval_grader": ("math", "toyworld")}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------- config

def coerce(key: str, value, typ, text: bool):
    """A CLI string (text=True) or a recipe's Python value → the field's type, or a PopsdError naming the key."""
    if isinstance(typ, types.UnionType):  # X | None
        if value is None or (text and value.lower() in ("none", "null")):
            return None
        typ = next(t for t in typ.__args__ if t is not type(None))
    try:
        if text and typ is not str:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return typ(value)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not typ:
            raise ValueError
        return value
    except ValueError:
        raise PopsdError(f"config key {key!r} expects {typ.__name__}, got {value!r}") from None


def set_field(cfg: Config, key: str, value, text: bool = False):
    if key not in FIELDS:
        near = difflib.get_close_matches(key, FIELDS, n=1)
        raise PopsdError(f"unknown config key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    setattr(cfg, key, coerce(key, value, FIELDS[key].type, text))


def load_recipe(name: str) -> dict:
    path = Path(name) if name.endswith(".py") else ROOT / "recipes" / f"{name}.py"
    if not path.exists():
        known = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
        raise PopsdError(f"recipe {name!r} not found at {path} (recipes: {', '.join(known)})")
    values = runpy.run_path(str(path))
    return {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def make_config(recipe: str = "", overrides: list[str] = ()) -> Config:
    """Defaults ← recipes/<recipe>.py ← key=value overrides, each checked against the Config fields."""
    cfg = Config(recipe=recipe)
    for key, value in (load_recipe(recipe) if recipe else {}).items():
        set_field(cfg, key, value)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise PopsdError(f"expected key=value, got {item!r}")
        set_field(cfg, key.strip(), value, text=True)
    validate(cfg)
    return cfg


def validate(cfg: Config):
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise PopsdError(f"config key {key!r} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in ("steps", "batch_size", "micro_batch_size", "n_samples", "max_new_tokens", "gen_batch_size",
                "max_prompt_len", "lora_r", "eval_n", "eval_max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise PopsdError(f"config key {key!r} must be at least 1, got {getattr(cfg, key)}")
    check_templates(cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    if len(cfg.eval_fields.split(",")) != 2:
        raise PopsdError(f"config key 'eval_fields' must be 'question_field,answer_field', got {cfg.eval_fields!r}")
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.recipe or 'default'}"


def derived_sizes(cfg: Config, n_examples: int) -> dict:
    seqs = cfg.batch_size * cfg.n_samples
    return {"prompts per step": cfg.batch_size, "sequences per step": seqs,
            "micro-batches per step": math.ceil(seqs / cfg.micro_batch_size), "total steps": cfg.steps,
            "usable prompts": n_examples, "epochs": round(cfg.steps * cfg.batch_size / max(n_examples, 1), 2)}


def print_config(cfg: Config, sizes: dict):
    table = Table(title=f"popsd config (recipe: {cfg.recipe or 'none'})", show_header=False, box=None)
    defaults = Config()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        text = repr(value) if len(repr(value)) < 70 else repr(value)[:67] + "..."
        table.add_row(f.name, f"[bold]{text}[/]" if value != getattr(defaults, f.name) else text)
    for k, v in sizes.items():
        table.add_row(f"[cyan]{k}[/]", f"[cyan]{v}[/]")
    console.print(table)


# ----------------------------------------------------------------------------- data

def prepare_contexts(rows, tokenizer, cfg: Config):
    """Tokenised contexts for every row; rows whose longest context exceeds max_prompt_len are skipped."""
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    kept, too_long = [], 0
    with progress() as bar:
        task = bar.add_task("tokenising prompts", total=len(rows))
        for q, r in rows:
            c = build_contexts(tokenizer, q, r, templates=templates, student_thinking=cfg.student_thinking,
                               teacher_thinking=cfg.teacher_thinking)
            if max(len(c.student), len(c.teacher), len(c.refonly)) > cfg.max_prompt_len:
                too_long += 1
            else:
                kept.append(c)
            bar.advance(task)
    if not kept:
        raise PopsdError(f"all {len(rows)} prompts are longer than max_prompt_len={cfg.max_prompt_len}")
    return kept, too_long


# ----------------------------------------------------------------------------- model

def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_model(cfg: Config, device: torch.device, path: str):
    """Tokenizer and base + LoRA (peft) model; teacher, ref-only and base are this model with LoRA disabled."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"dtype": torch.bfloat16 if cfg.dtype == "bf16" else torch.float32,
              "trust_remote_code": cfg.trust_remote_code}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise model_load_error(path, e) from None
    if not cfg.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        import bitsandbytes as bnb
        for m in model.modules():  # bnb repacks CPU weights at the first eval forward (sampling); training
            if isinstance(m, bnb.nn.Linear4bit):  # forwards then go through gemv_4bit, which has no backward
                m.support_avx512bf16_for_cpu = False
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    return tokenizer, model


def quantization_config():
    """QLoRA's 4-bit weights: nf4, double quantisation, bf16 compute (bitsandbytes)."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def make_optimizer(cfg: Config, params):
    if cfg.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def model_parts(model):
    """(body, head weight [V, H]) of a peft causal LM: the loss works from hidden states and the frozen head."""
    causal = model.get_base_model()
    body = getattr(causal, causal.base_model_prefix)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(causal.config, "final_logit_softcapping", None):
        raise PopsdError(f"{type(causal).__name__}: popsd needs logits = hidden @ head.weight.T (no bias, no softcap)")
    return body, head.weight


def eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted(set(ids) | {tokenizer.eos_token_id})


# ----------------------------------------------------------------------------- checkpoints

def trainable_state(model) -> dict:
    """The trainable (LoRA) weights by parameter name, whole, on the CPU. Under FSDP every rank must call it."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, stream: DataStream, keep: int, rank: int = 0):
    """Adapter (PEFT format) + optimizer, scheduler, step, RNG and data position; written to .tmp, then renamed.

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
        for old in sorted((out / "checkpoints").glob("step_??????"))[:-keep]:
            shutil.rmtree(old)
    D.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_??????"))
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


class StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. A second one stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step, then saving a checkpoint[/]")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- the loop

def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)))
    return 1.0


def frozen_hidden(model, body, part: Rollout, cfg: Config, pad_id: int):
    """The frozen passes of one micro-batch, no graph: (teacher, reference-only, clean base) hidden states [N, H]."""
    def hidden(role):
        return completion_hidden(body, [getattr(c, role) for c in part.contexts], part.completions, part.mask, pad_id)

    need_refonly = cfg.method == "purified" or cfg.diagnostics
    h_teacher = h_refonly = h_base = None
    model.eval()
    with torch.no_grad():
        with model.disable_adapter():  # LoRA off: the initial policy
            h_base = hidden("student") if cfg.method == "purified" else None
            if cfg.teacher == "frozen":
                h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
        if cfg.teacher == "live":  # current weights, detached
            h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
    return h_teacher, h_refonly, h_base


def student_loss(model, body, head, part: Rollout, frozen, cfg: Config, pad_id: int):
    """The student pass (LoRA on, with grad) and the loss against the target: (loss_sum, per-token stats)."""
    model.train()
    h_student = completion_hidden(body, [c.student for c in part.contexts], part.completions, part.mask, pad_id)
    kwargs = dict(method=cfg.method, kind=cfg.divergence, jsd_beta=cfg.jsd_beta, beta=cfg.beta, clip=cfg.clip,
                  token_clip=cfg.token_clip, temperature=cfg.loss_temperature or cfg.temperature)
    if cfg.loss_impl == "fused":
        return L.fused_loss(h_student, *frozen, head, chunk_mb=cfg.loss_chunk_mb, **kwargs)
    return L.reference_loss(h_student, *frozen, head, **kwargs)


def update(model, body, head, rollout: Rollout, cfg: Config, pad_id: int, params, optimizer, scheduler) -> dict:
    """Score, loss and backward per micro-batch, clip, step. The loss is normalised by the valid tokens of the
    whole step on all ranks, and FSDP sums gradients over ranks: the update does not depend on the world size."""
    n_tokens = int(D.all_sum([rollout.mask.sum().item()])[0])
    loss_sum, sums = 0.0, {}
    for i in range(0, len(rollout), cfg.micro_batch_size):
        part = rollout.select(slice(i, i + cfg.micro_batch_size))
        part_loss, stats = student_loss(model, body, head, part, frozen_hidden(model, body, part, cfg, pad_id),
                                        cfg, pad_id)
        (part_loss / n_tokens).backward()
        loss_sum += part_loss.item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP: DTensor
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    keys = sorted(sums)
    totals = D.all_sum([loss_sum, len(rollout), rollout.truncated.sum().item(), marker_counts(rollout.texts),
                      *(sums[k] for k in keys)])
    loss_sum, seqs, truncated, markers, *stat_sums = totals
    return {"loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm, "completion_len": n_tokens / seqs,
            "truncated": truncated / seqs, "tokens": n_tokens, "markers_per_1k": 1000 * markers / n_tokens,
            **{k: v / n_tokens for k, v in zip(keys, stat_sums)}}


def train(cfg: Config) -> Path:
    import transformers
    transformers.utils.logging.disable_progress_bar()  # rich bars are ours
    out = Path(cfg.out_dir)
    rank, world, device = D.setup(pick_device(cfg.device))
    console.quiet = E.console.quiet = rank != 0  # rank 0 prints, logs and saves; every rank samples and scores its share
    if cfg.batch_size % world:
        raise PopsdError(f"batch_size={cfg.batch_size} must be a multiple of the number of ranks ({world})")
    if world > 1 and cfg.load_in_4bit:
        raise PopsdError("load_in_4bit is the one-GPU path: under torchrun FSDP shards bf16 weights (load_in_4bit=false)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every rank

    rows, bad = read_rows(cfg.data, cfg.data_split, (cfg.question_field, cfg.reference_field), cfg.skip_bad_rows)
    path = cfg.model
    if cfg.model == "tiny":
        texts = [t for qr in rows for t in qr] + [cfg.student_template, cfg.teacher_template, cfg.refonly_template]
        path = str(build_tiny_model(out / "tiny_model", texts, cfg.seed) if rank == 0 else out / "tiny_model")
        D.barrier()  # rank 0 builds it, the others load it
    tokenizer, model = load_model(cfg, device, path)
    if world > 1:
        D.shard_model(model, device, bf16=cfg.dtype == "bf16")
        torch.manual_seed(cfg.seed + rank)  # each rank samples its own completions
    body, head = model_parts(model)
    examples, too_long = prepare_contexts(rows, tokenizer, cfg)
    benches = E.held_out_benches(cfg, rows) if cfg.eval_every else {}
    sizes = derived_sizes(cfg, len(examples)) | {"ranks": world, "bad rows skipped": bad,
                                                  "over-long prompts skipped": too_long}
    print_config(cfg, sizes)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    stream = DataStream(len(examples), cfg.seed)
    start = 0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        start = load_checkpoint(ckpt, model, optimizer, scheduler, stream, cfg.seed, rank, world)
        console.print(f"resumed from {ckpt} at step {start}")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        kept = [ln for ln in (metrics_path.read_text().splitlines() if metrics_path.exists() and start else [])
                if json.loads(ln)["step"] <= start]  # drop rows logged after the checkpoint
        metrics_path.write_text("".join(ln + "\n" for ln in kept))
    eos, pad_id = eos_ids(model, tokenizer), tokenizer.pad_token_id
    stop = StopRequest()
    try:
        with progress() as bar, open(metrics_path if rank == 0 else os.devnull, "a") as metrics_file:
            task = bar.add_task("training", total=cfg.steps, completed=start)
            if benches and start == 0:  # the baseline: the initial policy before any update
                row = {"step": 0, **E.in_training(0, model, tokenizer, benches, cfg, eos, device, out, bar, rank, world)}
                metrics_file.write(json.dumps(row) + "\n")
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.time()
                batch = [examples[i] for i in stream.take(cfg.batch_size)][rank::world]  # this rank's share
                # 1. sample: the student completes each question from its own context
                rollout = sample(model, tokenizer, batch, n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                                 temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=eos,
                                 batch_size=cfg.gen_batch_size, device=device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # give the KV cache's blocks back before the scoring passes
                t_sample = time.time() - t0
                # 2-5. score in all contexts → target → loss, backward per micro-batch → clip → step
                row = {"step": step, **update(model, body, head, rollout, cfg, pad_id, params, optimizer, scheduler),
                       "time_sample": t_sample, "time_step": time.time() - t0}
                if benches and (step % cfg.eval_every == 0 or step == cfg.steps):
                    row |= E.in_training(step, model, tokenizer, benches, cfg, eos, device, out, bar, rank, world)
                # 6. log (rank 0)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                console.print(step_line(row, cfg.steps), soft_wrap=True)
                if rank == 0:
                    write_samples(out / "samples.txt", step, rollout, tokenizer, cfg.samples_per_step)
                bar.advance(task)
                # 7. save (every rank takes part: the adapter and optimizer are gathered from the shards)
                stopping = D.all_sum([stop.signum or 0])[0] > 0  # ranks stop together
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                    save_checkpoint(out, step, model, optimizer, scheduler, stream, cfg.keep_checkpoints, rank)
                if stopping:
                    console.print(f"[yellow]checkpoint saved at step {step} in {out}; resume with resume=true[/]")
                    sys.exit(128 + (stop.signum or signal.SIGTERM))
    finally:
        stop.restore()
    weights = trainable_state(model)
    if rank == 0:
        model.save_pretrained(out / "adapter", state_dict=weights)
        tokenizer.save_pretrained(out / "adapter")
        plots.plot_runs([out], out / "plots.png")
    console.print(f"done: adapter in {out / 'adapter'}, metrics in {metrics_path}, curves in {out / 'plots.png'}")
    D.finish()
    return out


def step_line(row: dict, steps: int) -> str:
    line = (f"step {row['step']:>4}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.1e}  "
            f"|g| {row['grad_norm']:.3f}  len {row['completion_len']:.0f}  ent {row['entropy']:.2f}")
    if "cos_total_ref" in row:
        line += (f"  cos(Δ,Δref) {row['cos_total_ref']:+.2f}  cos(Δ,Δit) {row['cos_total_it']:+.2f}"
                 f"  |Δref|/|Δ| {row['norm_ratio']:.2f}")
    return line + f"  markers {row['markers_per_1k']:.1f}/1k  {row['time_step']:.1f}s"


def write_samples(path: Path, step: int, rollout: Rollout, tokenizer, k: int):
    with path.open("a") as f:
        for i in range(min(k, len(rollout))):
            prompt = tokenizer.decode(rollout.contexts[i].student)
            f.write(f"===== step {step} sample {i}\n{prompt}{rollout.texts[i]}\n\n")


def main(argv: list[str]):
    recipe, overrides, i = "", [], 0
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            print(__doc__ + "\nConfig fields:\n" + "\n".join(f"  {k}" for k in FIELDS))
            return
        if argv[i] == "--recipe":
            recipe, i = argv[i + 1] if i + 1 < len(argv) else "", i + 2
            continue
        if argv[i].startswith("--recipe="):
            recipe = argv[i].split("=", 1)[1]
        else:
            overrides.append(argv[i])
        i += 1
    try:
        train(make_config(recipe, overrides))
    except PopsdError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
