"""guards.py: a run that diverges, collapses or cannot learn says so and why, and stops before it wastes more.

    health(row, ...)       after every step: skipped or gradient-free steps counted (three in a row stop),
                           a collapse or degenerate repetition warned (and marked in metrics), the sampler's
                           log-prob gap warned or stopped on, the setting to blame named where one is extreme
    check_outputs(...)     before a checkpoint: finite weights can still give infinite logits (lr=1e30)
    check_batch(...)       before the model loads: a step larger than the data is a typo
"""
import math

import torch

from plumbing.config import Config
from plumbing.data import PopsdError
from rollout import Rollout, completion_hidden


@torch.no_grad()
def check_outputs(model, body, head_weight, rollout: Rollout, pad_id: int, step: int):
    """Before a checkpoint is saved: the updated student's logits on one of the step's sequences are finite
    (finite weights can still overflow: lr=1e30 gives weights of 1e30 and infinite logits)."""
    model.eval()
    h = completion_hidden(body, [rollout.contexts[0].student], rollout.completions[:1], rollout.mask[:1],
                          pad_id)
    if not torch.isfinite(h.float() @ head_weight.float().T).all():
        raise PopsdError(f"after step {step} the student's logits are not finite: the run diverged and this "
                         "state is not saved; lower lr or max_grad_norm and resume from the last checkpoint")


# steps in a row that changed nothing (a non-finite or an exactly zero gradient) before the run stops
MAX_SKIPS = 3


def extreme_settings(cfg: Config) -> list[str]:
    """The settings that saturate or flatten every softmax: what a run that cannot learn is most likely set
    to."""
    tau, found = cfg.loss_temperature or cfg.temperature, []
    if tau < 0.05:
        found.append(f"τ={tau:g} (loss_temperature, else temperature) makes every softmax one-hot, "
                     "with no gradient")
    if cfg.temperature > 2:
        found.append(f"temperature={cfg.temperature:g} samples near-uniform text")
    if cfg.method == "purified" and cfg.beta < 0.05:
        found.append(f"beta={cfg.beta:g} makes the target one-hot on the largest Δ̃ (log P = log π_0 + Δ̃/β)")
    return found


def health(row: dict, stalls: int, vocab: int, cfg: Config, saved: int | None = None
           ) -> tuple[int, list[str], str | None]:
    """(steps in a row that changed nothing, warnings for this step, why the run must stop or None).

    A step changes nothing when its loss or gradient is not finite (the update is skipped) or its gradient is
    exactly zero; MAX_SKIPS in a row stop the run, naming the settings likely to blame. A collapsed student is
    warned and marked `collapse` in metrics: entropy near ln V (uniform), a zero gradient with a loss left, or
    a JSD near its ceiling H(b) (student and target almost disjoint: no gradient left); so is degenerate
    repetition (`repetition`). The sampler's log-prob gap (engines) above sampler_gap_warn is warned, above
    sampler_gap_stop the run stops: the engine is not sampling from the student. saved: the step of the run's
    newest checkpoint (None: none yet), which a stop points to."""
    step, warnings, stop = row["step"], [], None
    settings = extreme_settings(cfg)
    blame = ": " + "; ".join(settings) if settings else ""
    stalls = stalls + 1 if row["skipped"] or row["grad_norm"] == 0 else 0
    if row["skipped"]:
        warnings.append(f"step {step}: non-finite loss or gradient, update skipped ({stalls} in a row)")
        if stalls >= MAX_SKIPS:
            then = (f"resume from the last checkpoint (step {saved}), which holds finite weights"
                    if saved is not None else "no checkpoint was saved yet: start the run again")
            fix = (f"the settings likely to blame{blame}; change them and {then}" if settings else
                   f"the run is diverging; lower lr or max_grad_norm and {then}")
            stop = (f"{stalls} steps in a row had a non-finite loss or gradient (step {step}, lr "
                    f"{row['lr']:.2g}): {fix}")
    elif row["grad_norm"] == 0:
        warnings.append(f"step {step}: the gradient is exactly zero, this step taught nothing "
                        f"({stalls} in a row)"
                        + blame)
        if stalls >= MAX_SKIPS:
            stop = (f"{stalls} steps in a row had no gradient at all (loss {row['loss']:.2g}): this "
                    "run cannot learn"
                    + (blame
                       or " (the student equals its target, or every softmax it compares is saturated)"))
    b = cfg.jsd_mix
    ceiling = -b * math.log(b) - (1 - b) * math.log(1 - b) if cfg.divergence == "jsd" else math.inf
    why = [w for w, bad in ((f"entropy {row.get('entropy', 0):.2f} of at most {math.log(vocab):.2f}",
                             row.get("entropy", 0) > 0.95 * math.log(vocab)),
                            ("a zero gradient", row["grad_norm"] == 0 and row["loss"] > 0),
                            (f"JSD {row['loss']:.3f} near its ceiling {ceiling:.3f}",
                             row["loss"] > 0.9 * ceiling)) if bad]
    if why and not row["skipped"]:
        row["collapse"] = True
        warnings.append(f"step {step}: the student looks collapsed ({', '.join(why)})"
                        + (blame or ": lower lr?"))
    if any(not math.isfinite(row[k]) for k in ("cos_total_ref", "cos_total_it", "norm_ratio") if k in row):
        warnings.append(f"step {step}: the Δ diagnostics are not finite (every softmax saturated?)" + blame)
    # R1-Distill's failure under OPSD
    if row.get("repeated_4grams", 0) > 0.5 and row.get("truncated", 0) > 0.5:
        row["repetition"] = True
        warnings.append(f"step {step}: the student repeats itself ({100 * row['repeated_4grams']:.0f}% of "
                        f"its 4-grams seen before in the same completion, {100 * row['truncated']:.0f}% of "
                        "completions cut at max_new_tokens): degenerate repetition; lower lr, or compare "
                        "method=purified")
    gap = row.get("sampler_logprob_gap")
    if gap is not None and not gap <= cfg.sampler_gap_warn:  # NaN too
        said = (f"the sampler's log-probs of its tokens differ from the student's by {gap:.2g} nats per "
                "token on average")
        causes = ("likely causes: an adapter on the engine other than this step's (a stale or another "
                  "run's), a sampling setting the trainer does not know (the server's logprobs mode must be "
                  "raw_logprobs), or another model or dtype on the engine than the trainer's")
        lagged = row.get("policy_lag", 0) > 0
        if lagged:  # one step ahead the gap holds one optimizer step's change too: a warning, never a stop
            said += (f" (policy_lag {row['policy_lag']}: it includes the change of the optimizer step since "
                     "they were sampled; the run's first step, on-policy, checked the engine itself)")
        if not gap <= cfg.sampler_gap_stop and not lagged:
            stop = (f"step {step}: {said} (sampler_gap_stop={cfg.sampler_gap_stop:g}): the engine is not "
                    f"sampling from the student; {causes}")
        else:
            warnings.append(f"step {step}: {said} (above sampler_gap_warn={cfg.sampler_gap_warn:g}; engine "
                            f"precision is ~1e-6 in fp32): {causes}")
    return stalls, warnings, stop


def check_batch(cfg: Config, available: int, what: str):
    """A step that samples more prompts than the data holds repeats prompts within the step: almost always a
    typo (batch_size=100000 on 2,000 rows once sampled for minutes before anything showed)."""
    if cfg.batch_size > available:
        raise PopsdError(f"config key 'batch_size' asks for {cfg.batch_size} prompts per step, but "
                         f"{cfg.data} holds {available} {what}: a step would repeat prompts; lower "
                         "batch_size (n_samples gives several completions per prompt)")
