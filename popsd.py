"""popsd.py: Purified OPSD (arXiv 2607.02234) in one training loop. Read this file first.

    python popsd.py --recipe toy                   # CPU, about a minute: the toy world's reasoner
    python popsd.py --recipe single_gpu            # one 24 GB card, 4-bit QLoRA
    python popsd.py --recipe toy method=opsd       # key=value overrides any field (--help)

Three contexts, four distributions. The student π_θ (base + LoRA) reads the question q alone.
Three frozen passes of the same weights, LoRA off, read the question and the reference solution r
(teacher π_T), the reference alone (π_ref), and the question alone (the clean base π_0, which
reads the student's own context).

One optimizer step, as numbered in train() below:
  1. sample: the student completes each question from the question alone, ŷ ~ π_θ(· | q);
  2. score: the frozen passes score every position of ŷ over the whole vocabulary:
     π_T(· | q, r, ŷ<t), π_ref(· | r, ŷ<t), π_0(· | q, ŷ<t);
  3. target and loss: Purified's P = softmax(log π_0 + c·tanh(centre(log π_T − log π_ref)/c)/β)
     (OPSD: P = π_T), and the student pass (LoRA on) against it: D(P ‖ π_θ) per token (loss.py);
  4. step: D summed over the step's tokens and divided by their number, backward, clip, AdamW;
  5. sync: the sampling engine gets the updated adapter (rollout_ahead=1: one step behind);
  6. log, and evaluate every eval_every steps; 7. save a checkpoint every save_every steps.

Read next: rollout.py (the contexts, and how ŷ lines up with each), loss.py (the math), engines/
(how ŷ is sampled). plumbing/ keeps the run safe, fast and visible (the run folder, logs, guards,
checkpoints, loading, the command line, the chunked loss): it may be skipped.

Departures from the paper, and choices it leaves open (the project's one list; loss.py points here):
  1. The JSD's mixture weight b = 0.5 (jsd_mix), and τ dividing every side's logits in the loss
     (loss_temperature; by default the sampling temperature): a third-party reading of the paper.
  2. Sampling truncates, the loss does not: ŷ is drawn from π_θ cut to its top_k / top_p tokens and
     renormalised, while every target, divergence and diagnostic uses the full softmax.
  3. teacher=live and teacher=ema (the OPSD code's options; the paper's teacher is frozen) change
     the teacher and reference-only passes; the clean base π_0 stays the frozen initial policy.
  4. support=topk | sampled and divergence=forward_kl | reverse_kl are peers' options; the
     defaults are the paper's (the full vocabulary, the generalized JSD).
"""
import contextlib
import math
import sys
from pathlib import Path

import torch

import loss
from engines import request_seed
from plumbing import distributed, ema, loss_fused
from plumbing.config import Config, from_command_line
from plumbing.data import PopsdError
from plumbing.models import model_parts
from plumbing.session import RunDone, Session, console, fatal
from rollout import Rollout, completion_hidden, marker_counts, repeated_ngrams


def sample(sampler, batch, cfg: Config, step: int, rank: int, world: int, on_batch=None):
    """1. n completions per prompt from the student's context (q, no reference): a Rollout.
    Each prompt's seed comes from (seed, step, its place in the whole step's batch), so which
    rank samples it does not matter; what each engine makes of a seed: engines/__init__.py."""
    seeds = [request_seed(cfg.seed, step, rank + k * world) for k in range(len(batch))]
    rollout = sampler.generate([c.student for c in batch], n=cfg.n_samples,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, seeds=seeds, on_batch=on_batch)
    rollout.contexts = [c for c in batch for _ in range(cfg.n_samples)]  # each row's, for scoring
    return rollout


def teacher_weights(model, teacher: str):
    """The weights of the teacher and reference-only passes: the frozen base, LoRA off (the
    paper's), the student's own, detached (teacher=live), or the EMA adapter (teacher=ema)."""
    if teacher == "frozen":
        return model.disable_adapter()
    return ema.active(model) if teacher == "ema" else contextlib.nullcontext()


def frozen_passes(model, body, part: Rollout, cfg: Config, pad_id: int):
    """2. The frozen passes of one micro-batch: (teacher, reference-only, clean base) hidden
    states [N, H] at the positions that score ŷ (rollout.completion_hidden), with no graph: the
    target is a constant. OPSD runs no clean-base pass, and the reference-only one only for the
    diagnostics."""
    def hidden(role):  # ŷ's ids appended to this context's ids: never decoded and re-tokenized
        contexts = [getattr(c, role) for c in part.contexts]
        return completion_hidden(body, contexts, part.completions, part.mask, pad_id)  # [N, H]

    h_refonly = h_base = None
    model.eval()  # no dropout in a frozen pass
    with torch.no_grad():
        if cfg.method == "purified":
            with model.disable_adapter():  # LoRA off: the initial policy, no second copy of it
                h_base = hidden("student")  # π_0 reads the student's own context
        with teacher_weights(model, cfg.teacher):
            h_teacher = hidden("teacher")
            if cfg.method == "purified" or cfg.diagnostics:
                h_refonly = hidden("refonly")
    return h_teacher, h_refonly, h_base


def student_loss(model, body, head_weight, part: Rollout, frozen, cfg: Config, pad_id: int):
    """3. The student pass (LoRA on, with grad) and the loss against the target: (Σ of D over the
    micro-batch's tokens, per-token stats). loss_impl=reference runs loss.reference_loss, the lines
    you read (the toy recipes do); fused, the default for real vocabularies, the same numbers in
    chunks (plumbing/loss_fused.py)."""
    model.train()
    student_contexts = [c.student for c in part.contexts]
    h_student = completion_hidden(body, student_contexts, part.completions, part.mask, pad_id)
    # ŷ's ids: for the gap to the engine's log-probs, and for the sampled-token loss
    needs_tokens = part.logprobs is not None or cfg.support == "sampled"
    tokens = part.completions[part.mask].to(h_student.device) if needs_tokens else None  # [N]
    options = dict(method=cfg.method, kind=cfg.divergence, jsd_mix=cfg.jsd_mix, beta=cfg.beta,
                   pmi_clip=cfg.pmi_clip, term_clamp=cfg.term_clamp, tokens=tokens,
                   support=cfg.support, temperature=cfg.loss_temperature or cfg.temperature,
                   topk=cfg.topk, topk_tail=cfg.topk_tail)
    if cfg.loss_impl == "reference":
        loss_sum, stats = loss.reference_loss(h_student, *frozen, head_weight, **options)
    else:
        loss_sum, stats = loss_fused.fused_loss(h_student, *frozen, head_weight,
                                                chunk_mb=cfg.loss_chunk_mb,
                                                compile=cfg.loss_compile, **options)
    if part.logprobs is not None:  # rollout/trainer mismatch: the engine's log-probs vs ours
        sampler_lp = part.logprobs[part.mask].to(stats["logprob"].device)  # [N]
        stats["sampler_logprob_gap"] = (stats.pop("logprob") - sampler_lp).abs()
    stats.pop("logprob", None)
    return loss_sum, stats


def update(model, body, head_weight, rollout: Rollout, cfg: Config, pad_id: int, optimizer,
           scheduler):
    """2-4 for the whole step: score, loss and backward per micro-batch, then one optimizer step;
    the step's metrics. Sums travel by name and are summed over ranks (all_sum_named)."""
    # The loss is divided by N_step, the valid tokens of the whole step on every rank, not by
    # each micro-batch's own count, and FSDP sums gradients over ranks: micro-batching and the
    # number of ranks change nothing.
    n_step = int(distributed.all_sum([rollout.mask.sum().item()])[0])
    sums = {"loss": 0.0}
    for i in range(0, len(rollout), cfg.micro_batch_size):
        part = rollout.select(slice(i, i + cfg.micro_batch_size))
        frozen = frozen_passes(model, body, part, cfg, pad_id)
        part_loss, stats = student_loss(model, body, head_weight, part, frozen, cfg, pad_id)
        (part_loss / n_step).backward()
        sums["loss"] += part_loss.item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    # 4. step: clip, AdamW (and the EMA teacher follows), unless the loss or gradient is not finite
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(trained, cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.item()
    repeats, grams = repeated_ngrams(rollout.completions, rollout.mask)
    counts = {"sequences": len(rollout), "truncated": rollout.truncated.sum().item(),
              "markers": marker_counts(rollout.texts), "repeats": repeats, "grams": grams}
    totals = distributed.all_sum_named(sums | counts)
    lr = scheduler.get_last_lr()[0]
    # the same on every rank: a non-finite loss or gradient never reaches the weights
    skipped = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        scheduler.step()
        if cfg.teacher == "ema":
            ema.update(model, cfg.ema_rate)
    optimizer.zero_grad(set_to_none=True)
    seqs = totals["sequences"]
    means = {k: totals[k] / n_step for k in sorted(set(sums) - {"loss"})}  # the stats, per token
    return {"loss": totals["loss"] / n_step, "lr": lr, "grad_norm": grad_norm,
            "completion_len": n_step / seqs, "truncated": totals["truncated"] / seqs,
            "tokens": n_step, "markers_per_1k": 1000 * totals["markers"] / n_step,
            "repeated_4grams": totals["repeats"] / max(totals["grams"], 1), "skipped": skipped,
            **means}


def train(cfg: Config) -> Path:
    """The loop. Rank 0 alone prints, logs and saves (plumbing/session.py); every rank samples
    and scores its share."""
    # set-up and clean-up: the run folder, data, model, optimizer, sampler, logs
    with Session(cfg) as run:
        model, sampler = run.model, run.sampler
        body, head_weight = model_parts(model)  # the loss reads hidden states and the head [V, H]
        for step, batch in run.steps():  # this rank's share of the step's prompts
            # 1. sample ŷ: n completions per prompt from the student (rollout_ahead=1: sampled
            #    already, while the last step trained, by the adapter one step older)
            with run.sampling(step, len(batch) * cfg.n_samples) as on_batch:  # a stop: dropped
                rollout = (run.ahead.take(step, batch, on_batch)
                           or sample(sampler, batch, cfg, step, run.rank, run.world, on_batch))
            if cfg.rollout_ahead and step < cfg.steps:  # the next step's ŷ, while this one trains
                run.ahead.start(step + 1, sample, sampler, run.upcoming(), cfg, step + 1,
                                run.rank, run.world)
            # 2-4. score in the frozen contexts, target and loss per micro-batch, one step
            row = {"step": step, "policy_lag": rollout.policy_lag(step),
                   **update(model, body, head_weight, rollout, cfg, run.pad_id, run.optimizer,
                            run.scheduler)}
            # 5. sync: the updated adapter reaches the engine before it samples again
            with run.timed(row, "time_sync"):
                sampler.sync(model, step)
            # 6. log: the guards, the evaluation when due, metrics.jsonl, the step line
            run.log(row, rollout)
            # 7. save: a checkpoint when due, and the exit a Ctrl-C asked for (every rank)
            run.save(step, rollout)
        run.finish()  # the final adapter (PEFT format) and plots.png
    return Path(cfg.out_dir)


def main(argv: list[str]):
    try:
        train(from_command_line(argv, __doc__))  # --help: every recipe and field, then exit
    except RunDone as e:  # resume=true on a run done up to the steps asked for
        console.print(str(e), soft_wrap=True)
    except PopsdError as e:
        sys.exit(fatal(e))
    except KeyboardInterrupt:  # Ctrl-C at start-up, or a second one in the loop: no traceback
        console.print("[yellow]interrupted: stopped at once; the run folder keeps what its last "
                      "checkpoint saved (resume=true continues from it)[/]")
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
