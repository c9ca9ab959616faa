"""rollout.py: the four contexts, sampling from the student, and scoring positions.

    student π_θ   (LoRA on)   chat(student_template(q))        + ŷ
    clean base π_0 (LoRA off) the student's context, same ids   + ŷ
    teacher π_T   (LoRA off)  chat(teacher_template(q, r))     + ŷ
    ref-only π_ref (LoRA off) chat(refonly_template(r))        + ŷ

The completion ŷ is sampled once, from the student context, and appended as token ids to every
context: it is never decoded and re-tokenized, so all four score exactly the same tokens.
"""
import contextlib
import hashlib
import re
from dataclasses import dataclass

import torch

import distributed as D

STUDENT_TEMPLATE = "Problem: {question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
REFERENCE_BLOCK = (
    "Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n{reference}\n"
    "=== Reference Solution End ===\n\n"
    "After understanding the reference solution, solve the problem with your own reasoning. Do not copy "
    "the reference: derive the same final answer independently.\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
TEACHER_TEMPLATE = "Problem: {question}\n\n" + REFERENCE_BLOCK
REFONLY_TEMPLATE = REFERENCE_BLOCK  # the teacher's prompt with the problem removed

# The OPSD paper's wording, verbatim: siyan-zhao/OPSD, data_collator.py (_build_prompts, math branch), commit
# c181e5bff7b94edef58cc64b4c0ba3a4d9e0d0dd. Its teacher is asked to "explore different approaches" and to
# "backtrack or reconsider": wording that may itself move the epistemic markers the paper measures.
OPSD_STUDENT = "Problem: {question}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
OPSD_REFERENCE_BLOCK = (
    "Here is a reference solution to this problem:\n=== Reference Solution Begin ===\n{reference}\n"
    "=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure you truly "
    "understand the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your own words and "
    "independent reasoning, derive the same final answer to the problem above. Think step by step, explore "
    "different approaches, and don't be afraid to backtrack or reconsider if something doesn't work out:\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}.")
PROMPTS = {  # preset: (student and clean base, teacher, reference-only = the teacher without the problem)
    "popsd": (STUDENT_TEMPLATE, TEACHER_TEMPLATE, REFONLY_TEMPLATE),
    "opsd": (OPSD_STUDENT, "Problem: {question}\n\n" + OPSD_REFERENCE_BLOCK, OPSD_REFERENCE_BLOCK),
}

MARKERS = re.compile(r"\b(wait|maybe|perhaps|check)\b", re.IGNORECASE)


@dataclass
class Contexts:
    """Prompt token ids of one example, chat template applied, generation prompt included."""
    student: list[int]  # question; also the clean base's context
    teacher: list[int]  # question + reference
    refonly: list[int]  # reference, no question


@dataclass
class Rollout:
    """One step's samples: B = prompts × n sequences, T = longest completion."""
    contexts: list[Contexts]  # [B], repeated n times per prompt
    completions: torch.Tensor  # [B, T] long, pad after EOS
    mask: torch.Tensor  # [B, T] bool, True up to and including EOS
    truncated: torch.Tensor  # [B] bool, no EOS within max_new_tokens
    texts: list[str]  # [B] decoded completions (for logging only)
    logprobs: torch.Tensor | None = None  # [B, T] float: the sampler's raw log-prob of each token (engines only)

    def __len__(self):
        return len(self.contexts)

    def select(self, rows: slice) -> "Rollout":
        mask = self.mask[rows]
        t = int(mask.sum(1).max().item()) if mask.numel() else 0  # trim padding columns
        lp = None if self.logprobs is None else self.logprobs[rows, :t]
        return Rollout(self.contexts[rows], self.completions[rows, :t], mask[:, :t],
                       self.truncated[rows], self.texts[rows], lp)


def check_templates(student: str, teacher: str, refonly: str):
    """Each template must carry exactly the fields its role sees."""
    want = {"student_template": (student, True, False), "teacher_template": (teacher, True, True),
            "refonly_template": (refonly, False, True)}
    for key, (text, has_q, has_r) in want.items():
        for field, needed in (("{question}", has_q), ("{reference}", has_r)):
            if (field in text) != needed:
                raise ValueError(f"config key {key!r} must {'' if needed else 'not '}contain {field}")


def fill(template: str, question: str = "", reference: str = "") -> str:
    # One pass over the template, not str.format: LaTeX braces stay, and a question holding "{reference}"
    # stays that text (replacing one field after the other would put the reference inside the question).
    return re.sub(r"\{(question|reference)\}", lambda m: question if m[1] == "question" else reference, template)


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's control tokens (<|im_end|>, </think>, ...): found in data, they act as controls, not text."""
    specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                   if getattr(t, "special", False) or t.content.endswith("think>")}
    return sorted(t for t in specials if len(t) > 1)


def chat_ids(tokenizer, user_text: str, thinking: bool) -> list[int]:
    """Token ids of one user turn with the generation prompt, thinking mode as given."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template: use an instruct/chat model, or set one on the tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_contexts(tokenizer, question, reference, *, templates, student_thinking, teacher_thinking) -> Contexts:
    student_t, teacher_t, refonly_t = templates
    return Contexts(
        student=chat_ids(tokenizer, fill(student_t, question=question), student_thinking),
        teacher=chat_ids(tokenizer, fill(teacher_t, question=question, reference=reference), teacher_thinking),
        refonly=chat_ids(tokenizer, fill(refonly_t, reference=reference), teacher_thinking),
    )


def pad_left(seqs: list[list[int]], pad_id: int):
    """Left-pad to [B, P] so every prompt ends at column P−1; returns (ids, attention mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, P]
    attn = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, P]
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s):] = 1
    return ids, attn


def completion_mask(completions: torch.Tensor, eos_ids: list[int]):
    """[B, T] → (mask up to and including the first EOS, truncated flags [B])."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))  # [B, T]
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # [B, T] strictly after the first EOS
    return ~after, ~is_eos.any(1)


ENGINES = ("dynamic", "static")  # HF generate's KV cache: grown step by step | preallocated (bench/rollout.py)
# beyond HF generate (config.py adds them to rollout_engine's choices): graph (graph_engine.py), vllm (vllm_engine.py)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, n, max_new_tokens, temperature, top_p, top_k, eos_ids,
             batch_size, device, on_batch=None, min_new_tokens=0, engine="dynamic", do_sample=True,
             logits_processor=None, gather=True):
    """n completions per prompt ([B = prompts × n]), KV cache on, batched with left padding.

    Under torchrun (FSDP) every rank runs the same number of decoding steps (synced_gpus): a sharded
    forward is a collective, so a rank that is done keeps stepping until all are. With gather (the
    default) the sharded weights are all-gathered once per call, not at every step (distributed.gathered).

    Returns (completions [B, T] padded after EOS, mask [B, T], truncated [B], decoded texts [B]).
    """
    pad_id = tokenizer.pad_token_id
    if temperature == 0:  # greedy (eval.py --temperature 0)
        do_sample, temperature, top_p, top_k = False, 1.0, 1.0, 0
    rows = [p for p in prompts for _ in range(n)]  # [B]
    model.eval()  # gradient checkpointing only acts in train mode, so the KV cache stays on
    extra = {"cache_implementation": "static"} if engine == "static" else {}
    chunks = []
    # FSDP: the weights all-gathered once, not at every step; no model-folder sampling setting applies
    with D.gathered(model) if gather else contextlib.nullcontext(), neutral_generation_config(model):
        for i in range(0, len(rows), batch_size):
            ids, attn = pad_left(rows[i:i + batch_size], pad_id)  # [b, P]
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_ids, pad_token_id=pad_id, use_cache=True,
                                 min_new_tokens=min_new_tokens, synced_gpus=torch.distributed.is_initialized(),
                                 logits_processor=logits_processor, **extra)  # [b, P + T_i]
            chunks.append(out[:, ids.shape[1]:].cpu())  # [b, T_i]
            if on_batch:
                on_batch(len(ids))  # progress: sequences done
    return join(chunks, tokenizer, eos_ids)


@contextlib.contextmanager
def neutral_generation_config(model):
    """HF generate fills every setting a call leaves unset from the model folder's generation_config.json
    (repetition_penalty, no_repeat_ngram_size, min_p, bad words, ...), which no other engine reads. For the
    call, the model's config holds only its EOS and pad ids: generate samples from exactly the distribution
    the arguments describe (temperature, top-p, top-k), as the graph engine and vLLM do."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = causal.generation_config
    causal.generation_config = type(shipped)(eos_token_id=shipped.eos_token_id, pad_token_id=shipped.pad_token_id)
    try:
        yield
    finally:
        causal.generation_config = shipped


def join(chunks: list[torch.Tensor], tokenizer, eos_ids: list[int]):
    """Batches of completions [b_i, T_i] → (completions [B, T] padded after EOS, mask [B, T], truncated [B], texts)."""
    pad_id = tokenizer.pad_token_id
    width = max(c.shape[1] for c in chunks)
    completions = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id)
                             for c in chunks])  # [B, T]
    mask, truncated = completion_mask(completions, eos_ids)  # [B, T], [B]
    completions = completions.masked_fill(~mask, pad_id)
    texts = tokenizer.batch_decode([c[m].tolist() for c, m in zip(completions, mask)], skip_special_tokens=True)
    return completions, mask, truncated, texts


def sample(model, tokenizer, contexts: list[Contexts], *, n, **kwargs) -> Rollout:
    """n completions per prompt from the student (adapters on), each from its student context."""
    out = generate(model, tokenizer, [c.student for c in contexts], n=n, **kwargs)
    return Rollout([c for c in contexts for _ in range(n)], *out)


# ----------------------------------------------------------------------------- samplers
# The loop holds one sampler: HF generate on the training model (below), vLLM in this process
# (vllm_engine.py) or a pool of vLLM servers (server_pool.py). Each has sync(model, step), which makes the
# step's adapter the one that samples, generate(prompts, ...) and close(); engines report log-probs.

def request_seed(seed: int, step: int | str, index: int) -> int:
    """The seed of one prompt's requests at one step (or in one evaluation, named; sample j uses + j): a run's
    samples depend on its seed, the step and the prompt's place in the batch, never on the engine, server or rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()[:6], "big")


def pack(tokens: list[list[int]], logprobs: list[list[float]] | None, tokenizer, eos_ids: list[int]):
    """An engine's completions (token ids, EOS included when it stopped there) → generate's tensors:
    (completions [B, T] padded after EOS, mask [B, T], truncated [B], texts [B], logprobs [B, T] or None)."""
    pad_id = tokenizer.pad_token_id
    width = max([len(t) for t in tokens] + [1])
    completions = torch.full((len(tokens), width), pad_id, dtype=torch.long)  # [B, T]
    lp = None if logprobs is None else torch.zeros(len(tokens), width)  # [B, T]
    for i, t in enumerate(tokens):
        completions[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        if lp is not None:
            lp[i, :len(t)] = torch.tensor(logprobs[i], dtype=torch.float32)
    mask, truncated = completion_mask(completions, eos_ids)  # [B, T], [B]
    mask &= torch.arange(width)[None, :] < torch.tensor([len(t) for t in tokens])[:, None]
    completions = completions.masked_fill(~mask, pad_id)
    texts = tokenizer.batch_decode([c[m].tolist() for c, m in zip(completions, mask)], skip_special_tokens=True)
    return completions, mask, truncated, texts, lp


class HFSampler:
    """HF generate on the training model itself (engine dynamic | static): always on-policy, nothing to sync;
    its random numbers come from torch's generator (seeded per run, saved in checkpoints)."""
    reports_logprobs = False

    def __init__(self, model, tokenizer, *, engine: str, batch_size: int, device, eos_ids: list[int], gather=True):
        self.model, self.tokenizer, self.eos_ids, self.device = model, tokenizer, eos_ids, device
        self.engine, self.batch_size, self.gather = engine, batch_size, gather

    def sync(self, model, step: int):
        pass

    def generate(self, prompts, *, n, max_new_tokens, temperature, top_p, top_k, seeds=None, on_batch=None):
        out = generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, eos_ids=self.eos_ids,
                       batch_size=self.batch_size, device=self.device, on_batch=on_batch, engine=self.engine,
                       gather=self.gather)
        return (*out, None)

    def close(self):
        pass


def completion_hidden(body, prompts: list[list[int]], completions, mask, pad_id: int) -> torch.Tensor:
    """Final hidden states [N, H] of one context at the positions that score the completion tokens.

    Sequence = left-padded prompt [B, P] ++ completion [B, T]. The hidden state at position i gives
    the logits of token i+1, so ŷ_t (at column P+t) is scored at column P−1+t: the slice
    [P−1, P−1+T) lines up with ŷ in every context, whatever its prompt length.
    """
    device = next(body.parameters()).device
    ids, attn = pad_left(prompts, pad_id)  # [B, P]
    width = ids.shape[1]
    x = torch.cat([ids, completions], 1).to(device)  # [B, P+T]
    a = torch.cat([attn, mask.long()], 1).to(device)  # [B, P+T]
    pos = (a.cumsum(1) - 1).clamp_min(0)  # [B, P+T] positions count real tokens only
    h = body(input_ids=x, attention_mask=a, position_ids=pos, use_cache=False).last_hidden_state  # [B, P+T, H]
    h = h[:, width - 1: width - 1 + completions.shape[1]]  # [B, T, H]
    return h[mask.to(device)]  # [N, H], row-major over (b, t) like mask


def repeated_ngrams(completions: torch.Tensor, mask: torch.Tensor, n: int = 4) -> tuple[int, int]:
    """(n-grams seen before in the same completion, all n-grams) over the valid tokens: degenerate repetition."""
    repeats = total = 0
    for ids, m in zip(completions.tolist(), mask.tolist()):
        ids = [t for t, keep in zip(ids, m) if keep]
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        repeats, total = repeats + len(grams) - len(set(grams)), total + len(grams)
    return repeats, total


def marker_counts(texts: list[str]) -> int:
    """Epistemic markers ("wait", "maybe", "perhaps", "check"; whole words, any case)."""
    return sum(len(MARKERS.findall(t)) for t in texts)
