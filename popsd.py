"""popsd.py: Purified OPSD (arXiv 2607.02234) in one training loop.

    python popsd.py --recipe toy                      # CPU, ~1 min: the toy world's pre-trained reasoner
    python popsd.py --recipe single_gpu               # one 24 GB card, 4-bit QLoRA
    python popsd.py --recipe toy steps=30 method=opsd # key=value overrides any Config field (config.py)

A recipe (recipes/*.py) is Python that popsd executes: read one you downloaded before running it.

Each step: sample → score → target → loss → step → log → save.
  1. the student (base + LoRA) samples ŷ from the question alone;
  2. three frozen passes of the same weights, LoRA disabled, score every position of ŷ:
     teacher (question + reference), reference-only (reference), clean base (question);
  3. the target is the Purified PMI target (or π_T for method=opsd), see loss.py;
  4. the loss is the per-token divergence summed over tokens, divided by the number of valid
     completion tokens of the whole optimizer step, so micro-batching does not change the update.
Sampling: HF generate on the training model (rollout_engine=dynamic, the Config default; static), the graph
sampler on the training model (rollout_engine=graph, the toy recipe's), vLLM in this process (rollout_engine=vllm)
or a pool of vLLM servers (rollout_server=URL,...); an engine gets each step's adapter before it samples again
(sampler.sync), so every rollout is on-policy.
Departures from the paper: teacher=live and teacher=ema (ema.py) apply to the teacher and reference-only
passes, the clean base stays the frozen initial policy.
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import distributed as D
import ema
import eval as E
import loss as L
import plots
from checkpoints import (RunLock, check_base, check_finite, latest_checkpoint, load_checkpoint, prepare_run_folder,
                         record_session, save_checkpoint, save_final_adapter, trainable_state, trim_logs)
from config import Config, derived_sizes, field_docs, make_config, print_config, recipe_list
from data import DataStream, PopsdError, build_tiny_model, read_rows, resolve_local
from models import (base_fingerprint, eos_ids, fit_new_tokens, load_model, make_optimizer, model_parts, model_positions,
                    pick_device)
from rollout import (HFSampler, Rollout, build_contexts, completion_hidden, marker_counts, repeated_ngrams,
                     request_seed, control_tokens)
from trackers import Trackers

console = Console()


def warn(message: str):
    console.print(f"[yellow]{message}[/]", soft_wrap=True)
warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*")


# ----------------------------------------------------------------------------- data

def prepare_contexts(rows, tokenizer, cfg: Config):
    """Tokenised contexts for every row; rows whose longest context exceeds max_prompt_len are skipped."""
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    kept, too_long, marked, controls = [], 0, [], control_tokens(tokenizer)
    with progress() as bar:
        task = bar.add_task("tokenising prompts", total=len(rows))
        for i, (q, r) in enumerate(rows, 1):
            if found := [t for t in controls if t in q or t in r]:
                marked.append((i, found))
            c = build_contexts(tokenizer, q, r, templates=templates, student_thinking=cfg.student_thinking,
                               teacher_thinking=cfg.teacher_thinking)
            if max(len(c.student), len(c.teacher), len(c.refonly)) > cfg.max_prompt_len:
                too_long += 1
            else:
                kept.append(c)
            bar.advance(task)
    for i, found in marked[:3]:
        console.print(f"[yellow]warning: data row {i} holds the chat template's control token(s) {', '.join(found)}: "
                      "in a prompt they act as controls, not text[/]", soft_wrap=True)
    if len(marked) > 3:
        console.print(f"[yellow]warning: {len(marked)} rows in all hold control tokens[/]")
    if not kept:
        raise PopsdError(f"all {len(rows)} prompts are longer than max_prompt_len={cfg.max_prompt_len}")
    return kept, too_long


# ----------------------------------------------------------------------------- the loop

class StopRequest:
    """First Ctrl-C / SIGTERM: finish the step, save a checkpoint, exit. A second one stops at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}: finishing this step (a step still sampling is "
                      "dropped), then saving a checkpoint; a second one stops at once[/]")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


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
        if cfg.teacher == "ema":  # the EMA adapter in place of the trained one
            with ema.active(model):
                h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
    return h_teacher, h_refonly, h_base


def student_loss(model, body, head, part: Rollout, frozen, cfg: Config, pad_id: int):
    """The student pass (LoRA on, with grad) and the loss against the target: (loss_sum, per-token stats)."""
    model.train()
    h_student = completion_hidden(body, [c.student for c in part.contexts], part.completions, part.mask, pad_id)
    need = part.logprobs is not None or cfg.support == "sampled"
    tokens = part.completions[part.mask].to(h_student.device) if need else None  # [N] ŷ
    kwargs = dict(method=cfg.method, kind=cfg.divergence, jsd_beta=cfg.jsd_beta, beta=cfg.beta, clip=cfg.clip,
                  token_clip=cfg.token_clip, temperature=cfg.loss_temperature or cfg.temperature, tokens=tokens,
                  support=cfg.support, topk=cfg.topk, topk_tail=cfg.topk_tail)
    if cfg.loss_impl == "fused":
        loss_sum, stats = L.fused_loss(h_student, *frozen, head, chunk_mb=cfg.loss_chunk_mb, compile=cfg.loss_compile,
                                       **kwargs)
    else:
        loss_sum, stats = L.reference_loss(h_student, *frozen, head, **kwargs)
    if part.logprobs is not None:  # rollout/trainer mismatch: the engine's raw log-probs against the student's, τ = 1
        sampler_lp = part.logprobs[part.mask].to(stats["logprob"].device)  # [N]
        stats["sampler_logprob_gap"] = (stats.pop("logprob") - sampler_lp).abs()
    stats.pop("logprob", None)
    return loss_sum, stats


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
    keys = sorted(sums)
    totals = D.all_sum([loss_sum, len(rollout), rollout.truncated.sum().item(), marker_counts(rollout.texts),
                        *repeated_ngrams(rollout.completions, rollout.mask), *(sums[k] for k in keys)])
    loss_sum, seqs, truncated, markers, repeats, grams, *stat_sums = totals
    lr = scheduler.get_last_lr()[0]
    skipped = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))  # the same verdict on every rank
    if not skipped:  # a non-finite loss or gradient never reaches the weights
        optimizer.step()
        scheduler.step()
        if cfg.teacher == "ema":
            ema.update(model, cfg.ema_rate)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / n_tokens, "lr": lr, "grad_norm": grad_norm, "completion_len": n_tokens / seqs,
            "truncated": truncated / seqs, "tokens": n_tokens, "markers_per_1k": 1000 * markers / n_tokens,
            "repeated_4grams": repeats / max(grams, 1),
            "skipped": skipped, **{k: v / n_tokens for k, v in zip(keys, stat_sums)}}


@torch.no_grad()
def check_outputs(model, body, head, rollout: Rollout, pad_id: int, step: int):
    """Before a checkpoint is saved: the updated student's logits on one of the step's sequences are finite
    (finite weights can still overflow: lr=1e30 gives weights of 1e30 and infinite logits)."""
    model.eval()
    h = completion_hidden(body, [rollout.contexts[0].student], rollout.completions[:1], rollout.mask[:1], pad_id)
    if not torch.isfinite(h.float() @ head.float().T).all():
        raise PopsdError(f"after step {step} the student's logits are not finite: the run diverged and this state "
                         "is not saved; lower lr or max_grad_norm and resume from the last checkpoint")


MAX_SKIPS = 3  # steps in a row that changed nothing (a non-finite or an exactly zero gradient) before the run stops


def extreme_settings(cfg: Config) -> list[str]:
    """The settings that saturate or flatten every softmax: what a run that cannot learn is most likely set to."""
    tau, found = cfg.loss_temperature or cfg.temperature, []
    if tau < 0.05:
        found.append(f"τ={tau:g} (loss_temperature, else temperature) makes every softmax one-hot, with no gradient")
    if cfg.temperature > 2:
        found.append(f"temperature={cfg.temperature:g} samples near-uniform text")
    if cfg.method == "purified" and cfg.beta < 0.05:
        found.append(f"beta={cfg.beta:g} makes the target one-hot on the largest Δ̃ (log P = log π_0 + Δ̃/β)")
    return found


def health(row: dict, stalls: int, vocab: int, cfg: Config) -> tuple[int, list[str], str | None]:
    """(steps in a row that changed nothing, warnings for this step, why the run must stop or None).

    A step changes nothing when its loss or gradient is not finite (the update is skipped) or its gradient is
    exactly zero; MAX_SKIPS in a row stop the run, naming the settings likely to blame. A collapsed student is
    warned and marked `collapse` in metrics: entropy near ln V (uniform), a zero gradient with a loss left, or a
    JSD near its ceiling H(b) (student and target almost disjoint: no gradient left); so is degenerate
    repetition (`repetition`). The sampler's log-prob gap (engines) above sampler_gap_warn is warned, above
    sampler_gap_stop the run stops: the engine is not sampling from the student."""
    step, warnings, stop = row["step"], [], None
    settings = extreme_settings(cfg)
    blame = ": " + "; ".join(settings) if settings else ""
    stalls = stalls + 1 if row["skipped"] or row["grad_norm"] == 0 else 0
    if row["skipped"]:
        warnings.append(f"step {step}: non-finite loss or gradient, update skipped ({stalls} in a row)")
        if stalls >= MAX_SKIPS:
            stop = (f"{stalls} steps in a row had a non-finite loss or gradient (step {step}, lr {row['lr']:.2g}): the "
                    "run is diverging; lower lr or max_grad_norm and resume from the last checkpoint, which holds "
                    "finite weights")
    elif row["grad_norm"] == 0:
        warnings.append(f"step {step}: the gradient is exactly zero, this step taught nothing ({stalls} in a row)"
                        + blame)
        if stalls >= MAX_SKIPS:
            stop = (f"{stalls} steps in a row had no gradient at all (loss {row['loss']:.2g}): this run cannot learn"
                    + (blame or " (the student equals its target, or every softmax it compares is saturated)"))
    b = cfg.jsd_beta
    ceiling = -b * math.log(b) - (1 - b) * math.log(1 - b) if cfg.divergence == "jsd" else math.inf
    why = [w for w, bad in ((f"entropy {row.get('entropy', 0):.2f} of at most {math.log(vocab):.2f}",
                             row.get("entropy", 0) > 0.95 * math.log(vocab)),
                            ("a zero gradient", row["grad_norm"] == 0 and row["loss"] > 0),
                            (f"JSD {row['loss']:.3f} near its ceiling {ceiling:.3f}", row["loss"] > 0.9 * ceiling)) if bad]
    if why and not row["skipped"]:
        row["collapse"] = True
        warnings.append(f"step {step}: the student looks collapsed ({', '.join(why)})" + (blame or ": lower lr?"))
    if any(not math.isfinite(row[k]) for k in ("cos_total_ref", "cos_total_it", "norm_ratio") if k in row):
        warnings.append(f"step {step}: the Δ diagnostics are not finite (every softmax saturated?)" + blame)
    if row.get("repeated_4grams", 0) > 0.5 and row.get("truncated", 0) > 0.5:  # R1-Distill's failure under OPSD
        row["repetition"] = True
        warnings.append(f"step {step}: the student repeats itself ({100 * row['repeated_4grams']:.0f}% of its "
                        f"4-grams seen before in the same completion, {100 * row['truncated']:.0f}% of completions cut "
                        "at max_new_tokens): degenerate repetition; lower lr, or compare method=purified")
    gap = row.get("sampler_logprob_gap")
    if gap is not None and not gap <= cfg.sampler_gap_warn:  # NaN too
        said = (f"the sampler's log-probs of its tokens differ from the student's by {gap:.2g} nats per token on "
                "average")
        causes = ("likely causes: an adapter on the engine other than this step's (a stale or another run's), a "
                  "sampling setting the trainer does not know (the server's logprobs mode must be raw_logprobs), "
                  "or another model or dtype on the engine than the trainer's")
        if not gap <= cfg.sampler_gap_stop:
            stop = (f"step {step}: {said} (sampler_gap_stop={cfg.sampler_gap_stop:g}): the engine is not sampling "
                    f"from the student; {causes}")
        else:
            warnings.append(f"step {step}: {said} (above sampler_gap_warn={cfg.sampler_gap_warn:g}; engine precision "
                            f"is ~1e-6 in fp32): {causes}")
    return stalls, warnings, stop


def open_run_folder(cfg: Config, out: Path, rank: int) -> tuple[Path | None, RunLock | None]:
    """Threads, warnings and the run folder, checked before anything in it changes, then locked and marked by
    rank 0 (checkpoints.py): returns the checkpoint to resume from (or None) and the lock."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.trust_remote_code:
        console.print("[bold yellow]trust_remote_code=true: code shipped with the model will run on this machine[/]")
    ckpt, lock = None, None
    if rank == 0:
        reads = [resolve_local(p) for p in (cfg.model, cfg.data, *cfg.eval_bench.split(",")) if p and p != "tiny"]
        ckpt, lock = prepare_run_folder(out, dataclasses.asdict(cfg), cfg.resume, cfg.overwrite, warn,
                                        [p for p in reads if p is not None])
    D.barrier()
    if rank != 0 and cfg.resume:
        ckpt = latest_checkpoint(out, lambda m: None)
    random.seed(cfg.seed)
    return ckpt, lock


def make_sampler(cfg: Config, model, tokenizer, path: str, eos, device, out: Path, rank: int, world: int):
    """The sampler the config names (rollout.py): HF generate on this model, vLLM in this process, or servers."""
    if cfg.rollout_server:
        import server_pool
        run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]
        return server_pool.ServerPool(cfg.rollout_server, tokenizer, eos, Path(cfg.rollout_adapter_dir or
                                      out / "rollout_adapters"), cfg.rollout_concurrency, run_id, rank,
                                      warn=warn, probe_timeout=cfg.server_timeout)
    if cfg.rollout_engine == "graph" and world > 1:
        raise PopsdError("rollout_engine=graph samples from one process's whole weights: under torchrun sample with "
                         "rollout_engine=dynamic (sample_gathered) or rollout_server=URL,...")
    if cfg.rollout_engine == "vllm":
        if world > 1:
            raise PopsdError("rollout_engine=vllm runs in one process: under torchrun sample with rollout_server=URL,...")
        import vllm_engine
        longest = cfg.max_prompt_len + max(cfg.max_new_tokens, cfg.eval_max_new_tokens if cfg.eval_every else 0)
        return vllm_engine.VLLMEngine(cfg, path, tokenizer, eos, device,
                                      max_model_len=min(longest, model_positions(model)))
    if cfg.rollout_engine == "graph":
        import graph_engine
        return graph_engine.GraphSampler(model, tokenizer, batch_size=graph_rows(cfg, model, device)[0], device=device,
                                         eos_ids=eos, keep_rows=cfg.graph_keep_rows)
    return HFSampler(model, tokenizer, engine=cfg.rollout_engine, batch_size=cfg.gen_batch_size, device=device,
                     eos_ids=eos, gather=cfg.sample_gathered)


def graph_rows(cfg: Config, model, device) -> tuple[int, str]:
    """rollout_engine=graph: rows per batch whose static KV caches fit graph_kv_gb (0: a quarter of the GPU's
    free memory, 8 GiB on a CPU), and the start-up table's line."""
    import graph_engine
    longest = cfg.max_prompt_len + max(cfg.max_new_tokens, cfg.eval_max_new_tokens if cfg.eval_every else 0)
    budget = cfg.graph_kv_gb * 2 ** 30 if cfg.graph_kv_gb else \
        0.25 * torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2 ** 30
    return graph_engine.plan(model, cfg.gen_batch_size, longest, budget, cfg.graph_keep_rows)


def check_batch(cfg: Config, available: int, what: str):
    """A step that samples more prompts than the data holds repeats prompts within the step: almost always a
    typo (batch_size=100000 on 2,000 rows once sampled for minutes before anything showed)."""
    if cfg.batch_size > available:
        raise PopsdError(f"config key 'batch_size' asks for {cfg.batch_size} prompts per step, but {cfg.data} holds "
                         f"{available} {what}: a step would repeat prompts; lower batch_size (n_samples gives "
                         "several completions per prompt)")


class SamplingStopped(Exception):
    """Ctrl-C or SIGTERM arrived while a step was still sampling: the step is dropped, not finished."""


def position(stream: DataStream) -> dict:
    """Where the run stands before a step: the data position and every random state (restored if it is dropped)."""
    return {"data": (stream.epoch, stream.cursor), "python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def go_back(stream: DataStream, saved: dict):
    stream.epoch, stream.cursor = saved["data"]
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"]:
        torch.cuda.set_rng_state_all(saved["cuda"])


def sample_student(sampler, batch, cfg: Config, step: int, rank: int, world: int, on_batch=None) -> Rollout:
    """n completions per prompt from the student's context; one seed per prompt from (seed, step, its place in
    the step's batch); on_batch(k) after every k sequences (progress). A student whose probabilities overflowed
    is a clear error."""
    seeds = [request_seed(cfg.seed, step, rank + k * world) for k in range(len(batch))]
    try:
        out = sampler.generate([c.student for c in batch], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seeds=seeds,
                               on_batch=on_batch)
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        raise PopsdError(f"step {step}: the student's next-token probabilities are not finite: the run diverged; "
                         "lower lr or max_grad_norm and resume from the last checkpoint") from None
    return Rollout([c for c in batch for _ in range(cfg.n_samples)], *out)


def train(cfg: Config) -> Path:
    import transformers
    transformers.utils.logging.disable_progress_bar()  # rich bars are ours
    out = Path(cfg.out_dir)  # config.validate expanded ~
    rank, world, device = D.setup(pick_device(cfg.device))
    console.quiet = E.console.quiet = rank != 0  # rank 0 prints, logs and saves; every rank samples and scores its share
    if cfg.batch_size % world:
        raise PopsdError(f"batch_size={cfg.batch_size} must be a multiple of the number of ranks ({world})")
    if world > 1 and cfg.load_in_4bit:
        raise PopsdError("load_in_4bit is the one-GPU path: under torchrun FSDP shards bf16 weights (load_in_4bit=false)")
    if cfg.rollout_engine == "vllm" and not cfg.rollout_server:
        import vllm_engine
        vllm_engine.require_vllm()  # before the run folder is touched
    ckpt, lock = open_run_folder(cfg, out, rank)  # rank 0 holds the folder's lock until the run ends
    sampler = stop = tracker = None
    try:
        rows, bad = read_rows(cfg.data, cfg.data_split, (cfg.question_field, cfg.reference_field), cfg.skip_bad_rows)
        check_batch(cfg, len(rows), "rows")  # before the model loads
        local = resolve_local(cfg.model)
        path = str(local.resolve()) if local is not None else cfg.model  # absolute: adapters name their base wherever
        if cfg.model == "tiny":
            texts = [t for qr in rows for t in qr] + [cfg.student_template, cfg.teacher_template, cfg.refonly_template]
            path = str(build_tiny_model(out / "tiny_model", texts, cfg.seed) if rank == 0 else out / "tiny_model")
            D.barrier()  # rank 0 builds it, the others load it
        tokenizer, model = load_model(cfg, device, path)  # LoRA initialised from cfg.seed, the same on every rank
        base = base_fingerprint(path, console.print)  # the base's checksum: in config.json, checkpoints, evaluations
        run_record = dataclasses.asdict(cfg) | {"base_sha256": base}
        if ckpt is not None:
            check_base(ckpt, base)  # a base replaced in its folder since: refused before anything here changes
        if cfg.teacher == "ema":
            ema.add(model)
        if world > 1:
            D.shard_model(model, device, bf16=cfg.dtype == "bf16")
        torch.manual_seed(cfg.seed + rank)  # sampling: each rank its own completions, whatever ran before
        body, head = model_parts(model)
        if cfg.support == "topk" and cfg.topk > head.shape[0]:
            raise PopsdError(f"config key 'topk' must be at most the model's vocabulary size {head.shape[0]} "
                             f"(support=topk), got {cfg.topk}")
        examples, too_long = prepare_contexts(rows, tokenizer, cfg)
        check_batch(cfg, len(examples), "prompts that fit max_prompt_len")
        benches = E.held_out_benches(cfg, rows) if cfg.eval_every else {}
        sizes = derived_sizes(cfg, len(examples)) | {"ranks": world, "bad rows skipped": bad,
                                                      "over-long prompts skipped": too_long}
        if cfg.teacher == "ema":
            sizes["EMA teacher adapter"] = f"{ema.megabytes(model):.1f} MB (a second LoRA, not trained; FSDP: sharded)"
        if cfg.rollout_engine == "graph" and not cfg.rollout_server:
            sizes["graph KV cache"] = graph_rows(cfg, model, device)[1]
        print_config(cfg, sizes, console)
        for key in ("max_new_tokens", "eval_max_new_tokens"):  # after run_record: the config as given is the run's
            setattr(cfg, key, fit_new_tokens(model, cfg.max_prompt_len, getattr(cfg, key), key, warn))

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        stream = DataStream(len(examples), cfg.seed)
        start = 0
        if ckpt is not None:
            start = load_checkpoint(ckpt, model, optimizer, scheduler, stream, cfg.seed, rank, world)
            console.print(f"resumed from {ckpt} at step {start}")
        metrics_path = out / "metrics.jsonl"
        if rank == 0:
            record_session(out, run_record, start)  # the config as given (before any cut below) is the run's
            trim_logs(out, start, warn)  # rows and samples logged after the checkpoint go: they are redone
        tracker = Trackers(cfg.report_to if rank == 0 else "none", out, dataclasses.asdict(cfg), start)
        eos, pad_id = eos_ids(model, tokenizer), tokenizer.pad_token_id
        sampler = make_sampler(cfg, model, tokenizer, path, eos, device, out, rank, world)
        stop, stalls = StopRequest(), 0
        sampler.sync(model, start)  # the engine samples from this run's adapter (a resumed one: the checkpoint's)
        with progress() as bar, open(metrics_path if rank == 0 else os.devnull, "a") as metrics_file:
            task = bar.add_task("training", total=cfg.steps, completed=start)
            if benches and start == 0:  # the baseline: the initial policy before any update
                row = {"step": 0, **E.in_training(0, sampler, tokenizer, benches, cfg, out, bar, rank, world, base)}
                metrics_file.write(json.dumps(row) + "\n")
                tracker.log(row)
            t_run = time.time()
            for step in range(start + 1, cfg.steps + 1):
                t0, before = time.time(), position(stream)
                batch = [examples[i] for i in stream.take(cfg.batch_size)][rank::world]  # this rank's share
                # 1. sample: the student completes each question from its own context
                sampling = bar.add_task(f"step {step}: sampling", total=len(batch) * cfg.n_samples)

                def sampled(k):  # progress; a stop asked for now ends the sampling (one process: no collective)
                    E.advance(bar, sampling, k, end_line=False)
                    if stop.signum and world == 1:
                        raise SamplingStopped
                try:
                    rollout = sample_student(sampler, batch, cfg, step, rank, world, sampled)
                except SamplingStopped:  # the step is dropped: the run stands where it stood before it
                    go_back(stream, before)
                    save_checkpoint(out, step - 1, model, optimizer, scheduler, stream, cfg.keep_checkpoints, rank,
                                    run_record)
                    console.print(f"[yellow]stopped while sampling step {step}: checkpoint saved at step {step - 1} "
                                  f"in {out}; resume with resume=true[/]")
                    sys.exit(128 + (stop.signum or signal.SIGTERM))
                finally:
                    bar.remove_task(sampling)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # give the KV cache's blocks back before the scoring passes
                t_sample = time.time() - t0
                # 2-5. score in all contexts → target → loss, backward per micro-batch → clip → step
                row = {"step": step, **update(model, body, head, rollout, cfg, pad_id, params, optimizer, scheduler),
                       "time_sample": t_sample}
                t_sync = time.time()
                sampler.sync(model, step)  # the updated adapter reaches the engine before it samples again
                row |= {"time_sync": time.time() - t_sync, "time_step": time.time() - t0}
                stalls, warnings, stop_why = health(row, stalls, head.shape[0], cfg)
                if benches and (step % cfg.eval_every == 0 or step == cfg.steps):
                    row |= E.in_training(step, sampler, tokenizer, benches, cfg, out, bar, rank, world, base)
                # 6. log (rank 0)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                tracker.log(row)
                pace = (time.time() - t_run) / (step - start)  # seconds per step, this process so far
                console.print(step_line(row, cfg.steps, pace), soft_wrap=True)
                for warning in warnings:
                    console.print(f"[bold yellow]{warning}[/]", soft_wrap=True)
                if stop_why:  # after the row is logged: the record says why
                    raise PopsdError(stop_why)
                if rank == 0:
                    write_samples(out / "samples.txt", step, rollout, tokenizer, cfg.samples_per_step)
                bar.advance(task)
                # 7. save (every rank takes part: the adapter and optimizer are gathered from the shards)
                stopping = D.all_sum([stop.signum or 0])[0] > 0  # ranks stop together
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or stopping:
                    check_outputs(model, body, head, rollout, pad_id, step)
                    save_checkpoint(out, step, model, optimizer, scheduler, stream, cfg.keep_checkpoints, rank,
                                    run_record)
                if stopping:
                    console.print(f"[yellow]checkpoint saved at step {step} in {out}; resume with resume=true[/]")
                    sys.exit(128 + (stop.signum or signal.SIGTERM))
        weights = trainable_state(model)
        check_finite(weights)
        if rank == 0:
            save_final_adapter(out, model, tokenizer, weights, run_record)
            plots.plot_runs([out], out / "plots.png")
    finally:
        if stop is not None:
            stop.restore()
        if sampler is not None:
            sampler.close()
        if tracker is not None:
            tracker.close()
        if lock is not None:
            lock.release()
    console.print(f"done: adapter in {out / 'adapter'}, metrics in {metrics_path}, curves in {out / 'plots.png'}")
    D.finish()
    return out


def step_line(row: dict, steps: int, pace: float | None = None) -> str:
    """One readable line per step; pace (seconds per step so far) adds the rate and the time left."""
    line = (f"step {row['step']:>4}/{steps}  loss {row['loss']:.2e}  lr {row['lr']:.1e}  "  # 2e-5 reads, not 0.0000
            f"|g| {row['grad_norm']:.2e}  len {row['completion_len']:.0f}  ent {row['entropy']:.2f}")
    if "cos_total_ref" in row:
        line += (f"  cos(Δ,Δref) {row['cos_total_ref']:+.2f}  cos(Δ,Δit) {row['cos_total_it']:+.2f}"
                 f"  |Δref|/|Δ| {row['norm_ratio']:.2f}")
    if "sampler_logprob_gap" in row:
        line += f"  gap {row['sampler_logprob_gap']:.1e}"
    line += f"  markers {row['markers_per_1k']:.1f}/1k  {row['time_step']:.1f}s"
    if pace is None or pace <= 0:
        return line
    rate = f"{1 / pace:.2f} step/s" if pace <= 1 else f"{pace:.1f} s/step"  # as tqdm: the unit that reads above 1
    left = round(pace * (steps - row["step"]))
    days = f"{left // 86400}d " if left >= 86400 else ""
    return line + f"  {rate}  eta {days}{time.strftime('%H:%M:%S', time.gmtime(left % 86400))}"


def printable(text: str) -> str:
    """Control characters escaped (\\x07, \\x1b, ...), newlines and tabs kept: samples.txt stays text."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def write_samples(path: Path, step: int, rollout: Rollout, tokenizer, k: int):
    with path.open("a") as f:
        for i in range(min(k, len(rollout))):
            prompt = tokenizer.decode(rollout.contexts[i].student)
            f.write(printable(f"===== step {step} sample {i}\n{prompt}{rollout.texts[i]}") + "\n\n")


def usage() -> str:
    """What --help prints: the commands, every recipe with its first line, every field with type, default, comment."""
    recipes = "\n".join(f"  {name:<22}{line}" for name, line in recipe_list())
    fields = "\n".join(f"  {name}: {kind} = {default}{f'  # {comment}' if comment else ''}"
                       for name, kind, default, comment in field_docs())
    return f"{__doc__}\nRecipes (recipes/*.py):\n{recipes}\n\nConfig fields (key=value):\n{fields}\n"


def main(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help"):
        print(usage() if argv else usage().split("\nConfig fields")[0] + "\nAll fields: python popsd.py --help")
        sys.exit(0 if argv else 2)
    recipe, overrides, i = "", [], 0
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            print(usage())
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
    except KeyboardInterrupt:  # Ctrl-C before the loop (start-up), or a second one in it: no traceback
        console.print("[yellow]interrupted: stopped at once; the run folder keeps what its last checkpoint saved "
                      "(resume=true continues from it)[/]")
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
