"""loss.py: the math of Purified OPSD and OPSD, as pure functions on tensors.

Shapes: N completion tokens (flattened over the batch), V vocabulary, H hidden size.
All arithmetic is float32 whatever the input dtype (bf16 log-softmax gives negative JSDs).

    Δ_total = log π_T − log π_θ  =  (log π_ref − log π_θ)  +  (log π_T − log π_ref)
                                        Δ_ref (shortcut)        Δ_it (question PMI)
    Purified target   log P = log_softmax(log π_0 + c·tanh(centre(Δ_it)/c) / β)     purified_target
    OPSD target       log P = log π_T                                               opsd_target
    loss per token    D(P ‖ π_θ): generalized JSD, forward KL or reverse KL          divergence

Departures from the paper: none known; the JSD mixture weight 0.5 and dividing every side's
logits by the sampling temperature follow the third-party reading (../shared/PAPER.md).
"""
import math

import torch
import torch.nn.functional as F

KINDS = ("jsd", "forward_kl", "reverse_kl")


def _logp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V] float32


def purified_target(teacher_logits, refonly_logits, base_logits, *, beta=1.0, clip=10.0, temperature=1.0):
    """log P, P = softmax(log π_0 + c·tanh(centre(log π_T − log π_ref)/c)/β). clip=None: no clip."""
    delta = _logp(teacher_logits, temperature) - _logp(refonly_logits, temperature)  # [N, V] Δ_it
    delta = delta - delta.mean(dim=-1, keepdim=True)  # [N, V] centred over the vocabulary
    if clip is not None:
        delta = clip * torch.tanh(delta / clip)  # [N, V] soft clip to (−c, c)
    return torch.log_softmax(_logp(base_logits, temperature) + delta / beta, dim=-1)  # [N, V]


def opsd_target(teacher_logits, *, temperature=1.0):
    """log π_T: the standard OPSD target."""
    return _logp(teacher_logits, temperature)  # [N, V]


def divergence(student_logits, target_logp, *, kind="jsd", jsd_beta=0.5, temperature=1.0, token_clip=None):
    """Per-token divergence [N] between the target P (detached) and the student π_θ.

    jsd:        b·KL(P‖M) + (1−b)·KL(π_θ‖M),  M = b·P + (1−b)·π_θ,  b = jsd_beta
    forward_kl: KL(P‖π_θ)       reverse_kl: KL(π_θ‖P)
    token_clip clamps each (token, vocab entry) term from above before the vocab sum (OPSD's update).
    """
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    s = _logp(student_logits, temperature)  # [N, V] log π_θ
    t = target_logp.detach().float()  # [N, V] log P
    if kind == "forward_kl":
        terms = t.exp() * (t - s)  # [N, V]
    elif kind == "reverse_kl":
        terms = s.exp() * (s - t)  # [N, V]
    else:
        b = jsd_beta
        if b <= 0.0 or b >= 1.0:  # the mixture equals one side: JSD is 0
            return (s * 0.0).sum(dim=-1)  # [N], keeps the graph
        m = torch.logaddexp(t + math.log(b), s + math.log1p(-b))  # [N, V] log M
        terms = b * t.exp() * (t - m) + (1.0 - b) * s.exp() * (s - m)  # [N, V]
    if token_clip is not None:
        terms = terms.clamp(max=token_clip)  # [N, V]
    return terms.sum(dim=-1)  # [N]


@torch.no_grad()
def signal_diagnostics(student_logits, teacher_logits, refonly_logits, *, temperature=1.0):
    """Per-token [N] cos(Δ_total, Δ_ref), cos(Δ_total, Δ_it) and ‖Δ_ref‖/‖Δ_total‖ over the vocabulary."""
    s = _logp(student_logits, temperature)  # [N, V]
    t = _logp(teacher_logits, temperature)  # [N, V]
    r = _logp(refonly_logits, temperature)  # [N, V]
    total, ref, it = t - s, r - s, t - r  # [N, V] each
    return {
        "cos_total_ref": F.cosine_similarity(total, ref, dim=-1, eps=1e-12),  # [N]
        "cos_total_it": F.cosine_similarity(total, it, dim=-1, eps=1e-12),  # [N]
        "norm_ratio": ref.norm(dim=-1) / total.norm(dim=-1).clamp_min(1e-12),  # [N]
    }


@torch.no_grad()
def entropy(logits, *, temperature=1.0):
    """Per-token entropy [N] of softmax(logits/τ)."""
    logp = _logp(logits, temperature)  # [N, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [N]


def reference_loss(h_student, h_teacher, h_refonly, h_base, weight, *, method="purified", kind="jsd",
                   jsd_beta=0.5, beta=1.0, clip=10.0, temperature=1.0, token_clip=None):
    """The readable path: materialise all logits, then target → divergence.

    h_*: [N, H] final hidden states at the positions that score ŷ (see rollout.completion_hidden);
    weight: [V, H] frozen output head. h_refonly may be None for method="opsd" (then no diagnostics).
    Returns (loss_sum: scalar, sum over N of the per-token divergence; stats: per-token [N] tensors).
    """
    w = weight.detach().float()  # [V, H]
    student = h_student.float() @ w.T  # [N, V], differentiable
    with torch.no_grad():
        teacher = h_teacher.float() @ w.T  # [N, V]
        refonly = None if h_refonly is None else h_refonly.float() @ w.T  # [N, V]
        if method == "purified":
            target = purified_target(teacher, refonly, h_base.float() @ w.T,
                                     beta=beta, clip=clip, temperature=temperature)  # [N, V]
        elif method == "opsd":
            target = opsd_target(teacher, temperature=temperature)  # [N, V]
        else:
            raise ValueError(f"method {method!r} is not 'purified' or 'opsd'")
    per_token = divergence(student, target, kind=kind, jsd_beta=jsd_beta,
                           temperature=temperature, token_clip=token_clip)  # [N]
    stats = {"entropy": entropy(student, temperature=temperature)}  # [N]
    if refonly is not None:
        stats.update(signal_diagnostics(student, teacher, refonly, temperature=temperature))
    return per_token.sum(), stats
