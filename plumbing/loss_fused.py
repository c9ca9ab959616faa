"""loss_fused.py: loss.reference_loss's numbers, computed chunk by chunk in place (loss_impl=fused, the
default for real vocabularies; the toy recipes run loss.reference_loss).

The readable math is loss.py; this is the same math arranged for memory and speed. At V = 151,936 one fp32
[N, V] tensor of a 4,096-token step is 2.5 GB and the reference path holds several: here no more than one
chunk of [C, V] rows per quantity exists at a time, the buffers are allocated once per call, and the
student's gradient is computed during the forward, chunk by chunk, so the backward only scales a stored
[N, H] gradient (no projection is redone). Each buffer is named for the reference quantity it holds; where
one is reused, the new name says so. From loss.py it calls pmi_shift_, check_options and (top-k support)
divergence; the rest (the divergences' gradients in closed form, the cosines from three norms) is derived
here.

Proved equal to the reference path (values and gradients, float64 brute force behind both) by these tests
(tests/test_docs.py checks that each exists):
    tests/test_loss.py::test_fused_matches_reference
    tests/test_loss.py::test_token_logprob_is_the_raw_log_softmax_of_the_sampled_token_in_both_paths
    tests/test_loss.py::test_fused_opsd_without_refonly_and_bf16_inputs
    tests/test_loss.py::test_fused_is_stable_where_probabilities_underflow
    tests/test_loss.py::test_the_compiled_chunk_equals_the_eager_chain_and_the_reference
    tests/test_loss.py::test_topk_support_value_and_grad_match_brute_force_in_both_paths
    tests/test_loss.py::test_sampled_token_loss_value_and_grad_match_brute_force_in_both_paths
    tests/test_loss.py::test_fused_bf16_on_cuda_matches_the_fp32_reference_at_qwen3_8b_size (CUDA only)
    tests/test_popsd.py::test_fused_and_reference_losses_give_the_same_update
"""
import math

import torch

from loss import check_options, divergence, pmi_shift_


def _project(out, h, w, temperature):
    """out [C, V] float32 ← (h @ wᵀ) / τ, fp32 accumulation and output whatever the input dtype."""
    if w.dtype == torch.float32:
        torch.mm(h.float(), w.T, out=out)  # [C, V]
    else:  # bf16/fp16 weights: CUDA only (on CPU the caller passes an fp32 copy)
        torch.mm(h.to(w.dtype), w.T, out_dtype=torch.float32, out=out)  # [C, V]
    if temperature != 1.0:
        out.mul_(1.0 / temperature)


def _log_softmax_into(out, logits):
    return torch._log_softmax(logits, -1, False, out=out)  # [C, V], native fused kernel, no allocation


def _row_sum_of_product(a, b, tmp):
    return torch.mul(a, b, out=tmp).sum(-1)  # [C]


def fused_loss(h_student, h_teacher, h_refonly, h_base, head_weight, *, method="purified", kind="jsd",
               jsd_mix=0.5, beta=1.0, pmi_clip=10.0, temperature=1.0, term_clamp=None, chunk_size=None,
               chunk_mb=512, tokens=None, support="full", topk=100, topk_tail=False, compile="auto"):
    """loss.reference_loss's (loss_sum, stats), computed in chunks of tokens.

    h_*: [N, H] hidden states (any float dtype); head_weight: [V, H] frozen head. chunk_size: tokens per
    chunk; None picks it from a memory budget: the chunk's [C, V] float32 buffers fit chunk_mb MiB.
    loss_sum has a gradient to h_student only, computed in the forward (no projection is redone).
    compile: "on" runs each chunk's elementwise chain as one torch.compile'd function (_chunk: a few fused
    kernels instead of ~30 passes over [C, V]; support=full only), "off" the in-place eager chain, "auto" = on
    for CUDA (on CPU the compile time would swamp a short run and the eager chain is as fast).
    """
    check_options(method, kind, support, term_clamp, tokens)
    if method == "purified" and (h_refonly is None or h_base is None):
        raise ValueError("method='purified' needs h_refonly and h_base")
    if support == "topk" and not 1 <= topk <= head_weight.shape[0]:
        raise ValueError(f"topk {topk} must be between 1 and the vocabulary size {head_weight.shape[0]}")
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile {compile!r} is not 'auto', 'on' or 'off'")
    compiled = support == "full" and (compile == "on"
                                      or (compile == "auto" and h_student.device.type == "cuda"))
    opts = dict(compiled=compiled, method=method, kind=kind, b=jsd_mix, beta=beta, pmi_clip=pmi_clip,
                tau=temperature, term_clamp=term_clamp, chunk_size=chunk_size, chunk_mb=chunk_mb,
                tokens=tokens, support=support, k=topk, tail=topk_tail,
                need_grad=torch.is_grad_enabled() and h_student.requires_grad)
    loss_sum, stats = _FusedLoss.apply(h_student, head_weight, h_teacher, h_refonly, h_base, opts)
    names = ["entropy"] + (["cos_total_ref", "cos_total_it", "norm_ratio"] if h_refonly is not None
                           else []) + \
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
def _fused_forward(h_student, weight, h_teacher, h_refonly, h_base, *, method, kind, b, beta, pmi_clip, tau,
                   term_clamp, chunk_size, chunk_mb, tokens, support, k, tail, need_grad, compiled=False):
    n, v = h_student.shape[0], weight.shape[0]
    device = h_student.device
    w = weight.detach()
    if w.dtype != torch.float32 and device.type != "cuda":
        w = w.float()  # [V, H]: CPU has no fp32-output bf16 matmul
    diag = h_refonly is not None
    n_buf = 5 + (1 if term_clamp is not None else 0)
    if compiled:  # its functional chain holds about twice the eager buffers (measured: bench/loss.py on CPU)
        n_buf *= 2
    rows = min(n, chunk_size or max(1, (chunk_mb << 20) // (n_buf * v * 4)))
    # the five [C, V] buffers, named for what the eager chain first keeps in them (_eager_chunk reuses them)
    logp_student, p_student, logits, logp_teacher, logp_refonly = (torch.empty(rows, v, device=device)
                                                                     for _ in range(5))
    clamp_terms = torch.empty(rows, v, device=device) if term_clamp is not None else None  # [C, V]
    grad = torch.zeros(n, h_student.shape[1], device=device) if need_grad else None  # [N, H]
    per_token = torch.empty(n, device=device)  # [N]
    k_lp = 4 if diag else 1  # column of the token log-prob, when tokens are given
    stats = torch.empty(n, k_lp + (tokens is not None), device=device)  # [N, k]
    for i in range(0, n, rows):
        c = min(rows, n - i)
        bufs = [x[:c] for x in (logp_student, p_student, logits, logp_teacher, logp_refonly)]  # [c, V] views
        sl = slice(i, i + c)
        student_logits = bufs[2]
        _project(student_logits, h_student[sl], w, tau)  # the student's logits/τ
        if tokens is not None:  # log π_θ(ŷ_t) at τ = 1 (raw logits): p_student is scratch until it holds π_θ
            raw = torch.mul(student_logits, tau, out=bufs[1]) if tau != 1.0 else student_logits  # [c, V]
            stats[sl, k_lp] = raw.gather(-1,
                                         tokens[sl, None].long().to(device))[:, 0] - torch.logsumexp(raw, -1)
        if compiled:  # the other projections, then the whole elementwise chain in one compiled call
            teacher_logits, refonly_logits, base_logits = bufs[3], bufs[4], bufs[1]
            _project(teacher_logits, h_teacher[sl], w, tau)
            if diag:
                _project(refonly_logits, h_refonly[sl], w, tau)
            if method == "purified":
                _project(base_logits, h_base[sl], w, tau)
            fn = _compiled_chunk(purified=method == "purified", kind=kind, b=b, beta=beta, pmi_clip=pmi_clip,
                                 term_clamp=term_clamp)
            part, grad_logits, stats[sl, :k_lp] = fn(student_logits, teacher_logits,
                                                     refonly_logits if diag else
                                                     None, base_logits if method == "purified" else None)
        else:
            part, grad_logits = _eager_chunk(
                *bufs, clamp_terms[:c] if clamp_terms is not None else None, w, h_teacher[sl],
                h_refonly[sl] if diag else None, h_base[sl] if method == "purified" else None, stats[sl],
                                             kind=kind,
                b=b, beta=beta, pmi_clip=pmi_clip, tau=tau, term_clamp=term_clamp, support=support, k=k,
                                             tail=tail,
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


def _eager_chunk(logp_student, p_student, logits, logp_teacher, logp_refonly, clamp_terms, w, h_teacher,
                 h_refonly, h_base, stats, *, kind, b, beta, pmi_clip, tau, term_clamp, support, k, tail,
                 tokens):
    """One chunk in place on its [c, V] buffers, in reference_loss's order (`logits` holds the student's
    logits/τ on entry, then each projection in turn): the entropy and the cosines into stats [c, ≥1]; returns
    the per-token loss [c] and its logit gradient [c, V]. h_refonly None: no diagnostics; h_base None:
    OPSD."""
    _log_softmax_into(logp_student, logits)  # log π_θ
    torch.exp(logp_student, out=p_student)  # π_θ
    stats[:, 0] = -_row_sum_of_product(p_student, logp_student, logits)  # entropy
    _project(logits, h_teacher, w, tau)
    _log_softmax_into(logp_teacher, logits)  # log π_T
    # Δ_total = log π_T − log π_θ, Δ_ref = log π_ref − log π_θ, Δ_it = log π_T − log π_ref
    if h_refonly is not None:
        _project(logits, h_refonly, w, tau)
        _log_softmax_into(logp_refonly, logits)  # log π_ref
        n_total = torch.sub(logp_teacher, logp_student, out=logits).norm(dim=-1)  # [c] ‖Δ_total‖
        n_ref = torch.sub(logp_refonly, logp_student, out=logits).norm(dim=-1)  # [c] ‖Δ_ref‖
        delta_it = torch.sub(logp_teacher, logp_refonly, out=logits)  # [c, V] Δ_it, kept for the target
        stats[:, 1:4] = _cosines(n_total, n_ref, delta_it.norm(dim=-1))
    if h_base is not None:  # log P = log_softmax(log π_0 + Δ̃/β), as loss.purified_target
        shift = pmi_shift_(delta_it, beta=beta, pmi_clip=pmi_clip)  # [c, V] Δ̃/β, in Δ_it's buffer
        base_logits = logp_refonly  # log π_ref is no longer needed
        _project(base_logits, h_base, w, tau)
        logp_base = logp_teacher  # nor is log π_T
        _log_softmax_into(logp_base, base_logits)  # log π_0
        logp_base.add_(shift)  # log π_0 + Δ̃/β
        target = _log_softmax_into(shift, logp_base)  # [c, V] log P, in the shift's buffer
        scratch, spare = logp_base, base_logits
    else:
        target, scratch, spare = logp_teacher, logits, logp_refonly  # [c, V] log π_T
    if support == "full":
        p_target = torch.exp(target, out=spare)  # [c, V] P
        return _divergence_chunk(logp_student, p_student, target, p_target, scratch, clamp_terms, kind=kind,
                                 b=b, term_clamp=term_clamp)
    return _support_chunk(logp_student, p_student, target, scratch, spare, support=support, k=k, tail=tail,
                          kind=kind, b=b, term_clamp=term_clamp, tokens=tokens)


def _cosines(n_total, n_ref, n_it):
    """[c, 3]: cos(Δ_total, Δ_ref), cos(Δ_total, Δ_it), ‖Δ_ref‖/‖Δ_total‖ from the three norms [c]
    (Δ_total = Δ_ref + Δ_it, so the inner products follow from the norms)."""
    nt2, nr2, ni2 = n_total.square(), n_ref.square(), n_it.square()
    denom = n_total.clamp_min(1e-12)
    return torch.stack([(nt2 + nr2 - ni2) / 2 / (denom * n_ref.clamp_min(1e-12)),
                        (nt2 + ni2 - nr2) / 2 / (denom * n_it.clamp_min(1e-12)), n_ref / denom], -1)


def _chunk(xs, xt, xr, x0, *, purified, kind, b, beta, pmi_clip, term_clamp):
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
        shift = pmi_shift_(t - r, beta=beta, pmi_clip=pmi_clip)  # [c, V] Δ̃/β from Δ_it
        t = torch.log_softmax(torch.log_softmax(x0, -1) + shift, -1)  # [c, V] log P
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
    if term_clamp is not None:
        a = a.masked_fill(terms > term_clamp, 0.0)
        terms = terms.clamp(max=term_clamp)
    return terms.sum(-1), a - q * a.sum(-1, keepdim=True), torch.cat(stats, -1)


_COMPILED = {}


def _compiled_chunk(**opts):
    """_chunk with these options, compiled once per process and option set (dynamic in the chunk's rows)."""
    key = tuple(sorted(opts.items()))
    if key not in _COMPILED:
        def chunk(xs, xt, xr, x0):
            return _chunk(xs, xt, xr, x0, **opts)
        # dynamo keeps compiled graphs, and its limit of 8 recompiles (past it: eager, silently), per code
        # object, which every closure of `chunk` shares: a copy of the code per option set gives each its own
        # cache
        chunk.__code__ = chunk.__code__.replace()
        _COMPILED[key] = torch.compile(chunk, dynamic=True)
    return _COMPILED[key]


def _support_chunk(s, q, t, tmp, out, *, support, k, tail, kind, b, term_clamp, tokens):
    """support = topk | sampled for one chunk: the per-token loss [c] and its gradient w.r.t. the student's
    logits/τ, written into out [c, V]. s = log π_θ, q = π_θ, t = log P: [c, V]; tmp: scratch.
      sampled: ∂/∂x of −A·s(ŷ) = A·(q − onehot(ŷ))
      topk: the divergence on the small [c, k(+1)] tensors with autograd, then back to the vocabulary: an
      entry of the support gets its bucket's gradient g, a tail entry v gets g_tail·q_v/q_tail (g taken after
      the log-softmax, so it sums to zero over the buckets)."""
    if support == "sampled":
        idx = tokens[:, None]  # [c, 1]
        s_y = s.gather(-1, idx)[:, 0]  # [c]
        adv = t.gather(-1, idx)[:, 0] - s_y  # [c] A
        torch.mul(q, adv[:, None], out=out).scatter_add_(-1, idx, -adv[:, None])  # [c, V]
        return -adv * s_y, out
    idx = t.topk(k, dim=-1).indices  # [c, k]
    s_b, t_b = s.gather(-1, idx), t.gather(-1, idx)  # [c, k]
    if tail:  # log of the mass off the support, each side
        def rest(x):  # one shared buffer: x's entries off the support, their log-sum-exp
            return tmp.copy_(x).scatter_(-1, idx, -math.inf).logsumexp(-1, keepdim=True).clamp_min(-1e30)
        s_rest = rest(s)  # [c, 1]
        s_b, t_b = torch.cat([s_b, s_rest], -1), torch.cat([t_b, rest(t)], -1)  # [c, k + 1]
    else:
        t_b = torch.log_softmax(t_b, -1)  # [c, k] P renormalised on the support (divergence renormalises s)
    with torch.enable_grad():
        leaf = s_b.requires_grad_()
        part = divergence(leaf, t_b, kind=kind, jsd_mix=b, term_clamp=term_clamp)  # [c]
        (g,) = torch.autograd.grad(part.sum(), leaf)  # [c, k(+1)]
    if tail:
        torch.sub(s, s_rest, out=out).clamp_(max=0.0).exp_().mul_(g[:, -1:])  # [c, V] g_tail·q_v/q_tail
        out.scatter_(-1, idx, g[:, :-1])
    else:
        out.zero_().scatter_(-1, idx, g)
    return part.detach(), out


def _divergence_chunk(s, q, t, p, tmp, z, *, kind, b, term_clamp):
    """Per-token divergence [c] and its gradient w.r.t. the student's logits/τ [c, V], in closed form.

    s = log π_θ, q = π_θ, t = log P, p = P: [c, V]; tmp (and z with term_clamp): scratch. Inputs are
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
        if term_clamp is None:
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
        if term_clamp is None:
            return _row_sum_of_product(p, t, tmp), q.sub_(p)  # Σ p(t − s); a − q·Σa = q − p
        z = torch.mul(p, t, out=z)  # [c, V] terms
        a = p.neg_()  # [c, V]
    else:  # reverse_kl
        s.sub_(t)  # [c, V] s − t
        if term_clamp is None:
            kl = _row_sum_of_product(q, s, tmp)  # [c]
            return kl, s.sub_(kl.unsqueeze(-1)).mul_(q)  # q(s − t + 1) − q·(KL + 1) = q(s − t − KL)
        z = torch.mul(q, s, out=z)  # [c, V] terms
        a = s.add_(1.0).mul_(q)  # [c, V]
    clamped = z > term_clamp  # [c, V] these terms are constant: no gradient
    a.masked_fill_(clamped, 0.0)
    a.addcmul_(q, a.sum(-1, keepdim=True), value=-1.0)  # [c, V] a − q·Σa
    return z.clamp_(max=term_clamp).sum(-1), a
