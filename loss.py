"""loss.py: the math of Purified OPSD and OPSD, as pure functions on tensors.

Shapes: N completion tokens (flattened over the batch), V vocabulary, H hidden size.
All arithmetic is float32 whatever the input dtype (bf16 log-softmax gives negative JSDs).

    Δ_total = log π_T − log π_θ  =  (log π_ref − log π_θ)  +  (log π_T − log π_ref)
                                        Δ_ref (shortcut)        Δ_it (question PMI)
    Purified target   log P = log_softmax(log π_0 + c·tanh(centre(Δ_it)/c) / β)     purified_target
    OPSD target       log P = log π_T                                               opsd_target
    loss per token    D(P ‖ π_θ): generalized JSD, forward KL or reverse KL          divergence
      on a support    full vocabulary; top-k of P (renormalised, or + a tail bucket)  support_logp
                      or the sampled token: −A_t·log π_θ(ŷ_t), A_t = log P(ŷ_t) − log π_θ(ŷ_t)  sampled_loss

Departures from the paper: none known; the JSD mixture weight 0.5 and dividing every side's
logits by the sampling temperature follow the third-party reading (../shared/PAPER.md).
"""
import math

import torch
import torch.nn.functional as F

KINDS = ("jsd", "forward_kl", "reverse_kl")
SUPPORTS = ("full", "topk", "sampled")


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


def support_logp(student_logp, target_logp, *, k, tail=False):
    """Both distributions on the target's k most likely tokens per row: [N, k] log-probs renormalised on them,
    or with tail=True [N, k + 1] with a last bucket holding the rest of each one's mass (then nothing is
    renormalised). Inputs: [N, V] log-probs."""
    if not 1 <= k <= target_logp.shape[-1]:
        raise ValueError(f"topk {k} must be between 1 and the vocabulary size {target_logp.shape[-1]}")
    idx = target_logp.detach().topk(k, dim=-1).indices  # [N, k]
    s, t = student_logp.gather(-1, idx), target_logp.gather(-1, idx)  # [N, k] each
    if not tail:
        return torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    rest = lambda x: x.scatter(-1, idx, -math.inf).logsumexp(-1, keepdim=True).clamp_min(-1e30)  # noqa: E731 [N, 1]
    return torch.cat([s, rest(student_logp)], -1), torch.cat([t, rest(target_logp)], -1)  # [N, k + 1]


def sampled_loss(student_logp, target_logp, tokens):
    """Per-token [N] −A_t·log π_θ(ŷ_t), A_t = log P(ŷ_t) − log π_θ(ŷ_t) detached: the sampled-token estimator
    of reverse KL(π_θ‖P) (its gradient in expectation over ŷ_t ~ π_θ). Can be negative."""
    idx = tokens[:, None].long().to(student_logp.device)  # [N, 1]
    s = student_logp.gather(-1, idx)[:, 0]  # [N] log π_θ(ŷ_t)
    advantage = (target_logp.detach().float().gather(-1, idx)[:, 0] - s).detach()  # [N]
    return -advantage * s  # [N]


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
def token_logprob(logits, tokens):
    """[N] log softmax(logits)[tokens] at τ = 1: the log-prob a sampler reports for the token it sampled."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None].long())[:, 0]  # [N]


@torch.no_grad()
def entropy(logits, *, temperature=1.0):
    """Per-token entropy [N] of softmax(logits/τ)."""
    logp = _logp(logits, temperature)  # [N, V]
    return -(logp.exp() * logp).sum(dim=-1)  # [N]


def check_support(support, kind, token_clip, tokens):
    if support not in SUPPORTS:
        raise ValueError(f"support {support!r} is not one of {SUPPORTS}")
    if support == "sampled" and (kind != "reverse_kl" or token_clip is not None or tokens is None):
        raise ValueError("support='sampled' is the sampled-token estimator of reverse KL: it needs kind='reverse_kl', "
                         f"no token_clip and the sampled tokens (got kind={kind!r}, token_clip={token_clip!r}, "
                         f"tokens {'given' if tokens is not None else 'missing'})")


def reference_loss(h_student, h_teacher, h_refonly, h_base, weight, *, method="purified", kind="jsd",
                   jsd_beta=0.5, beta=1.0, clip=10.0, temperature=1.0, token_clip=None, tokens=None,
                   support="full", topk=100, topk_tail=False):
    """The readable path: materialise all logits, then target → divergence.

    h_*: [N, H] final hidden states at the positions that score ŷ (see rollout.completion_hidden);
    weight: [V, H] frozen output head. h_refonly may be None for method="opsd" (then no diagnostics).
    tokens: [N] the sampled ids ŷ_t, optional: then stats["logprob"] is the student's log π_θ(ŷ_t) at τ = 1
    (raw logits, as a sampler reports it); support="sampled" needs them.
    support: the divergence over the full vocabulary, over the target's top-k (support_logp) or on the
    sampled token (sampled_loss).
    Returns (loss_sum: scalar, sum over N of the per-token divergence; stats: per-token [N] tensors).
    """
    check_support(support, kind, token_clip, tokens)
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
    if support == "full":
        per_token = divergence(student, target, kind=kind, jsd_beta=jsd_beta,
                               temperature=temperature, token_clip=token_clip)  # [N]
    elif support == "topk":
        s_k, t_k = support_logp(_logp(student, temperature), target, k=topk, tail=topk_tail)  # [N, k(+1)]
        per_token = divergence(s_k, t_k, kind=kind, jsd_beta=jsd_beta, token_clip=token_clip)  # [N]
    else:
        per_token = sampled_loss(_logp(student, temperature), target, tokens)  # [N]
    stats = {"entropy": entropy(student, temperature=temperature)}  # [N]
    if tokens is not None:
        stats["logprob"] = token_logprob(student.detach(), tokens)  # [N]
    if refonly is not None:
        stats.update(signal_diagnostics(student, teacher, refonly, temperature=temperature))
    return per_token.sum(), stats


# ----------------------------------------------------------------------------- fused, chunked path
# Same math as reference_loss, never holding more than one chunk of [C, V] rows per distribution.
# The student's gradient is computed during the forward, chunk by chunk, so the backward does no
# projection: it only scales the stored [N, H] gradient. Buffers are allocated once per call.

def _project(out, h, w, temperature):
    """out [C, V] float32 ← (h @ wᵀ) / τ, fp32 accumulation and output whatever the input dtype."""
    if w.dtype == torch.float32:
        torch.mm(h.float(), w.T, out=out)  # [C, V]
    else:  # bf16/fp16 weights: CUDA only (on CPU the caller passes an fp32 copy)
        torch.mm(h.to(w.dtype), w.T, out_dtype=torch.float32, out=out)  # [C, V]
    if temperature != 1.0:
        out.mul_(1.0 / temperature)


def _log_softmax_into(out, logits):
    torch._log_softmax(logits, -1, False, out=out)  # [C, V], native fused kernel, no allocation


def _row_sum_of_product(a, b, tmp):
    return torch.mul(a, b, out=tmp).sum(-1)  # [C]


def fused_loss(h_student, h_teacher, h_refonly, h_base, weight, *, method="purified", kind="jsd", jsd_beta=0.5,
               beta=1.0, clip=10.0, temperature=1.0, token_clip=None, chunk_size=None, chunk_mb=512, tokens=None,
               support="full", topk=100, topk_tail=False, compile="auto"):
    """reference_loss's (loss_sum, stats), computed in chunks of tokens.

    h_*: [N, H] hidden states (any float dtype); weight: [V, H] frozen head. chunk_size: tokens per
    chunk; None picks it from a memory budget: the chunk's [C, V] float32 buffers fit chunk_mb MiB.
    loss_sum has a gradient to h_student only, computed in the forward (no projection is redone).
    compile: "on" runs each chunk's elementwise chain as one torch.compile'd function (_chunk: a few fused
    kernels instead of ~30 passes over [C, V]; support=full only), "off" the in-place eager chain, "auto" = on
    for CUDA (on CPU the compile time would swamp a short run and the eager chain is as fast).
    """
    if method not in ("purified", "opsd"):
        raise ValueError(f"method {method!r} is not 'purified' or 'opsd'")
    if method == "purified" and (h_refonly is None or h_base is None):
        raise ValueError("method='purified' needs h_refonly and h_base")
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {KINDS}")
    check_support(support, kind, token_clip, tokens)
    if support == "topk" and not 1 <= topk <= weight.shape[0]:
        raise ValueError(f"topk {topk} must be between 1 and the vocabulary size {weight.shape[0]}")
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile {compile!r} is not 'auto', 'on' or 'off'")
    compiled = support == "full" and (compile == "on" or (compile == "auto" and h_student.device.type == "cuda"))
    opts = dict(compiled=compiled, method=method, kind=kind, b=jsd_beta, beta=beta, clip=clip, tau=temperature,
                token_clip=token_clip, chunk_size=chunk_size, chunk_mb=chunk_mb, tokens=tokens,
                support=support, k=topk, tail=topk_tail,
                need_grad=torch.is_grad_enabled() and h_student.requires_grad)
    loss_sum, stats = _FusedLoss.apply(h_student, weight, h_teacher, h_refonly, h_base, opts)
    names = ["entropy"] + (["cos_total_ref", "cos_total_it", "norm_ratio"] if h_refonly is not None else []) + \
        (["logprob"] if tokens is not None else [])
    return loss_sum, {k: stats[:, i] for i, k in enumerate(names)}


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_student, weight, h_teacher, h_refonly, h_base, opts):
        loss_sum, stats, grad = _fused_forward(h_student, weight, h_teacher, h_refonly, h_base, **opts)
        ctx.save_for_backward(grad)
        ctx.dtype = h_student.dtype
        ctx.mark_non_differentiable(stats)
        return loss_sum, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        (grad,) = ctx.saved_tensors  # [N, H] float32: d loss_sum / d h_student
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None, None


@torch.no_grad()
def _fused_forward(h_student, weight, h_teacher, h_refonly, h_base, *, method, kind, b, beta, clip, tau,
                   token_clip, chunk_size, chunk_mb, tokens, support, k, tail, need_grad, compiled=False):
    n, v = h_student.shape[0], weight.shape[0]
    device = h_student.device
    w = weight.detach()
    if w.dtype != torch.float32 and device.type != "cuda":
        w = w.float()  # [V, H]: CPU has no fp32-output bf16 matmul
    diag = h_refonly is not None
    n_buf = 5 + (1 if token_clip is not None else 0)
    if compiled:  # its functional chain holds about twice the eager buffers (measured: bench/loss.py on CPU)
        n_buf *= 2
    rows = min(n, chunk_size or max(1, (chunk_mb << 20) // (n_buf * v * 4)))
    A, D, E, F, G = (torch.empty(rows, v, device=device) for _ in range(5))  # [C, V] each
    Z = torch.empty(rows, v, device=device) if token_clip is not None else None  # [C, V]
    grad = torch.zeros(n, h_student.shape[1], device=device) if need_grad else None  # [N, H]
    per_token = torch.empty(n, device=device)  # [N]
    k_lp = 4 if diag else 1  # column of the token log-prob, when tokens are given
    stats = torch.empty(n, k_lp + (tokens is not None), device=device)  # [N, k]
    for i in range(0, n, rows):
        c = min(rows, n - i)
        a, d, e, f, g = A[:c], D[:c], E[:c], F[:c], G[:c]  # [c, V] views
        sl = slice(i, i + c)
        _project(e, h_student[sl], w, tau)  # e = the student's logits/τ
        if tokens is not None:  # log π_θ(ŷ_t) at τ = 1 (raw logits): d is scratch until it holds π_θ
            raw = torch.mul(e, tau, out=d) if tau != 1.0 else e  # [c, V]
            stats[sl, k_lp] = raw.gather(-1, tokens[sl, None].long().to(device))[:, 0] - torch.logsumexp(raw, -1)
        if compiled:  # the other projections, then the whole elementwise chain in one compiled call
            _project(f, h_teacher[sl], w, tau)
            if diag:
                _project(g, h_refonly[sl], w, tau)
            if method == "purified":
                _project(d, h_base[sl], w, tau)
            fn = _compiled_chunk(purified=method == "purified", kind=kind, b=b, beta=beta, clip=clip,
                                 token_clip=token_clip)
            part, grad_logits, stats[sl, :k_lp] = fn(e, f, g if diag else None, d if method == "purified" else None)
        else:
            part, grad_logits = _eager_chunk(
                a, d, e, f, g, Z[:c] if Z is not None else None, w, h_teacher[sl], h_refonly[sl] if diag else None,
                h_base[sl] if method == "purified" else None, stats[sl], kind=kind, b=b, beta=beta, clip=clip,
                tau=tau, token_clip=token_clip, support=support, k=k, tail=tail,
                tokens=None if tokens is None else tokens[sl].long().to(device))
        per_token[sl] = part
        if need_grad:  # d loss_sum / d h = (d D / d logits) @ W / τ
            if w.dtype == torch.float32:
                torch.mm(grad_logits, w, out=grad[sl])
            else:
                torch.mm(grad_logits.to(w.dtype), w, out_dtype=torch.float32, out=grad[sl])
            if tau != 1.0:
                grad[sl].mul_(1.0 / tau)
    return per_token.sum(), stats, grad


def _eager_chunk(a, d, e, f, g, z, w, h_teacher, h_refonly, h_base, stats, *, kind, b, beta, clip, tau,
                 token_clip, support, k, tail, tokens):
    """One chunk in place on its [c, V] buffers (e holds the student's logits/τ; z: token_clip scratch): the
    entropy and the cosines into stats [c, ≥1]; returns the per-token loss [c] and its logit gradient [c, V].
    h_refonly None: no diagnostics; h_base None: OPSD."""
    # student: a = log π_θ, d = π_θ
    _log_softmax_into(a, e)
    torch.exp(a, out=d)
    stats[:, 0] = -_row_sum_of_product(d, a, e)  # entropy
    # teacher: f = log π_T
    _project(e, h_teacher, w, tau)
    _log_softmax_into(f, e)
    if h_refonly is not None:  # g = log π_ref; Δ_total = f − a, Δ_it = f − g, Δ_ref = g − a = Δ_total − Δ_it
        _project(e, h_refonly, w, tau)
        _log_softmax_into(g, e)
        n_total = torch.sub(f, a, out=e).norm(dim=-1)  # [c] ‖Δ_total‖
        n_ref = torch.sub(g, a, out=e).norm(dim=-1)  # [c] ‖Δ_ref‖
        n_it = torch.sub(f, g, out=e).norm(dim=-1)  # [c] ‖Δ_it‖; e now holds Δ_it
        stats[:, 1:4] = _cosines(n_total, n_ref, n_it)
    if h_base is not None:  # f ← log P = log_softmax(log π_0 + c·tanh(centre(Δ_it)/c)/β)
        delta = e  # [c, V] Δ_it, left by the diagnostics
        delta.sub_(delta.mean(-1, keepdim=True))  # centre over the vocabulary
        if clip is not None:
            delta.mul_(1.0 / clip).tanh_().mul_(clip / beta)
        else:
            delta.mul_(1.0 / beta)
        _project(g, h_base, w, tau)
        _log_softmax_into(f, g)  # log π_0
        f.add_(delta)
        _log_softmax_into(e, f)
        target, scratch = e, f  # [c, V] log P
    else:
        target, scratch = f, e  # [c, V] log π_T
    if support == "full":
        torch.exp(target, out=g)  # [c, V] P
        return _divergence_chunk(a, d, target, g, scratch, z, kind=kind, b=b, token_clip=token_clip)
    return _support_chunk(a, d, target, scratch, g, support=support, k=k, tail=tail, kind=kind, b=b,
                          token_clip=token_clip, tokens=tokens)


def _cosines(n_total, n_ref, n_it):
    """[c, 3]: cos(Δ_total, Δ_ref), cos(Δ_total, Δ_it), ‖Δ_ref‖/‖Δ_total‖ from the three norms [c]
    (Δ_total = Δ_ref + Δ_it, so the inner products follow from the norms)."""
    nt2, nr2, ni2 = n_total.square(), n_ref.square(), n_it.square()
    denom = n_total.clamp_min(1e-12)
    return torch.stack([(nt2 + nr2 - ni2) / 2 / (denom * n_ref.clamp_min(1e-12)),
                        (nt2 + ni2 - nr2) / 2 / (denom * n_it.clamp_min(1e-12)), n_ref / denom], -1)


def _chunk(xs, xt, xr, x0, *, purified, kind, b, beta, clip, token_clip):
    """The same chunk written functionally, for torch.compile: x* [c, V] float32 logits/τ of the student, the
    teacher, the reference-only teacher (None: no diagnostics) and the clean base (purified only). Returns the
    per-token loss [c], its gradient w.r.t. the student's logits/τ [c, V] and the stats [c, 1 or 4]."""
    s = torch.log_softmax(xs, -1)  # [c, V] log π_θ
    q = s.exp()
    t = torch.log_softmax(xt, -1)  # [c, V] log π_T
    stats = [-(q * s).sum(-1, keepdim=True)]  # entropy
    if xr is not None:
        r = torch.log_softmax(xr, -1)  # [c, V] log π_ref
        stats.append(_cosines((t - s).norm(dim=-1), (r - s).norm(dim=-1), (t - r).norm(dim=-1)))
    if purified:
        delta = t - r  # [c, V] Δ_it
        delta = delta - delta.mean(-1, keepdim=True)
        delta = (clip * torch.tanh(delta / clip) if clip is not None else delta) / beta
        t = torch.log_softmax(torch.log_softmax(x0, -1) + delta, -1)  # [c, V] log P
    p = t.exp()
    if kind == "jsd":  # a = ∂D/∂s as in _divergence_chunk; the logit gradient a − q·Σa
        if b <= 0.0 or b >= 1.0:
            return xs.new_zeros(xs.shape[0]), torch.zeros_like(xs), torch.cat(stats, -1)
        m = torch.logaddexp(t + math.log(b), s + math.log1p(-b))  # [c, V] log M
        terms_q = q * (s - m)
        terms, a = b * p * (t - m) + (1.0 - b) * terms_q, (1.0 - b) * terms_q
    elif kind == "forward_kl":
        terms, a = p * (t - s), -p
    else:  # reverse_kl
        terms, a = q * (s - t), q * (s - t + 1.0)
    if token_clip is not None:
        a = a.masked_fill(terms > token_clip, 0.0)
        terms = terms.clamp(max=token_clip)
    return terms.sum(-1), a - q * a.sum(-1, keepdim=True), torch.cat(stats, -1)


_COMPILED = {}


def _compiled_chunk(**opts):
    """_chunk with these options, compiled once per process and option set (dynamic in the chunk's rows)."""
    key = tuple(sorted(opts.items()))
    if key not in _COMPILED:
        def chunk(xs, xt, xr, x0):
            return _chunk(xs, xt, xr, x0, **opts)
        # dynamo keeps compiled graphs, and its limit of 8 recompiles (past it: eager, silently), per code object,
        # which every closure of `chunk` shares: a copy of the code per option set gives each its own cache
        chunk.__code__ = chunk.__code__.replace()
        _COMPILED[key] = torch.compile(chunk, dynamic=True)
    return _COMPILED[key]


def _support_chunk(s, q, t, tmp, out, *, support, k, tail, kind, b, token_clip, tokens):
    """support = topk | sampled for one chunk: the per-token loss [c] and its gradient w.r.t. the student's
    logits/τ, written into out [c, V]. s = log π_θ, q = π_θ, t = log P: [c, V]; tmp: scratch.
      sampled: ∂/∂x of −A·s(ŷ) = A·(q − onehot(ŷ))
      topk: the divergence on the small [c, k(+1)] tensors with autograd, then back to the vocabulary: an entry
      of the support gets its bucket's gradient g, a tail entry v gets g_tail·q_v/q_tail (g taken after the
      log-softmax, so it sums to zero over the buckets)."""
    if support == "sampled":
        idx = tokens[:, None]  # [c, 1]
        s_y = s.gather(-1, idx)[:, 0]  # [c]
        adv = t.gather(-1, idx)[:, 0] - s_y  # [c] A
        torch.mul(q, adv[:, None], out=out).scatter_add_(-1, idx, -adv[:, None])  # [c, V]
        return -adv * s_y, out
    idx = t.topk(k, dim=-1).indices  # [c, k]
    s_b, t_b = s.gather(-1, idx), t.gather(-1, idx)  # [c, k]
    if tail:  # log of the mass off the support, each side
        rest = lambda x: tmp.copy_(x).scatter_(-1, idx, -math.inf).logsumexp(-1, keepdim=True).clamp_min(-1e30)  # noqa
        s_rest = rest(s)  # [c, 1]
        s_b, t_b = torch.cat([s_b, s_rest], -1), torch.cat([t_b, rest(t)], -1)  # [c, k + 1]
    else:
        t_b = torch.log_softmax(t_b, -1)  # [c, k] P renormalised on the support (divergence renormalises s)
    with torch.enable_grad():
        leaf = s_b.requires_grad_()
        part = divergence(leaf, t_b, kind=kind, jsd_beta=b, token_clip=token_clip)  # [c]
        (g,) = torch.autograd.grad(part.sum(), leaf)  # [c, k(+1)]
    if tail:
        torch.sub(s, s_rest, out=out).clamp_(max=0.0).exp_().mul_(g[:, -1:])  # [c, V] g_tail·q_v/q_tail
        out.scatter_(-1, idx, g[:, :-1])
    else:
        out.zero_().scatter_(-1, idx, g)
    return part.detach(), out


def _divergence_chunk(s, q, t, p, tmp, z, *, kind, b, token_clip):
    """Per-token divergence [c] and its gradient w.r.t. the student's logits/τ [c, V], in closed form.

    s = log π_θ, q = π_θ, t = log P, p = P: [c, V]; tmp (and z with token_clip): scratch. Inputs are
    overwritten. With a = ∂D/∂s (s taken as free log-probs), the logit gradient is a − q·Σ_v a.
      forward_kl: a = −p            reverse_kl: a = q(s − t + 1)            jsd: a = (1−b)·q·(s − m)
    """
    if kind == "jsd":
        if b <= 0.0 or b >= 1.0:  # the mixture equals one side: JSD is 0
            return torch.zeros(s.shape[0], device=s.device), tmp.zero_()
        t.add_(math.log(b))
        s.add_(math.log1p(-b))
        torch.logaddexp(t, s, out=tmp)  # [c, V] log M, M = b·P + (1−b)·π_θ
        t.sub_(math.log(b)).sub_(tmp)  # [c, V] t − m
        s.sub_(math.log1p(-b)).sub_(tmp)  # [c, V] s − m
        if token_clip is None:
            kl_p = _row_sum_of_product(p, t, tmp)  # [c] KL(P‖M)
            a = torch.mul(q, s, out=t)  # [c, V] q(s − m), t no longer needed
            kl_q = a.sum(-1)  # [c] KL(π_θ‖M)
            a.addcmul_(q, kl_q.unsqueeze(-1), value=-1.0).mul_(1.0 - b)  # [c, V] a − q·Σa
            return b * kl_p + (1.0 - b) * kl_q, a
        torch.mul(p, t, out=z).mul_(b)  # [c, V] b·p(t − m)
        a = torch.mul(q, s, out=t).mul_(1.0 - b)  # [c, V] (1−b)·q(s − m)
        z.add_(a)  # [c, V] terms
    elif kind == "forward_kl":
        t.sub_(s)  # [c, V] t − s
        if token_clip is None:
            return _row_sum_of_product(p, t, tmp), q.sub_(p)  # Σ p(t − s); a − q·Σa = q − p
        z = torch.mul(p, t, out=z)  # [c, V] terms
        a = p.neg_()  # [c, V]
    else:  # reverse_kl
        s.sub_(t)  # [c, V] s − t
        if token_clip is None:
            kl = _row_sum_of_product(q, s, tmp)  # [c]
            return kl, s.sub_(kl.unsqueeze(-1)).mul_(q)  # q(s − t + 1) − q·(KL + 1) = q(s − t − KL)
        z = torch.mul(q, s, out=z)  # [c, V] terms
        a = s.add_(1.0).mul_(q)  # [c, V]
    clipped = z > token_clip  # [c, V] these terms are constant: no gradient
    a.masked_fill_(clipped, 0.0)
    a.addcmul_(q, a.sum(-1, keepdim=True), value=-1.0)  # [c, V] a − q·Σa
    return z.clamp_(max=token_clip).sum(-1), a
