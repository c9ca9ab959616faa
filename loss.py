"""loss.py: the math of Purified OPSD and OPSD, as pure functions on tensors. This file is the loss.

Shapes: N completion tokens (flattened over the batch), V vocabulary, H hidden size. All arithmetic is
float32 whatever the input dtype (bf16 log-softmax gives negative JSDs).

    Δ_total = log π_T − log π_θ  =  (log π_ref − log π_θ)  +  (log π_T − log π_ref)
                                      Δ_ref (shortcut)        Δ_it (question PMI)
    Purified target   log P = log_softmax(log π_0 + c·tanh(centre(Δ_it)/c) / β)   purified_target
    OPSD target       log P = log π_T                                             opsd_target
    per token         D(P ‖ π_θ): generalized JSD, forward KL or reverse KL       divergence
      on a support    the full vocabulary; the top-k of P (renormalised, or with   support_logp
                      a tail bucket); or the sampled token, −A_t·log π_θ(ŷ_t),    sampled_loss
                      A_t = log P(ŷ_t) − log π_θ(ŷ_t)
    a micro-batch     Σ of D over its N tokens (not divided)                      reference_loss
    the step's loss   Σ over the step's micro-batches and ranks / N_step, its     popsd.update
                      valid tokens

π_ref is the teacher with the reference *solution* r and no question, not GRPO's reference model.

`reference_loss` is what `loss_impl=reference` runs (the toy recipes do): these lines, logits
materialised. `loss_impl=fused` (plumbing/loss_fused.py, the default for real vocabularies) computes the
same numbers chunk by chunk in place. It calls this file's `pmi_shift_` (Δ_it centred and clipped),
`check_options` and, for the top-k support, `divergence`; it re-derives the rest by hand: the
log-softmaxes in place, the divergence's terms and their gradient with respect to the student's logits
in closed form during the forward (no autograd graph over [N, V]), and the diagnostics' cosines from
three norms. tests/test_loss.py checks both against float64 brute force, values and gradients.

Departures from the paper and the choices it leaves open: popsd.py's docstring (one list).
"""
import math

import torch
import torch.nn.functional as F

KINDS = ("jsd", "forward_kl", "reverse_kl")
SUPPORTS = ("full", "topk", "sampled")


def _logp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)  # [N, V] float32


def pmi_shift_(delta_it: torch.Tensor, *, beta: float, pmi_clip: float | None) -> torch.Tensor:
    """Δ̃/β from Δ_it [N, V], in place (delta_it is overwritten and returned): centred over the
    vocabulary (a constant per row changes no softmax, but it moves the tanh), soft-clipped to (−c, c)
    by c·tanh(·/c), divided by β. pmi_clip=None: no clip. The fused path calls it on its chunks."""
    delta_it.sub_(delta_it.mean(dim=-1, keepdim=True))  # [N, V] centre
    if pmi_clip is not None:
        return delta_it.mul_(1.0 / pmi_clip).tanh_().mul_(pmi_clip / beta)  # [N, V] c·tanh(Δ/c)/β
    return delta_it.mul_(1.0 / beta)  # [N, V]


def purified_target(teacher_logits, refonly_logits, base_logits, *, beta=1.0, pmi_clip=10.0,
                    temperature=1.0):
    """log P [N, V], P = softmax(log π_0 + c·tanh(centre(log π_T − log π_ref)/c)/β): the clean base
    moved toward what the question, and not the reference alone, makes the teacher prefer."""
    delta_it = _logp(teacher_logits, temperature) - _logp(refonly_logits, temperature)  # [N, V]
    shift = pmi_shift_(delta_it, beta=beta, pmi_clip=pmi_clip)  # [N, V] Δ̃/β
    return torch.log_softmax(_logp(base_logits, temperature) + shift, dim=-1)  # [N, V] log P


def opsd_target(teacher_logits, *, temperature=1.0):
    """log π_T [N, V]: the standard OPSD target."""
    return _logp(teacher_logits, temperature)  # [N, V]


def divergence(student_logits, target_logp, *, kind="jsd", jsd_mix=0.5, temperature=1.0,
               term_clamp=None):
    """Per-token divergence [N] between the target P (detached) and the student π_θ.

    jsd:        b·KL(P‖M) + (1−b)·KL(π_θ‖M),  M = b·P + (1−b)·π_θ,  b = jsd_mix
    forward_kl: KL(P‖π_θ)       reverse_kl: KL(π_θ‖P)
    term_clamp caps each (token, vocab entry) term before the vocab sum (OPSD's updated code: 0.05)
    """
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    s = _logp(student_logits, temperature)  # [N, V] log π_θ
    t = target_logp.detach().float()  # [N, V] log P: no gradient reaches the target
    if kind == "forward_kl":
        terms = t.exp() * (t - s)  # [N, V]
    elif kind == "reverse_kl":
        terms = s.exp() * (s - t)  # [N, V]
    else:
        b = jsd_mix
        if b <= 0.0 or b >= 1.0:  # the mixture equals one side: JSD is 0
            return (s * 0.0).sum(dim=-1)  # [N], keeps the graph
        m = torch.logaddexp(t + math.log(b), s + math.log1p(-b))  # [N, V] log M
        terms = b * t.exp() * (t - m) + (1.0 - b) * s.exp() * (s - m)  # [N, V]
    if term_clamp is not None:
        terms = terms.clamp(max=term_clamp)  # [N, V]
    return terms.sum(dim=-1)  # [N]


def support_logp(student_logp, target_logp, *, k, tail=False):
    """Both distributions on the target's k most likely tokens per row: [N, k] log-probs
    renormalised on them, or with tail=True [N, k + 1] with a last bucket holding the rest of each
    one's mass (then nothing is renormalised). Inputs: [N, V] log-probs."""
    if not 1 <= k <= target_logp.shape[-1]:
        raise ValueError(f"topk {k} must be between 1 and the vocabulary size "
                         f"{target_logp.shape[-1]}")
    idx = target_logp.detach().topk(k, dim=-1).indices  # [N, k]
    s, t = student_logp.gather(-1, idx), target_logp.gather(-1, idx)  # [N, k] each
    if not tail:
        return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    def rest(x):  # [N, 1] log of the mass off the support
        return x.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True).clamp_min(-1e30)
    return (torch.cat([s, rest(student_logp)], -1),
            torch.cat([t, rest(target_logp)], -1))  # [N, k + 1] each


def sampled_loss(student_logp, target_logp, tokens):
    """Per-token [N] −A_t·log π_θ(ŷ_t), A_t = log P(ŷ_t) − log π_θ(ŷ_t) detached: the sampled-token
    estimator of reverse KL(π_θ‖P) (its gradient in expectation over ŷ_t ~ π_θ). Can be negative."""
    idx = tokens[:, None].long().to(student_logp.device)  # [N, 1]
    s = student_logp.gather(-1, idx)[:, 0]  # [N] log π_θ(ŷ_t)
    advantage = (target_logp.detach().float().gather(-1, idx)[:, 0] - s).detach()  # [N] A_t
    return -advantage * s  # [N]


@torch.no_grad()
def signal_diagnostics(student_logits, teacher_logits, refonly_logits, *, temperature=1.0):
    """Per-token [N] cos(Δ_total, Δ_ref), cos(Δ_total, Δ_it) and ‖Δ_ref‖/‖Δ_total‖ over the
    vocabulary."""
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
def token_logprob(logits, tokens):
    """[N] log softmax(logits)[tokens] at τ = 1: the log-prob a sampler reports for its token."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    return logp.gather(-1, tokens[:, None].long())[:, 0]  # [N]


@torch.no_grad()
def entropy(logits, *, temperature=1.0):
    """Per-token entropy [N] of softmax(logits/τ)."""
    logp = _logp(logits, temperature)  # [N, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [N]


def check_options(method, kind, support, term_clamp, tokens):
    """The choices both paths take, refused when they name nothing or do not go together."""
    if method not in ("purified", "opsd"):
        raise ValueError(f"method {method!r} is not 'purified' or 'opsd'")
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    if support not in SUPPORTS:
        raise ValueError(f"support {support!r} is not one of {SUPPORTS}")
    if support == "sampled" and (kind != "reverse_kl" or term_clamp is not None or tokens is None):
        given = "given" if tokens is not None else "missing"
        raise ValueError("support='sampled' is the sampled-token estimator of reverse KL: it needs "
                         "kind='reverse_kl', no term_clamp and the sampled tokens (got "
                         f"kind={kind!r}, term_clamp={term_clamp!r}, tokens {given})")


def per_token_loss(student_logits, target_logp, *, kind="jsd", jsd_mix=0.5, temperature=1.0, term_clamp=None,
                   support="full", topk=100, topk_tail=False, tokens=None):
    """[N] the loss at each token on the chosen support: D(P ‖ π_θ) over the full vocabulary, over the
    target's top-k (support_logp), or the sampled token's −A_t·log π_θ(ŷ_t) (sampled_loss)."""
    if support == "full":
        return divergence(student_logits, target_logp, kind=kind, jsd_mix=jsd_mix, temperature=temperature,
                          term_clamp=term_clamp)  # [N]
    student_logp = _logp(student_logits, temperature)  # [N, V]
    if support == "topk":
        s_k, t_k = support_logp(student_logp, target_logp, k=topk, tail=topk_tail)  # [N, k(+1)] each
        return divergence(s_k, t_k, kind=kind, jsd_mix=jsd_mix, term_clamp=term_clamp)  # [N]
    return sampled_loss(student_logp, target_logp, tokens)  # [N]


def reference_loss(h_student, h_teacher, h_refonly, h_base, head_weight, *, method="purified",
                   kind="jsd", jsd_mix=0.5, beta=1.0, pmi_clip=10.0, temperature=1.0, term_clamp=None,
                   tokens=None, support="full", topk=100, topk_tail=False):
    """The readable path (loss_impl=reference): all logits materialised, then target → divergence.

    h_*: [N, H] final hidden states at the positions that score ŷ (rollout.completion_hidden). The
    loss starts from hidden states, not logits: at V = 151,936 the [N, V] logits of the four passes
    would not fit (the fused path never holds more than a chunk of them). head_weight: [V, H] the
    frozen output head, logits = h @ Wᵀ. h_refonly may be None for method="opsd" (then no
    diagnostics); h_base is None for OPSD. tokens: [N] the sampled ids ŷ_t, optional: then
    stats["logprob"] is the student's log π_θ(ŷ_t) at τ = 1 (raw logits, as a sampler reports it);
    support="sampled" needs them.
    Returns (loss_sum: scalar, the SUM over the N tokens of the per-token divergence, not divided:
    popsd.update divides by the step's token count; stats: per-token [N] tensors).
    """
    check_options(method, kind, support, term_clamp, tokens)
    w = head_weight.detach().float()  # [V, H]
    student = h_student.float() @ w.T  # [N, V], differentiable
    with torch.no_grad():
        teacher = h_teacher.float() @ w.T  # [N, V]
        refonly = None if h_refonly is None else h_refonly.float() @ w.T  # [N, V] or None
        if method == "purified":
            base = h_base.float() @ w.T  # [N, V]
            target = purified_target(teacher, refonly, base, beta=beta, pmi_clip=pmi_clip,
                                     temperature=temperature)  # [N, V] log P
        else:
            target = opsd_target(teacher, temperature=temperature)  # [N, V] log π_T
    per_token = per_token_loss(student, target, kind=kind, jsd_mix=jsd_mix, temperature=temperature,
                               term_clamp=term_clamp, support=support, topk=topk, topk_tail=topk_tail,
                               tokens=tokens)  # [N]
    stats = {"entropy": entropy(student, temperature=temperature)}  # [N]
    if tokens is not None:
        stats["logprob"] = token_logprob(student.detach(), tokens)  # [N]
    if refonly is not None:
        stats.update(signal_diagnostics(student, teacher, refonly, temperature=temperature))
    return per_token.sum(), stats
