"""rollout.py: the four contexts line up on ŷ, padding changes nothing, EOS masks; the loop's sampling
(popsd.sample through the HF engine): KV-cached, each row with its contexts."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from plumbing import models
import popsd
from plumbing.config import make_config
import rollout
from engines.hf import HFSampler, generate
from rollout import (STUDENT_TEMPLATE, Contexts, Rollout, build_contexts, check_templates, completion_hidden,
                     completion_mask, fill, marker_counts)


def successor_model(vocab=64):
    """A real Qwen3 whose logits at position i put all mass on (token_i + 1) mod V: attention and MLP
    outputs are zero, so the hidden state is the normalised one-hot embedding of the current token."""
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.roll(torch.eye(vocab), 1, dims=0) * 10)  # row v+1 reads token v
    return model


def test_all_four_contexts_score_the_same_completion_token():
    model = successor_model()
    # three contexts of different lengths; each ends with ŷ_0 − 1 so the successor model predicts ŷ
    y0 = [20, 40]
    ctx = [Contexts(student=[5, 6, y0[0] - 1], teacher=[1, 2, 3, 4, 7, 8, y0[0] - 1], refonly=[9, y0[0] - 1]),
           Contexts(student=[3, y0[1] - 1], teacher=[11, 12, 13, y0[1] - 1],
                    refonly=[2, 2, 2, 2, 2, 2, y0[1] - 1])]
    completions = torch.stack([torch.arange(y0[0], y0[0] + 6), torch.arange(y0[1], y0[1] + 6)])  # [2, 6]
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    completions[~mask] = 0
    w = model.lm_head.weight
    for role in ("student", "teacher", "refonly"):  # the clean base uses the student's ids
        h = completion_hidden(model.model, [getattr(c, role) for c in ctx], completions, mask, pad_id=0)
        assert h.shape == (10, 64)
        predicted = (h @ w.T).argmax(-1)  # [N]
        assert predicted.tolist() == completions[mask].tolist(), role


def test_batched_left_padding_matches_single_sequences(tiny):
    tok, model = tiny
    body, head = models.model_parts(model)
    model.eval()
    ctx = [[1, 5, 9, 30, 31], [2, 7], [4, 4, 8, 8, 16, 16, 32, 33]]
    completions = torch.tensor([[40, 41, 42, 43], [50, 51, 0, 0], [60, 61, 62, 0]])
    mask = completions != 0
    with torch.no_grad():
        batched = completion_hidden(body, ctx, completions, mask, pad_id=tok.pad_token_id)
        rows = []
        for c, y, m in zip(ctx, completions, mask):
            y = y[m].tolist()
            logits = model(input_ids=torch.tensor([c + y])).logits[0]  # full model, unpadded: [P+T, V]
            rows.append(logits[len(c) - 1: len(c) - 1 + len(y)])
    torch.testing.assert_close(batched @ head.T, torch.cat(rows), atol=1e-4, rtol=1e-4)


def test_completion_mask_includes_first_eos_only():
    eos = [7, 9]
    comp = torch.tensor([[1, 2, 7, 7, 3], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    mask, truncated = completion_mask(comp, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_contexts_carry_the_right_fields(tiny):
    tok, _ = tiny
    templates = (rollout.STUDENT_TEMPLATE, rollout.TEACHER_TEMPLATE, rollout.REFONLY_TEMPLATE)
    c = build_contexts(tok, "What is 12 + 30?", "Add: 12 + 30 = 42. \\boxed{42}", templates=templates,
                       student_thinking=False, teacher_thinking=True)
    student, teacher, refonly = (tok.decode(ids) for ids in (c.student, c.teacher, c.refonly))
    assert "What is 12 + 30?" in student and "Add: 12" not in student
    assert "What is 12 + 30?" in teacher and "Add: 12 + 30 = 42" in teacher
    assert "What is 12 + 30?" not in refonly and "Add: 12 + 30 = 42" in refonly
    assert student.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    assert teacher.endswith("<|im_start|>assistant\n")  # thinking on
    assert "\\boxed{}" in student  # LaTeX braces survive the template fill
    assert fill("{question} {x}", question="a{b}") == "a{b} {x}"


def test_template_check_names_the_key():
    import pytest
    with pytest.raises(ValueError, match="refonly_template.*not contain \\{question\\}"):
        check_templates(STUDENT_TEMPLATE, "{question} {reference}", "{question} {reference}")


def test_sampling_uses_the_kv_cache_and_masks_after_eos(tiny):
    tok, model = tiny
    model.train()
    lengths = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    ctx = [Contexts(student=tok("What is 2 + 3?")["input_ids"], teacher=[1], refonly=[1]),
           Contexts(student=tok("Compute 4 times 5.")["input_ids"], teacher=[1], refonly=[1])]
    cfg = make_config("tiny", ["n_samples=3", "max_new_tokens=12", "top_p=1.0", "out_dir=unused"])
    sampler = HFSampler(model, tok, engine="dynamic", batch_size=4, device=torch.device("cpu"),
                        eos_ids=[tok.eos_token_id])
    try:
        torch.manual_seed(0)
        r = popsd.sample(sampler, ctx, cfg, step=1, rank=0, world=1)
    finally:
        hook.remove()
    assert not model.training  # sampling in eval mode: gradient checkpointing cannot drop the cache
    prefills = [n for n in lengths if n > 1]  # 6 sequences in generate batches of 4: two prompt passes
    assert len(prefills) == 2 and lengths.count(1) == len(lengths) - 2  # then one new token per forward
    assert len(r) == 6 and r.completions.shape == r.mask.shape and r.completions.shape[1] <= 12
    assert [c.student for c in r.contexts] == [ctx[0].student] * 3 + [ctx[1].student] * 3
    assert (r.completions[~r.mask] == tok.pad_token_id).all()
    torch.manual_seed(0)
    again = popsd.sample(sampler, ctx, cfg, step=1, rank=0, world=1)
    assert again.texts == r.texts and torch.equal(again.completions, r.completions)  # same seed, same samples


def test_marker_counts_whole_words_any_case():
    assert marker_counts(["Wait, maybe we CHECK it.", "waiting checked perhaps", "Perhaps... wait"]) == 6


def test_every_rollout_engine_samples_what_the_dynamic_cache_samples(tiny):
    """engine=static (preallocated KV cache) gives dynamic's greedy completions and, with the same seed, the
    same samples: the same distribution, not only the same argmax."""
    tok, model = tiny
    prompts = [build_contexts(tok, q, "r",
                              templates=(STUDENT_TEMPLATE, "{question}{reference}", "{reference}"),
                              student_thinking=False, teacher_thinking=False).student
               for q in ("1+1", "2*3=?", "x")]
    kw = dict(n=2, max_new_tokens=10, temperature=1.0, top_p=1.0, top_k=0, eos_ids=[tok.eos_token_id],
              batch_size=6, device="cpu")
    for do_sample in (False, True):
        got = {}
        for engine in ("dynamic", "static"):
            torch.manual_seed(0)
            got[engine] = generate(model, tok, prompts, engine=engine, do_sample=do_sample, **kw).completions
        assert list(got) == ["dynamic", "static"]
        assert all(torch.equal(got["dynamic"], got[e]) for e in got), do_sample


def test_rollouts_sampled_ahead_come_back_for_their_step_prompts_and_errors_included():
    """engines.ahead.Ahead: a thread's rollouts are handed to the step they were drawn for, with that step's
    contexts; a checkpoint's come back only for the prompts they were sampled from (a resume with another
    batch samples anew); an error in the thread is raised in the loop's."""
    from plumbing.data import PopsdError
    from engines.ahead import Ahead
    batch = [Contexts([1, 2], [1, 5, 2], [5, 2]), Contexts([3], [3, 6], [6])]

    def draw(sampler, contexts, n):  # the sampler: an engine's (here none)
        return Rollout(torch.ones(len(contexts) * n, 2, dtype=torch.long), torch.ones(len(contexts) * n, 2,
                       dtype=torch.bool), torch.zeros(len(contexts) * n, dtype=torch.bool),
                       ["ab"] * (len(contexts) * n), contexts=[c for c in contexts for _ in range(n)],
                       weights_step=3)
    ahead = Ahead()
    ahead.start(5, draw, None, batch, 2)
    assert ahead.take(4, batch) is None  # not this step's
    ahead.start(5, draw, None, batch, 2)
    got = ahead.take(5, batch)
    assert len(got) == 4 and got.contexts == [batch[0]] * 2 + [batch[1]] * 2 and got.policy_lag(5) == 1
    assert ahead.take(5, batch) is None  # handed over once
    state = draw(None, batch, 2).state()
    ahead.restore(6, state)
    assert ahead.take(6, batch[::-1]) is None  # sampled for other prompts: the step samples anew
    ahead.restore(6, state)
    assert ahead.take(6, batch).contexts == [batch[0]] * 2 + [batch[1]] * 2

    def fails(*_):
        raise PopsdError("no rollout server answered")
    ahead.start(7, fails, None)
    with pytest.raises(PopsdError, match="no rollout server answered"):
        ahead.take(7, batch)
    assert ahead.take(7, batch) is None
