"""popsd.py: Purified OPSD (arXiv 2607.02234) in one training loop. Read this file first.

    python popsd.py --recipe toy                      # CPU, ~1 min: the toy world's pre-trained reasoner
    python popsd.py --recipe single_gpu               # one 24 GB card, 4-bit QLoRA
    python popsd.py --recipe toy steps=30 method=opsd # key=value overrides any Config field (config.py)

A recipe (recipes/*.py) is Python that popsd executes: read one you downloaded before running it.

One optimizer step, as numbered in train() below:
  1. sample: the student π_θ (base + LoRA) completes each question from the question alone: ŷ ~ π_θ(· | q);
  2. score: three passes of the same weights, LoRA off and no gradient, score every position of ŷ over the
     whole vocabulary: teacher π_T(· | q, r, ŷ<t), reference-only π_ref(· | r, ŷ<t), clean base
     π_0(· | q, ŷ<t);
  3. target and loss: Purified's P = softmax(log π_0 + c·tanh(centre(log π_T − log π_ref)/c)/β) (OPSD:
     P = π_T), and the student pass (LoRA on) against it: the per-token divergence D(P ‖ π_θ) (loss.py);
  4. step: the loss summed over the step's tokens and divided by their number, backward, clip, AdamW;
  5. sync: the sampling engine gets the updated adapter, so every rollout is on-policy (rollout_ahead=1:
     one step behind, for speed);
  6. log (and evaluate every eval_every steps); 7. save a checkpoint every save_every steps.
Where the rest is: ŷ's engines in engines/ (chosen by rollout_engine / rollout_server); the four contexts and
how ŷ lines up with them in rollout.py; the math in loss.py (loss_fused.py: the same, chunked); the run's
folder, logs and guards in session.py, checkpoints.py and guards.py. docs/walkthrough.md traces one step.
Departures from the paper: teacher=live and teacher=ema (ema.py) apply to the teacher and reference-only
passes; the clean base stays the frozen initial policy.
"""
import math
import sys
from pathlib import Path

import torch

import loss as L
from engines import request_seed
from plumbing import distributed as D, ema, loss_fused
from plumbing.config import Config, field_docs, make_config, recipe_list
from plumbing.data import PopsdError
from plumbing.models import model_parts
from plumbing.session import Session, console
from rollout import Rollout, completion_hidden, marker_counts, repeated_ngrams


def sample(sampler, batch, cfg: Config, step: int, rank: int, world: int, on_batch=None) -> Rollout:
    """1. n completions per prompt from the student's context (q, no reference). One seed per prompt, from
    (seed, step, its place in the whole step's batch): the same samples whatever engine, server or ranks."""
    seeds = [request_seed(cfg.seed, step, rank + k * world) for k in range(len(batch))]
    rollout = sampler.generate([c.student for c in batch], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seeds=seeds,
                               on_batch=on_batch)
    rollout.contexts = [c for c in batch for _ in range(cfg.n_samples)]  # each row's four contexts: scoring
    return rollout


def frozen_passes(model, body, part: Rollout, cfg: Config, pad_id: int):
    """2. The frozen passes of one micro-batch: (teacher, reference-only, clean base) hidden states [N, H],
    each at the positions that score ŷ (rollout.completion_hidden), no graph: the target is a constant."""
    def hidden(role):  # ŷ's ids appended to this context's ids: never decoded and re-tokenized
        contexts = [getattr(c, role) for c in part.contexts]
        return completion_hidden(body, contexts, part.completions, part.mask, pad_id)

    need_refonly = cfg.method == "purified" or cfg.diagnostics  # OPSD needs it only for the diagnostics
    h_teacher = h_refonly = h_base = None
    model.eval()  # no dropout in a frozen pass
    with torch.no_grad():
        with model.disable_adapter():  # LoRA off: the initial policy, with no second copy of the weights
            h_base = hidden("student") if cfg.method == "purified" else None  # π_0: the student's context
            if cfg.teacher == "frozen":
                h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
        if cfg.teacher == "live":  # current weights, detached
            h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
        if cfg.teacher == "ema":  # the EMA adapter in place of the trained one
            with ema.active(model):
                h_teacher, h_refonly = hidden("teacher"), hidden("refonly") if need_refonly else None
    return h_teacher, h_refonly, h_base


def student_loss(model, body, head_weight, part: Rollout, frozen, cfg: Config, pad_id: int):
    """3. The student pass (LoRA on, with grad) and the loss against the target: (Σ of D over the
    micro-batch's tokens, per-token stats). loss_impl=reference runs loss.reference_loss, the readable lines;
    the default, fused (loss_fused.py), the same numbers in chunks."""
    model.train()
    student_contexts = [c.student for c in part.contexts]
    h_student = completion_hidden(body, student_contexts, part.completions, part.mask, pad_id)  # [N, H]
    needs_tokens = part.logprobs is not None or cfg.support == "sampled"  # the gap; the sampled-token loss
    tokens = part.completions[part.mask].to(h_student.device) if needs_tokens else None  # [N] ŷ
    options = dict(method=cfg.method, kind=cfg.divergence, jsd_mix=cfg.jsd_mix, beta=cfg.beta,
                   pmi_clip=cfg.pmi_clip, term_clamp=cfg.term_clamp, tokens=tokens, support=cfg.support,
                   temperature=cfg.loss_temperature or cfg.temperature, topk=cfg.topk,
                   topk_tail=cfg.topk_tail)
    if cfg.loss_impl == "fused":
        loss_sum, stats = loss_fused.fused_loss(h_student, *frozen, head_weight, chunk_mb=cfg.loss_chunk_mb,
                                                compile=cfg.loss_compile, **options)
    else:
        loss_sum, stats = L.reference_loss(h_student, *frozen, head_weight, **options)
    if part.logprobs is not None:  # rollout/trainer mismatch: the engine's raw log-probs vs the student's
        sampler_lp = part.logprobs[part.mask].to(stats["logprob"].device)  # [N]
        stats["sampler_logprob_gap"] = (stats.pop("logprob") - sampler_lp).abs()
    stats.pop("logprob", None)
    return loss_sum, stats


def update(model, body, head_weight, rollout: Rollout, cfg: Config, pad_id: int, optimizer, scheduler):
    """2-4 for the whole step: score, loss and backward per micro-batch, then one optimizer step; the step's
    metrics. Sums travel by name and are summed over ranks (distributed.all_sum_named)."""
    # The loss is divided by N_step, the valid tokens of the whole step on every rank, not by each
    # micro-batch's own count, and FSDP sums gradients over ranks: micro-batching and the number of ranks
    # change nothing.
    n_step = int(D.all_sum([rollout.mask.sum().item()])[0])
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
    grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP
    repeats, grams = repeated_ngrams(rollout.completions, rollout.mask)
    counts = {"sequences": len(rollout), "truncated": rollout.truncated.sum().item(),
              "markers": marker_counts(rollout.texts), "repeats": repeats, "grams": grams}
    totals = D.all_sum_named(sums | counts)
    lr = scheduler.get_last_lr()[0]
    skipped = not (math.isfinite(totals["loss"]) and math.isfinite(grad_norm))  # the same on every rank
    if not skipped:  # a non-finite loss or gradient never reaches the weights
        optimizer.step()
        scheduler.step()
        if cfg.teacher == "ema":
            ema.update(model, cfg.ema_rate)
    optimizer.zero_grad(set_to_none=True)
    seqs = totals["sequences"]
    return {"loss": totals["loss"] / n_step, "lr": lr, "grad_norm": grad_norm,
            "completion_len": n_step / seqs, "truncated": totals["truncated"] / seqs, "tokens": n_step,
            "markers_per_1k": 1000 * totals["markers"] / n_step,
            "repeated_4grams": totals["repeats"] / max(totals["grams"], 1), "skipped": skipped,
            **{k: totals[k] / n_step for k in sorted(set(sums) - {"loss"})}}  # per-token means of the stats


def train(cfg: Config) -> Path:
    """The loop. Rank 0 alone prints, logs and saves (session.py); every rank samples and scores its share."""
    with Session(cfg) as run:  # set-up and clean-up: the run folder, data, model, optimizer, sampler, logs
        model, sampler = run.model, run.sampler
        body, head_weight = model_parts(model)  # the loss reads hidden states and the frozen head [V, H]
        for step, batch in run.steps():  # this rank's share of the step's prompts
            # 1. sample ŷ: n completions per prompt from the student (rollout_ahead=1: sampled already, while
            #    the last step trained, by the adapter one step older; engines/ahead.py)
            with run.sampling(step, len(batch) * cfg.n_samples) as on_batch:  # a stop here drops the step
                rollout = (run.ahead.take(step, batch)
                           or sample(sampler, batch, cfg, step, run.rank, run.world, on_batch))
            if cfg.rollout_ahead and step < cfg.steps:  # the next step's ŷ are sampled while this one trains
                run.ahead.start(step + 1, sample, sampler, run.upcoming(), cfg, step + 1, run.rank, run.world)
            # 2-4. score in the frozen contexts, target and loss per micro-batch, one optimizer step
            row = {"step": step, "policy_lag": rollout.policy_lag(step),
                   **update(model, body, head_weight, rollout, cfg, run.pad_id, run.optimizer, run.scheduler)}
            # 5. sync: the updated adapter reaches the engine before it samples again
            with run.timed(row, "time_sync"):
                sampler.sync(model, step)
            # 6. log: the guards (guards.py), the evaluation when due, metrics.jsonl, the step line
            run.log(row, rollout)
            # 7. save: a checkpoint when due, and the exit a Ctrl-C asked for (every rank: shards gathered)
            run.save(step, rollout)
        run.finish()  # the final adapter (PEFT format) and plots.png
    return Path(cfg.out_dir)


def usage() -> str:
    """--help: the commands, every recipe with its first line, every field's type, default and comment."""
    recipes = "\n".join(f"  {name:<22}{line}" for name, line in recipe_list())
    fields = "\n".join(f"  {name}: {kind} = {default}{f'  # {comment}' if comment else ''}"
                       for name, kind, default, comment in field_docs())
    return f"{__doc__}\nRecipes (recipes/*.py):\n{recipes}\n\nConfig fields (key=value):\n{fields}\n"


def main(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help"):
        short = usage().split("\nConfig fields")[0] + "\nAll fields: python popsd.py --help"
        print(usage() if argv else short)
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
        console.print("[yellow]interrupted: stopped at once; the run folder keeps what its last checkpoint "
                      "saved (resume=true continues from it)[/]")
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
