"""engines/sampling.py: one token per row, drawn from the row's own seed: how the in-process engines
(HF generate, hf.py; the graph sampler, graph.py) sample ŷ.

A row's seed s (engines.request_seed: the run's seed, the step and the prompt's place in the whole
step's batch; + j for its j-th sample) and the token's position t give one uniform number
u = U(s, t) ∈ [0, 1): the t-th output of SplitMix64 started from s, integer arithmetic that every
device computes alike. The token is the first whose cumulative probability (float64, in vocabulary
order) exceeds u·total: inverse-CDF sampling, exact for any distribution. The probabilities are
those of HF's own warpers (temperature, then top-k, then top-p, in HF generate's order).

So a row's tokens depend on its seed and its logits alone: not on the rank that samples it, the
other rows of its batch, the generation batch size, the call order or anything drawn before. (Its
logits can differ in the last bits with the batch's padding, which can move a draw that falls
within that much of a boundary.) vLLM takes the same seeds with a generator of its own, so two
engines give different samples from one seed.
"""
import torch

GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
MIX_1 = 0xBF58476D1CE4E5B9 - 2 ** 64  # its multipliers, as signed int64
MIX_2 = 0x94D049BB133111EB - 2 ** 64


def _int64(x: int) -> int:
    """A Python int modulo 2**64, as the signed int64 with the same bits."""
    x %= 2 ** 64
    return x - 2 ** 64 if x >= 2 ** 63 else x


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (products wrap modulo 2**64, as the C original's uint64)."""
    z = (z ^ _shift_right(z, 30)) * MIX_1
    z = (z ^ _shift_right(z, 27)) * MIX_2
    return z ^ _shift_right(z, 31)


def uniforms(seeds: torch.Tensor, t: int) -> torch.Tensor:
    """[b] float64 in [0, 1): the uniform number of each row's seed [b] (int64) at position t."""
    z = _mix(seeds ^ MIX_2) + _int64((t + 1) * GOLDEN)  # the seed mixed first: s and s + 1 part ways
    return _shift_right(_mix(z), 11).double() * 2.0 ** -53  # the top 53 bits


def draw(scores: torch.Tensor, seeds: torch.Tensor, t: int) -> torch.Tensor:
    """[b] token ids: one draw per row from softmax(scores) [b, V] (warped: -inf where cut) with the
    row's uniform number at position t (inverse CDF). seeds: [b] int64 on scores' device."""
    probs = torch.softmax(scores.double(), dim=-1)  # [b, V]
    cdf = probs.cumsum(-1)  # [b, V]
    if not torch.isfinite(cdf[:, -1]).all():  # torch.multinomial's words, which the loop recognises
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    target = uniforms(seeds, t) * cdf[:, -1]  # [b]
    # the first entry whose cumulative mass exceeds the target: a token cut by top-k or top-p (mass 0)
    # never is, since its cumulative mass equals its predecessor's
    token = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]  # [b]
    return token.clamp_max(scores.shape[-1] - 1)


def warpers(temperature: float, top_k: int, top_p: float):
    """HF generate's sampling warpers, in its order (transformers' own classes)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                         TopKLogitsWarper, TopPLogitsWarper)
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def row_seeds(seeds: list[int] | None, prompts: int, n: int, device) -> torch.Tensor:
    """[prompts × n] int64: prompt i's j-th sample gets seeds[i] + j (as vLLM does); seeds=None draws
    one per prompt from torch's generator (a caller that seeded torch gets the same samples again)."""
    base = (torch.randint(0, 2 ** 48, (prompts,)) if seeds is None
            else torch.tensor(seeds, dtype=torch.long))  # [prompts]
    if len(base) != prompts:
        raise ValueError(f"{len(base)} seeds for {prompts} prompts")
    return (base[:, None] + torch.arange(n)[None, :]).reshape(-1).to(device)  # [prompts × n]


class SeededSampling:
    """A logits processor for HF generate (called with do_sample=False, so its greedy step takes
    the token chosen here): the warpers, then one seeded draw per row at the position reached."""

    def __init__(self, seeds: torch.Tensor, prompt_width: int, temperature, top_k, top_p):
        self.seeds, self.width = seeds, prompt_width  # [b] the batch's rows, in order
        self.warp = warpers(temperature, top_k, top_p)

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.width  # tokens generated so far: this draw's position
        token = draw(self.warp(input_ids, scores), self.seeds, t)  # [b]
        chosen = torch.full_like(scores, float("-inf"))  # [b, V]
        return chosen.scatter_(1, token[:, None], 0.0)
