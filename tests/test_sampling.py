"""engines/sampling.py: each row's tokens drawn from its own seed. The uniform numbers are SplitMix64's, bit
for bit; a draw follows the warped distribution exactly and never picks a cut token; and the in-process
engines' samples depend on a prompt's seed alone: not on the other prompts of its batch, the generation
batch size, the call order, or the ranks the step's prompts are split over."""
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

import popsd
import rollout
from engines import request_seed
from engines.graph import GraphSampler
from engines.hf import HFSampler
from engines.sampling import draw, row_seeds, uniforms, warpers
from plumbing.config import make_config
from worlds import common, toyworld

M = 2 ** 64


def splitmix64(state: int, t: int) -> int:
    """SplitMix64's t-th output (t = 0, 1, ...) from a state, as its C reference computes it in uint64."""
    z = (state + (t + 1) * 0x9E3779B97F4A7C15) % M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
    return z ^ (z >> 31)


def test_the_uniform_numbers_are_splitmix64s_bit_for_bit():
    rng = random.Random(0)
    seeds = [rng.randrange(2 ** 48) + j for j in range(500)] + [0, 1, 2 ** 48 - 1, 2 ** 62]
    for t in (0, 1, 127, 10 ** 6):
        # the state is the seed mixed once (splitmix64(x, -1) is the finaliser alone)
        want = [(splitmix64(splitmix64(s ^ 0x94D049BB133111EB, -1), t) >> 11) * 2.0 ** -53 for s in seeds]
        assert uniforms(torch.tensor(seeds), t).tolist() == want
    u = uniforms(torch.arange(100_000), 3)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_a_draw_follows_the_warped_distribution_and_never_picks_a_cut_token():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    scores = warpers(0.7, 4, 0.9)(None, logits[None].clone())[0]  # temperature, then top-4, then top-p
    p = torch.softmax(scores.double(), -1)
    assert (p == 0).sum() >= 2  # the warpers did cut
    n = 200_000
    tokens = draw(scores.expand(n, -1), torch.arange(n), 5)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[p == 0].sum() == 0
    keep = p > 0
    chi2 = ((counts[keep] - n * p[keep]) ** 2 / (n * p[keep])).sum().item()
    assert chi2 < 16.3, chi2  # χ² with ≤ 3 degrees of freedom: p > 0.001
    # another position gives other draws from the same seeds (independent across t)
    other = draw(scores.expand(n, -1), torch.arange(n), 6)
    assert (other != tokens).double().mean() > 0.3


def test_prompt_i_sample_j_gets_seed_i_plus_j_and_no_seeds_come_from_torch():
    assert row_seeds([10, 50], 2, 3, "cpu").tolist() == [10, 11, 12, 50, 51, 52]
    torch.manual_seed(3)
    a = row_seeds(None, 4, 2, "cpu")
    torch.manual_seed(3)
    assert torch.equal(a, row_seeds(None, 4, 2, "cpu")) and len(set(a.tolist())) == 8
    with pytest.raises(ValueError, match="3 seeds for 2 prompts"):
        row_seeds([1, 2, 3], 2, 1, "cpu")


@pytest.fixture(scope="module")
def toy():
    tok, base = common.load_base(toyworld)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                            init_lora_weights=False)).eval()
    prompts = [rollout.chat_ids(tok, f"Q:{q}", False) for q in common.held_out(toyworld, 8)]
    return tok, model, prompts


def samplers(tok, model, batch_size):
    eos = [tok.eos_token_id]
    return {"dynamic": HFSampler(model, tok, engine="dynamic", batch_size=batch_size, device="cpu",
                                 eos_ids=eos),
            "graph": GraphSampler(model, tok, batch_size=batch_size, device="cpu", eos_ids=eos),
            "graph, dropping rows": GraphSampler(model, tok, batch_size=batch_size, device="cpu", eos_ids=eos,
                                                 keep_rows=False)}


@pytest.mark.parametrize("engine", ["dynamic", "graph", "graph, dropping rows"])
def test_a_prompts_samples_depend_on_its_seed_alone(toy, engine):
    tok, model, prompts = toy
    seeds = [request_seed(0, 1, i) for i in range(len(prompts))]
    kw = dict(n=2, max_new_tokens=60, temperature=1.0, top_p=1.0, top_k=0)
    whole = samplers(tok, model, 16)[engine].generate(prompts, seeds=seeds, **kw).texts
    assert len(set(whole)) > 8  # not one degenerate completion
    torch.manual_seed(123)  # torch's generator plays no part
    again = samplers(tok, model, 16)[engine].generate(prompts, seeds=seeds, **kw).texts
    assert again == whole  # the same call twice (the old engines drew from torch's generator here)
    # the prompts in another order, with a generation batch of 3 rows, after a call for other seeds
    sampler = samplers(tok, model, 3)[engine]
    sampler.generate(prompts[:2], seeds=[7, 8], **kw)
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    got = sampler.generate([prompts[i] for i in order], seeds=[seeds[i] for i in order], **kw).texts
    assert got == [whole[2 * i + j] for i in order for j in range(2)]
    alone = sampler.generate([prompts[4]], seeds=[seeds[4]], **kw).texts  # one prompt, a batch of its own
    assert alone == whole[8:10]


@pytest.mark.parametrize("engine", ["dynamic", "graph"])
def test_the_steps_samples_are_the_same_whatever_the_ranks(toy, engine):
    """popsd.sample: a prompt's seed comes from its place in the whole step's batch, so two ranks, each with
    its share (every second prompt), sample exactly the rows one process samples."""
    tok, model, prompts = toy
    cfg = make_config("toy", ["n_samples=2", "max_new_tokens=60"])
    batch = [rollout.Contexts(p, p, p) for p in prompts]
    sampler = samplers(tok, model, 4)[engine]
    one = popsd.sample(sampler, batch, cfg, 5, 0, 1).texts
    for rank in (0, 1):
        share = popsd.sample(sampler, batch[rank::2], cfg, 5, rank, 2).texts
        assert share == [one[2 * i + j] for i in range(rank, len(batch), 2) for j in range(2)]
    assert popsd.sample(sampler, batch, cfg, 6, 0, 1).texts != one  # another step, other samples
