"""engines/graph.py (rollout_engine=graph): on a CPU the same loop runs without capture. Against HF generate,
from the same seeds: the same samples and exact per-token log-probs, whether finished rows are kept or
dropped; weights read in place after an optimizer step, recaptured when replaced; the loop's wiring."""
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model

import engines
import engines.graph as G
from plumbing import models
from plumbing.config import make_config
import rollout
from plumbing.data import PopsdError
from engines.hf import generate
from worlds import common, toyworld

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy():
    """The toy base with a random (non-zero) LoRA on every linear layer, and 12 prompts of mixed widths."""
    tok, base = common.load_base(toyworld)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False)).eval()
    qs = common.held_out(toyworld, 12)
    prompts = [rollout.chat_ids(tok, f"Q:{q}", False) for q in qs[:8]] + \
        [rollout.chat_ids(tok, f"Q:{q}", False)[:4] for q in qs[8:]]  # 4-token prompts: wide left padding
    return tok, model, prompts


def both(tok, model, prompts, keep_rows=True, batch_size=8, device="cpu", **kw):
    """(HF generate's (completions, mask, truncated, texts), the graph sampler's and its log-probs, the
    sampler), both from the same seeds."""
    seeds = [engines.request_seed(1, 1, i) for i in range(len(prompts))]
    kw = dict(n=2, max_new_tokens=60, temperature=1.0, top_p=1.0, top_k=0, seeds=seeds) | kw
    want = generate(model, tok, prompts, eos_ids=[tok.eos_token_id], batch_size=batch_size,
                    device=torch.device(device), **kw)
    sampler = G.GraphSampler(model, tok, batch_size=batch_size, device=device, eos_ids=[tok.eos_token_id],
                             keep_rows=keep_rows)
    got = sampler.generate(prompts, **kw)
    return (want.completions, want.mask, want.truncated, want.texts), \
        (got.completions, got.mask, got.truncated, got.texts, got.logprobs), sampler


def teacher_forced_logprobs(model, prompts, n, completions, mask, pad):
    """log π(ŷ_t) of each completion token by one full forward of prompt + completion (float32, τ = 1)."""
    rows = [p for p in prompts for _ in range(n)]
    out = torch.zeros(completions.shape)
    for i, (p, c, m) in enumerate(zip(rows, completions, mask)):
        ids = torch.tensor([p + c[m].tolist()])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
        out[i, :int(m.sum())] = torch.log_softmax(logits, -1).gather(-1, c[m][:, None])[:, 0]
    return out


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0),
                                dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_keeping_every_row_gives_the_very_same_samples_as_rollout_generate(toy, kw):
    tok, model, prompts = toy
    (c, m, tr, texts), (c2, m2, tr2, texts2, lp), _ = both(tok, model, prompts, **kw)
    assert torch.equal(c, c2) and torch.equal(m, m2) and torch.equal(tr, tr2) and texts == texts2
    assert len(set(texts)) > 4  # not one degenerate completion
    want = teacher_forced_logprobs(model, prompts, 2, c2, m2, tok.pad_token_id)
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=0)  # the raw log-prob of each sampled token


def test_a_plain_model_without_adapters_samples_as_rollout_generate(toy):
    tok, _, prompts = toy  # transformers' active_adapters is a method there, not peft's list
    (c, _, _, texts), (c2, _, _, texts2, _), _ = both(tok, common.load_base(toyworld)[1].eval(), prompts)
    assert torch.equal(c, c2) and texts == texts2


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0),
                                dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_dropping_finished_rows_samples_what_rollout_generate_samples(toy, monkeypatch, kw):
    tok, model, prompts = toy
    monkeypatch.setattr(G, "ROUND", 8)  # toy completions fit one 64-slot cache: 8 makes it grow several times
    (c, m, _, texts), (c2, m2, _, texts2, lp), sampler = both(tok, model, prompts, keep_rows=False,
                                                              batch_size=24, **kw)
    rows, lengths = zip(*sampler.trail)
    assert torch.equal(c, c2) and torch.equal(m, m2) and texts == texts2  # seeded: each row its own draws
    assert min(rows) < max(rows) and min(lengths) < max(lengths)  # the batch was halved and its cache grew
    assert len(sampler.steps) == 1  # eager: each cache left behind was freed at once
    want = teacher_forced_logprobs(model, prompts, 2, c2, m2, tok.pad_token_id)
    # each row continued its own cache after the moves
    torch.testing.assert_close(lp, want, atol=1e-4, rtol=0)


def test_weights_are_read_in_place_and_a_replaced_one_is_recaptured(toy):
    tok, model, prompts = toy
    sampler = G.GraphSampler(model, tok, batch_size=8, device="cpu", eos_ids=[tok.eos_token_id])
    kw = dict(n=1, max_new_tokens=30, temperature=0, top_p=1.0, top_k=0)
    sampler.generate(prompts, **kw)
    shapes = dict(sampler.steps)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora]
    for p in lora:
        p.requires_grad_(True)
    opt = torch.optim.SGD(lora, lr=5.0)  # a step large enough to change greedy completions
    model.train()
    loss = model(input_ids=torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    after = generate(model, tok, prompts, eos_ids=[tok.eos_token_id], batch_size=8, device=CPU, **kw)
    got = sampler.generate(prompts, **kw)
    assert sampler.steps == shapes  # updated in place: the same caches (and, on CUDA, the same graphs)
    assert torch.equal(got.completions, after.completions) and got.texts == after.texts  # the new weights
    lora[0].data = lora[0].data.clone()  # a replaced tensor (a new address): what a graph could not see
    sampler.generate(prompts, **kw)
    assert all(sampler.steps[k] is not shapes[k] for k in sampler.steps)  # dropped and rebuilt
    sampler.generate(prompts[:3], **kw)  # another shape: the previous call's caches are freed
    assert list(sampler.steps) == [(3, 64)]
    kept = sampler.steps[(3, 64)]
    with model.disable_adapter():  # peft picks adapters in Python: a graph would replay the old choice
        sampler.generate(prompts[:3], **kw)
    assert sampler.steps[(3, 64)] is not kept
    with torch.no_grad():
        for p, s in zip(lora, saved):
            p.copy_(s)
    model.eval()


def test_capture_is_refused_where_a_graph_cannot_hold_the_step(toy):
    tok, model, _ = toy
    attn = model.config._attn_implementation
    try:
        # its mask checks attention_mask.all(): a host sync
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(PopsdError, match="needs sdpa or eager attention"):
            G.GraphSampler(model, tok, batch_size=4, device="cpu", eos_ids=[tok.eos_token_id], capture=True)
    finally:
        model.config._attn_implementation = attn
    # sdpa: fine
    G.GraphSampler(model, tok, batch_size=4, device="cpu", eos_ids=[tok.eos_token_id], capture=True)


def test_plan_fits_the_budget_and_counts_the_halves():
    tok, model = common.load_base(toyworld)
    rows, line = G.plan(model, 400, 300, 2 ** 30, keep_rows=True)
    # 300 → 320 (ROUND 64)
    per_row = 2 * 4 * model.config.num_key_value_heads * model.config.head_dim * 4 * 320
    assert rows == 400 and "320 tokens" in line
    few, _ = G.plan(model, 400, 300, 10 * per_row, keep_rows=True)
    halves, line = G.plan(model, 400, 300, 10 * per_row, keep_rows=False)
    assert few < 10 and halves <= few // 2 + 1 and "halves" in line
    rows, line = G.plan(model, 10 ** 6, 300, 2 ** 30, keep_rows=False)  # the budget binds: 2 × rows caches
    held, _ = (float(x) for x in re.findall(r"([0-9.]+) GiB", line))
    assert 2 * rows * per_row <= 2 ** 30 < 2 * (rows + 1) * per_row and held == round(
        2 * rows * per_row / 2 ** 30, 2)


def test_the_loop_takes_the_graph_engine_and_refuses_it_where_it_cannot_work(tmp_path, tiny_dir):
    cfg = make_config("tiny", ["rollout_engine=graph", f"out_dir={tmp_path}"])
    tok, model = models.load_model(cfg, CPU, str(tiny_dir))
    sampler = engines.make_sampler(cfg, model, tok, str(tiny_dir), [tok.eos_token_id], CPU, tmp_path, 0, 1)
    assert isinstance(sampler, G.GraphSampler) and sampler.reports_logprobs
    with pytest.raises(PopsdError, match="rollout_engine=graph samples in one process"):
        engines.make_sampler(cfg, model, tok, str(tiny_dir), [tok.eos_token_id], CPU, tmp_path, 0, 2)
    with pytest.raises(PopsdError, match="rollout_engine=graph both name the sampler"):
        make_config("tiny", ["rollout_engine=graph", "rollout_server=http://127.0.0.1:1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_check.sh runs it)")
def test_cuda_graph_replay_equals_eager_before_and_after_an_update(toy):
    """On CUDA each step is a captured graph: its samples equal HF generate's, and still do after an
    in-place update of the weights (the graph reads them by address)."""
    tok, model, prompts = toy
    model.cuda()
    try:
        (c, _, _, _), (c2, _, _, _, _), sampler = both(tok, model, prompts, device="cuda", temperature=0)
        assert sampler.captures > 0 and torch.equal(c, c2)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        kw = dict(n=2, max_new_tokens=60, temperature=0, top_p=1.0, top_k=0)
        want = generate(model, tok, prompts, eos_ids=[tok.eos_token_id], batch_size=8,
                        device=torch.device("cuda"), **kw).completions
        assert torch.equal(sampler.generate(prompts, **kw).completions, want) and not torch.equal(want, c)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.div_(3.0)
        model.cpu()


def test_a_model_folders_generation_config_changes_no_engines_samples(toy, tmp_path):
    """HF generate fills every sampling setting a call leaves unset from the model folder's
    generation_config.json (repetition penalty, n-gram bans, min-p, bad words...), which the graph engine and
    vLLM (generation_config= "vllm") never read: popsd's HF path must sample from exactly the distribution its
    config describes."""
    tok, model, prompts = toy
    base = model.get_base_model()
    shipped = base.generation_config
    try:
        # as a folder's json would set them
        base.generation_config = shipped.from_dict(shipped.to_dict() | dict(
            repetition_penalty=1.3, min_p=0.2, no_repeat_ngram_size=2, bad_words_ids=[
                [tok.convert_tokens_to_ids("7")]]))
        for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)):
            (c, m, _, texts), (c2, m2, _, texts2, _), _ = both(tok, model, prompts, **kw)
            assert torch.equal(c, c2) and texts == texts2
        assert any("7" in t for t in texts)  # the banned token is sampled: the folder's ban did not apply
    finally:
        base.generation_config = shipped


@pytest.fixture(scope="module")
def sliding():
    """A random Qwen3 whose first and last layers attend within a window of 8 (as Olmo-3's sliding layers do),
    so every toy completion outgrows the window; toy tokenizer and prompts."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    tok = common.build_tokenizer()
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, use_sliding_window=True, sliding_window=8,
                         initializer_range=0.4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts = [rollout.chat_ids(tok, f"Q:{q}", False) for q in common.held_out(toyworld, 6)]
    return tok, model, prompts


def test_sliding_window_layers_sample_exactly_in_both_modes_and_capture_is_refused(sliding, monkeypatch):
    tok, model, prompts = sliding
    (c, m, _, texts), (c2, m2, _, texts2, lp), _ = both(tok, model, prompts, max_new_tokens=40)
    assert torch.equal(c, c2) and texts == texts2 and m.sum(1).max() > 8  # beyond the window
    torch.testing.assert_close(lp, teacher_forced_logprobs(model, prompts, 2, c2, m2, tok.pad_token_id),
                               atol=1e-4, rtol=0)
    monkeypatch.setattr(G, "ROUND", 8)  # the cache grows (and the window layers roll) several times
    (c, *_), (c2, *_), sampler = both(tok, model, prompts, keep_rows=False, temperature=0, max_new_tokens=40)
    assert torch.equal(c, c2) and len({length for _, length in sampler.trail}) > 2
    _, (c3, m3, _, _, lp), _ = both(tok, model, prompts, keep_rows=False, max_new_tokens=40)
    torch.testing.assert_close(lp, teacher_forced_logprobs(model, prompts, 2, c3, m3, tok.pad_token_id),
                               atol=1e-4, rtol=0)
    with pytest.raises(PopsdError, match="sliding-window layers branch in Python"):
        G.GraphSampler(model, tok, batch_size=4, device="cpu", eos_ids=[tok.eos_token_id], capture=True)
