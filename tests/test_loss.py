"""loss.py against float64 brute force on random inputs: values, gradients, limits, normalisation."""
import math

import pytest
import torch

import loss as L
from plumbing import loss_fused

N, V, H = 7, 50, 16


def logits(seed, scale=3.0, n=N, v=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


# ---- brute force: float64, one token at a time, written from the equations

def bf_logp(row, tau=1.0):
    x = row.double() / tau
    e = torch.exp(x - x.max())
    return torch.log(e / e.sum())


def bf_purified(t, r, b, beta, clip, tau):
    out = []
    for i in range(t.shape[0]):
        d = bf_logp(t[i], tau) - bf_logp(r[i], tau)
        d = d - d.sum() / d.numel()
        if clip is not None:
            d = clip * torch.tanh(d / clip)
        out.append(bf_logp(bf_logp(b[i], tau) + d / beta))
    return torch.stack(out)


def bf_divergence(s, target_logp, kind, jsd_mix, tau, term_clamp=None):
    out = []
    for i in range(s.shape[0]):
        q = bf_logp(s[i], tau).exp()
        p = target_logp[i].double().exp()
        if kind == "forward_kl":
            terms = p * torch.log(p / q)
        elif kind == "reverse_kl":
            terms = q * torch.log(q / p)
        else:
            m = jsd_mix * p + (1 - jsd_mix) * q
            terms = jsd_mix * p * torch.log(p / m) + (1 - jsd_mix) * q * torch.log(q / m)
        if term_clamp is not None:
            terms = torch.clamp(terms, max=term_clamp)
        out.append(terms.sum())
    return torch.stack(out)


def bf_cos(a, b):
    return (a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum())


# ---- targets

@pytest.mark.parametrize("beta,clip,tau",
                         [(1.0, 10.0, 1.0), (0.5, 5.0, 1.1), (2.0, None, 0.7), (1.0, 0.5, 1.0)])
def test_purified_target_matches_brute_force(beta, clip, tau):
    t, r, b = logits(1, 6.0), logits(2, 6.0), logits(3)
    got = L.purified_target(t, r, b, beta=beta, pmi_clip=clip, temperature=tau)
    assert got.dtype == torch.float32 and got.shape == (N, V)
    torch.testing.assert_close(got.double(), bf_purified(t, r, b, beta, clip, tau), atol=2e-5, rtol=1e-5)


def test_purified_limit_is_base_times_teacher_over_refonly():
    # c → ∞, β = 1: P ∝ π_0 · π_T / π_ref (centring only shifts by a constant per token)
    t, r, b = logits(4), logits(5), logits(6)
    got = L.purified_target(t, r, b, beta=1.0, pmi_clip=1e6)
    want = bf_logp_rows(b) + bf_logp_rows(t) - bf_logp_rows(r)
    want = want - torch.logsumexp(want, dim=-1, keepdim=True)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def bf_logp_rows(x):
    return torch.stack([bf_logp(row) for row in x])


def test_purified_clip_bounds_the_shift_from_base():
    # with clip c the log-ratio to the base is within 2c of a constant per token
    t, r, b = logits(7, 40.0), logits(8, 40.0), logits(9)
    diff = L.purified_target(t, r, b, pmi_clip=1.0) - L._logp(b, 1.0)
    assert ((diff.max(-1).values - diff.min(-1).values) <= 2.0 + 1e-4).all()


def test_opsd_target_and_dtype():
    t = logits(10).to(torch.bfloat16)
    got = L.opsd_target(t, temperature=1.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.stack([bf_logp(row, 1.1) for row in t]), atol=1e-5,
                               rtol=1e-5)


# ---- divergences: values and gradients

@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("jsd_mix,tau,term_clamp", [(0.5, 1.0, None), (0.2, 1.1, None), (0.9, 0.8, 0.02)])
def test_divergence_value_and_grad_match_brute_force(kind, jsd_mix, tau, term_clamp):
    s = logits(11).requires_grad_()
    target = L.opsd_target(logits(12), temperature=tau)
    got = L.divergence(s, target, kind=kind, jsd_mix=jsd_mix, temperature=tau, term_clamp=term_clamp)
    assert got.shape == (N,) and got.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    want = bf_divergence(s64, target, kind, jsd_mix, tau, term_clamp)
    torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
    weights = torch.linspace(0.5, 2.0, N)
    (g,) = torch.autograd.grad((got * weights).sum(), s)
    (g64,) = torch.autograd.grad((want * weights.double()).sum(), s64)
    torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", L.KINDS)
def test_identical_inputs_give_zero(kind):
    s = logits(13).requires_grad_()
    d = L.divergence(s, L.opsd_target(s.detach()), kind=kind)
    torch.testing.assert_close(d, torch.zeros(N), atol=1e-6, rtol=0)
    (g,) = torch.autograd.grad(d.sum(), s)
    torch.testing.assert_close(g, torch.zeros_like(g), atol=1e-6, rtol=0)


def test_divergences_are_nonnegative_and_bf16_safe():
    s, t = logits(14, 8.0).to(torch.bfloat16), L.opsd_target(logits(15, 8.0))
    for kind in L.KINDS:
        assert (L.divergence(s, t, kind=kind) >= -1e-6).all()


def test_jsd_endpoints_are_zero_and_no_grad_flows_to_target():
    s, t = logits(16).requires_grad_(), L.opsd_target(logits(17)).requires_grad_()
    for b in (0.0, 1.0):
        assert L.divergence(s, t, jsd_mix=b).abs().max() == 0
    L.divergence(s, t).sum().backward()
    assert t.grad is None and s.grad is not None


# ---- diagnostics

def test_signal_diagnostics_match_brute_force():
    s, t, r = logits(18), logits(19), logits(20)
    got = L.signal_diagnostics(s, t, r, temperature=1.1)
    for i in range(N):
        ls, lt, lr_ = bf_logp(s[i], 1.1), bf_logp(t[i], 1.1), bf_logp(r[i], 1.1)
        total, ref, it = lt - ls, lr_ - ls, lt - lr_
        assert got["cos_total_ref"][i].item() == pytest.approx(bf_cos(total, ref).item(), abs=1e-5)
        assert got["cos_total_it"][i].item() == pytest.approx(bf_cos(total, it).item(), abs=1e-5)
        assert got["norm_ratio"][i].item() == pytest.approx((ref.norm() / total.norm()).item(), rel=1e-5)


def test_entropy_matches_brute_force():
    x = logits(21)
    want = [-(bf_logp(row).exp() * bf_logp(row)).sum().item() for row in x]
    torch.testing.assert_close(L.entropy(x).double(), torch.tensor(want, dtype=torch.float64), atol=1e-5,
                               rtol=1e-5)


# ---- reference_loss: hidden states → loss, and its normalisation

def hidden(seed, n=N, h=H):
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["purified", "opsd"])
def test_reference_loss_equals_composed_functions(method):
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    hs, ht, hr, hb = (hidden(i) for i in range(4))
    loss_sum, stats = L.reference_loss(hs, ht, hr, hb, w, method=method, temperature=1.1)
    target = (L.purified_target(ht @ w.T, hr @ w.T, hb @ w.T, temperature=1.1) if method == "purified"
              else L.opsd_target(ht @ w.T, temperature=1.1))
    want = bf_divergence((hs @ w.T).double(), target, "jsd", 0.5, 1.1).sum()
    assert loss_sum.item() == pytest.approx(want.item(), rel=1e-5)
    assert set(stats) == {"entropy", "cos_total_ref", "cos_total_it", "norm_ratio"}
    assert all(v.shape == (N,) for v in stats.values())


def test_normalised_loss_is_independent_of_micro_batching():
    # sum over micro-batches of loss_sum / N_total equals the full batch loss_sum / N_total, gradients too
    n = 12
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(0))
    hs, ht, hr, hb = (hidden(i, n) for i in range(4))
    full = hs.clone().requires_grad_()
    (L.reference_loss(full, ht, hr, hb, w)[0] / n).backward()
    for micro in (1, 5, 12):
        parts = hs.clone().requires_grad_()
        total = 0.0
        for i in range(0, n, micro):
            part_loss = L.reference_loss(parts[i:i + micro], ht[i:i + micro], hr[i:i + micro],
                                         hb[i:i + micro], w)[0]
            (part_loss / n).backward()
            total += part_loss.item() / n
        assert total == pytest.approx((L.reference_loss(hs, ht, hr, hb, w)[0] / n).item(), rel=1e-5)
        torch.testing.assert_close(parts.grad, full.grad, atol=1e-7, rtol=1e-5)


# ---- fused_loss: the chunked path equals the reference path

def fused_inputs(n, seed=0, dtype=torch.float32, v=V, h=H):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(v, h, generator=g) / h ** 0.5 * 4).to(dtype)  # peaked distributions
    hs = [torch.randn(n, h, generator=g).to(dtype) for _ in range(4)]
    return w, hs


@pytest.mark.parametrize("method", ["purified", "opsd"])
@pytest.mark.parametrize("kind", L.KINDS)
@pytest.mark.parametrize("n,chunk_size,term_clamp",
                         [(13, 5, None), (1, None, None), (16, 16, 0.01), (9, 4, 0.05)])
def test_fused_matches_reference(method, kind, n, chunk_size, term_clamp):
    w, (hs, ht, hr, hb) = fused_inputs(n)
    kw = dict(method=method, kind=kind, jsd_mix=0.3, beta=0.7, pmi_clip=2.0, temperature=1.1,
              term_clamp=term_clamp)
    ref_h, fused_h = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    ref_loss, ref_stats = L.reference_loss(ref_h, ht, hr, hb, w, **kw)
    loss, stats = loss_fused.fused_loss(fused_h, ht, hr, hb, w, chunk_size=chunk_size, **kw)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    (ref_loss * 0.7).backward()
    (loss * 0.7).backward()
    torch.testing.assert_close(fused_h.grad, ref_h.grad, atol=1e-5 * ref_h.grad.abs().max().item(), rtol=1e-4)
    assert stats.keys() == ref_stats.keys()
    for k in stats:
        torch.testing.assert_close(stats[k], ref_stats[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,tau,chunk_size",
                         [("purified", 1.1, 4), ("opsd", 1.0, None), ("opsd", 0.7, 3)])
def test_token_logprob_is_the_raw_log_softmax_of_the_sampled_token_in_both_paths(method, tau, chunk_size):
    """stats["logprob"]: log π_θ(ŷ_t) at τ = 1 whatever the loss temperature (what a sampler reports), float64
    brute force; the loss and its gradient do not change when tokens are given."""
    w, (hs, ht, hr, hb) = fused_inputs(10)
    tokens = torch.randint(0, w.shape[0], (10,), generator=torch.Generator().manual_seed(3))
    want = torch.stack([bf_logp(row)[t] for row, t in zip(hs.double() @ w.double().T, tokens)])
    kw = dict(method=method, temperature=tau)
    for fn, extra in ((L.reference_loss, {}), (loss_fused.fused_loss, {"chunk_size": chunk_size})):
        h = hs.clone().requires_grad_()
        loss, stats = fn(h, ht, hr, hb, w, tokens=tokens, **kw, **extra)
        torch.testing.assert_close(stats["logprob"].double(), want, atol=1e-5, rtol=1e-5)
        plain, plain_stats = fn(hs.clone(), ht, hr, hb, w, **kw, **extra)
        assert loss.item() == plain.item() and set(stats) == set(plain_stats) | {"logprob"}
        torch.testing.assert_close(stats["entropy"], plain_stats["entropy"], atol=0, rtol=0)


def test_fused_opsd_without_refonly_and_bf16_inputs():
    w, (hs, ht, _, _) = fused_inputs(11, dtype=torch.bfloat16)
    ref_h, fused_h = hs.clone().requires_grad_(), hs.clone().requires_grad_()
    ref_loss, _ = L.reference_loss(ref_h, ht, None, None, w, method="opsd")
    loss, stats = loss_fused.fused_loss(fused_h, ht, None, None, w, method="opsd", chunk_size=4)
    assert set(stats) == {"entropy"}
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_loss.backward()
    loss.backward()
    assert fused_h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused_h.grad.float(), ref_h.grad.float(), atol=1e-3, rtol=1e-2)


def test_fused_is_stable_where_probabilities_underflow():
    # log-probs far below −103 underflow exp() in float32; the JSD mixture must stay finite
    w, (hs, ht, hr, hb) = fused_inputs(6, v=V)
    w = w * 60
    h = hs.clone().requires_grad_()
    loss, _ = loss_fused.fused_loss(h, ht, hr, hb, w, chunk_size=4)
    ref, _ = L.reference_loss(hs, ht, hr, hb, w)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_fused_chunk_size_from_memory_budget():
    w, (hs, ht, hr, hb) = fused_inputs(40)
    full, _ = loss_fused.fused_loss(hs, ht, hr, hb, w, chunk_size=40)
    tiny_budget, _ = loss_fused.fused_loss(hs, ht, hr, hb, w, chunk_mb=0)  # one token per chunk
    assert tiny_budget.item() == pytest.approx(full.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs h_refonly and h_base"):
        loss_fused.fused_loss(hs, ht, None, None, w)


@pytest.mark.parametrize("method,kind,term_clamp,clip,diag", [
    ("purified", "jsd", None, 10.0, True), ("purified", "forward_kl", 0.05, None, True),
    ("opsd", "reverse_kl", None, 10.0, True), ("opsd", "jsd", 0.02, 10.0, False)])
def test_the_compiled_chunk_equals_the_eager_chain_and_the_reference(method, kind, term_clamp, clip, diag):
    """compile='on' (torch.compile of _chunk, which also runs on CPU) against the eager in-place chain:
    values, gradients and stats within 1e-5 relative in fp32; both against the readable reference path; a
    ragged last chunk (13 rows in chunks of 5) exercises the dynamic shape; the sampled token's log-prob stays
    eager."""
    w, (hs, ht, hr, hb) = fused_inputs(13)
    hr = hr if diag else None
    tokens = torch.randint(0, w.shape[0], (13,), generator=torch.Generator().manual_seed(1))
    kw = dict(method=method, kind=kind, jsd_mix=0.3, beta=0.7, pmi_clip=clip, temperature=1.1,
              term_clamp=term_clamp, tokens=tokens)
    got = {}
    for mode in ("off", "on"):
        h = hs.clone().requires_grad_()
        loss, stats = loss_fused.fused_loss(h, ht, hr, hb, w, chunk_size=5, compile=mode, **kw)
        loss.backward()
        got[mode] = loss, h.grad, stats
    (eager, g_eager, s_eager), (comp, g_comp, s_comp) = got["off"], got["on"]
    assert comp.item() == pytest.approx(eager.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_comp, g_eager, atol=1e-5 * g_eager.abs().max().item(), rtol=1e-5)
    assert s_comp.keys() == s_eager.keys()
    for k in s_eager:
        torch.testing.assert_close(s_comp[k], s_eager[k], atol=1e-5, rtol=1e-5)
    ref, _ = L.reference_loss(hs, ht, hr, hb, w, **kw)
    assert comp.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_compile_auto_is_eager_on_cpu_and_other_supports_stay_eager(monkeypatch):
    w, (hs, ht, hr, hb) = fused_inputs(6)
    monkeypatch.setattr(loss_fused, "_compiled_chunk", lambda **kw: pytest.fail("compiled on CPU under auto"))
    loss_fused.fused_loss(hs, ht, hr, hb, w, compile="auto")
    # topk/sampled: the eager chain
    loss_fused.fused_loss(hs, ht, hr, hb, w, compile="on", support="topk", topk=4)
    with pytest.raises(ValueError, match="compile 'yes'"):
        loss_fused.fused_loss(hs, ht, hr, hb, w, compile="yes")


def test_every_option_set_keeps_its_own_compiled_chunk_past_dynamos_recompile_limit(monkeypatch):
    """dynamo keeps 8 graphs per code object and then runs eager without a word: twelve option sets in one
    process (a sweep, a test session) must each stay compiled. Traced with the eager backend (no kernels to
    build)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="eager", **kw))
    monkeypatch.setattr(loss_fused, "_COMPILED", {})
    x = [torch.randn(3, 11) for _ in range(4)]
    sets = [dict(purified=p, kind=k, b=0.5, beta=1.0, pmi_clip=c, term_clamp=t) for p in (True, False)
            for k in L.KINDS
            for c, t in ((10.0, None), (None, 0.05))]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # past the limit: an error, not eager
        for opts in sets:
            got = loss_fused._compiled_chunk(**opts)(*x)
            want = loss_fused._chunk(*x, **opts)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
    assert len(loss_fused._COMPILED) == len(sets) == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_check.sh runs it)")
@pytest.mark.parametrize("method", ["purified", "opsd"])
def test_fused_bf16_on_cuda_matches_the_fp32_reference_at_qwen3_8b_size(method):
    """The CUDA path (bf16 weights and hidden states, torch.mm with fp32 output) against the fp32 reference on
    the same bf16 values, at Qwen3-8B's V = 151,936 and H = 4096: value and gradient."""
    w, hs = fused_inputs(256, v=151936, h=4096, dtype=torch.bfloat16)
    w, hs = w.cuda(), [h.cuda() for h in hs]
    kw = dict(method=method, kind="jsd", pmi_clip=10.0, temperature=1.1)
    ref_h = hs[0].float().clone().requires_grad_()
    ref_loss, _ = L.reference_loss(ref_h, *(h.float() for h in hs[1:]), w.float(), **kw)
    ref_loss.backward()
    for mode in ("auto", "off"):  # auto: the compiled chunk on CUDA
        fused_h = hs[0].clone().requires_grad_()
        loss, _ = loss_fused.fused_loss(fused_h, *hs[1:], w, compile=mode, **kw)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3), mode
        loss.backward()
        assert fused_h.grad.dtype == torch.bfloat16
        torch.testing.assert_close(fused_h.grad.float(), ref_h.grad,
                                   atol=2e-2 * ref_h.grad.abs().max().item(),
                                   rtol=2e-2)


# ---- supports: top-k (renormalised or with a tail bucket) and the sampled token, float64 brute force

def bf_topk(s_logits, target_logp, k, tail, kind, jsd_mix, tau, term_clamp=None):
    """One token at a time: the target's k most likely entries, both sides renormalised on them (or the rest
    of each side's mass as one more entry), then the divergence written out."""
    out = []
    for i in range(s_logits.shape[0]):
        q, p = bf_logp(s_logits[i], tau).exp(), target_logp[i].double().exp()
        top = sorted(range(p.numel()), key=lambda v: -p[v].item())[:k]
        rest = [v for v in range(p.numel()) if v not in top]
        qs, ps = q[top], p[top]
        if tail:
            qs, ps = torch.cat([qs, q[rest].sum()[None]]), torch.cat([ps, p[rest].sum()[None]])
        else:
            qs, ps = qs / qs.sum(), ps / ps.sum()
        if kind == "forward_kl":
            terms = ps * torch.log(ps / qs)
        elif kind == "reverse_kl":
            terms = qs * torch.log(qs / ps)
        else:
            m = jsd_mix * ps + (1 - jsd_mix) * qs
            terms = jsd_mix * ps * torch.log(ps / m) + (1 - jsd_mix) * qs * torch.log(qs / m)
        if term_clamp is not None:
            terms = torch.clamp(terms, max=term_clamp)
        out.append(terms.sum())
    return torch.stack(out)


def bf_sampled(s_logits, target_logp, tokens, tau):
    out = []
    for i, y in enumerate(tokens.tolist()):
        log_q = bf_logp(s_logits[i], tau)[y]
        out.append(-(target_logp[i, y].double() - log_q).detach() * log_q)
    return torch.stack(out)


@pytest.mark.parametrize("method", ["purified", "opsd"])
@pytest.mark.parametrize("kind,tail,k,term_clamp", [("jsd", False, 5, None), ("jsd", True, 5, None),
                                                    ("forward_kl", True, 1, None),
                                                    ("reverse_kl", False, 16, None),
                                                    ("forward_kl", False, V, None), ("jsd", True, 8, 0.01),
                                                    ("reverse_kl", True, 3, None)])
def test_topk_support_value_and_grad_match_brute_force_in_both_paths(method, kind, tail, k, term_clamp):
    n, tau = 9, 1.1
    w, (hs, ht, hr, hb) = fused_inputs(n, seed=5)
    kw = dict(method=method, kind=kind, jsd_mix=0.3, beta=0.7, pmi_clip=2.0, temperature=tau,
              term_clamp=term_clamp, support="topk", topk=k, topk_tail=tail)
    target = (L.purified_target(ht @ w.T, hr @ w.T, hb @ w.T, beta=0.7, pmi_clip=2.0, temperature=tau)
              if method == "purified" else L.opsd_target(ht @ w.T, temperature=tau))  # the support: its top-k
    h64 = hs.double().requires_grad_()
    want = bf_topk(h64 @ w.double().T, target, k, tail, kind, 0.3, tau, term_clamp)
    (g64,) = torch.autograd.grad((want * torch.linspace(0.5, 2.0, n).double()).sum(), h64)
    for fn, extra in ((L.reference_loss, {}), (loss_fused.fused_loss, {"chunk_size": 4}),
                      (loss_fused.fused_loss, {})):
        h = hs.clone().requires_grad_()
        per, _ = fn(h, ht, hr, hb, w, **kw, **extra)
        assert per.item() == pytest.approx(want.sum().item(), rel=1e-5, abs=1e-6), fn.__name__
        h2 = hs.clone().requires_grad_()
        total = sum(fn(h2[i:i + 1], ht[i:i + 1], hr[i:i + 1], hb[i:i + 1], w, **kw, **extra)[0] * wt
                    # per-token weights: each token's gradient
                    for i, wt in enumerate(torch.linspace(0.5, 2.0, n)))
        total.backward()
        torch.testing.assert_close(h2.grad.double(), g64, atol=1e-5 * g64.abs().max().item(), rtol=1e-4)


def test_topk_over_the_whole_vocabulary_is_the_full_divergence_and_k_is_checked():
    w, (hs, ht, hr, hb) = fused_inputs(6, seed=6)
    full = L.reference_loss(hs, ht, hr, hb, w)[0]
    for tail in (False, True):
        for fn in (L.reference_loss, loss_fused.fused_loss):
            assert fn(hs, ht, hr, hb, w, support="topk", topk=V, topk_tail=tail)[0].item() == pytest.approx(
                full.item(), rel=1e-5)
    for fn in (L.reference_loss, loss_fused.fused_loss):
        with pytest.raises(ValueError, match="topk 51 must be between 1 and the vocabulary size 50"):
            fn(hs, ht, hr, hb, w, support="topk", topk=V + 1)


@pytest.mark.parametrize("method,tau,chunk_size",
                         [("purified", 1.1, 4), ("opsd", 1.0, None), ("opsd", 0.7, 3)])
def test_sampled_token_loss_value_and_grad_match_brute_force_in_both_paths(method, tau, chunk_size):
    n = 10
    w, (hs, ht, hr, hb) = fused_inputs(n, seed=7)
    tokens = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(8))
    target = (L.purified_target(ht @ w.T, hr @ w.T, hb @ w.T, temperature=tau) if method == "purified"
              else L.opsd_target(ht @ w.T, temperature=tau))
    h64 = hs.double().requires_grad_()
    want = bf_sampled(h64 @ w.double().T, target, tokens, tau)
    (g64,) = torch.autograd.grad(want.sum(), h64)
    assert (want < 0).any() and (want > 0).any()  # a loss, not a divergence: either sign
    kw = dict(method=method, kind="reverse_kl", temperature=tau, support="sampled", tokens=tokens)
    for fn, extra in ((L.reference_loss, {}), (loss_fused.fused_loss, {"chunk_size": chunk_size})):
        h = hs.clone().requires_grad_()
        loss, stats = fn(h, ht, hr, hb, w, **kw, **extra)
        assert loss.item() == pytest.approx(want.sum().item(), rel=1e-5, abs=1e-6)
        loss.backward()
        torch.testing.assert_close(h.grad.double(), g64, atol=1e-5 * g64.abs().max().item(), rtol=1e-4)
    # its expectation over ŷ ~ π_θ is reverse KL's gradient (float64, the full sum over the vocabulary)
    s = (hs.double() @ w.double().T / tau).requires_grad_()
    q = torch.softmax(s, -1).detach()
    est = sum(q[:, y] * bf_sampled(s * tau, target, torch.full((n,), y), tau) for y in range(V))
    (g_est,) = torch.autograd.grad(est.sum(), s)
    (g_kl,) = torch.autograd.grad(bf_divergence(s * tau, target, "reverse_kl", 0.5, tau).sum(), s)
    torch.testing.assert_close(g_est, g_kl, atol=1e-8, rtol=1e-6)


def test_the_sampled_support_needs_reverse_kl_no_term_clamp_and_the_tokens():
    w, (hs, ht, hr, hb) = fused_inputs(4)
    tokens = torch.zeros(4, dtype=torch.long)
    for fn in (L.reference_loss, loss_fused.fused_loss):
        for bad in (dict(kind="jsd", tokens=tokens), dict(kind="reverse_kl", term_clamp=0.05, tokens=tokens),
                    dict(kind="reverse_kl")):
            with pytest.raises(ValueError, match="support='sampled' is the sampled-token estimator"):
                fn(hs, ht, hr, hb, w, support="sampled", **bad)
        with pytest.raises(ValueError, match="support 'nope'"):
            fn(hs, ht, hr, hb, w, support="nope")
