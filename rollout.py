"""rollout.py: the three contexts, the sampled completion ŷ, and how ŷ lines up with every context.

Three contexts, four distributions:

    student π_θ    (LoRA on)   chat(student_template(q))        + ŷ
    clean base π_0 (LoRA off)  the student's context, same ids   + ŷ
    teacher π_T    (LoRA off)  chat(teacher_template(q, r))     + ŷ
    ref-only π_ref (LoRA off)  chat(refonly_template(r))        + ŷ

For GRPO readers: "ref" / `refonly` is the reference *solution* r (the teacher's context without the
question), not GRPO's frozen reference *model*; the frozen base model is the clean base π_0.

ŷ is sampled once, from the student's context (engines/), and appended as token ids to every
context: it is never decoded and re-tokenized, so all four passes score exactly the same tokens.
`completion_hidden` says where.
"""
import re
from dataclasses import dataclass

import torch

STUDENT_TEMPLATE = ("Problem: {question}\n\n"
                    "Please reason step by step, and put your final answer within \\boxed{}.")
REFERENCE_BLOCK = (
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{reference}\n=== Reference Solution End ===\n\n"
    "After understanding the reference solution, solve the problem with your own reasoning. "
    "Do not copy the reference: derive the same final answer independently.\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)
TEACHER_TEMPLATE = "Problem: {question}\n\n" + REFERENCE_BLOCK
REFONLY_TEMPLATE = REFERENCE_BLOCK  # the teacher's prompt with the problem removed

# The OPSD code's wording, verbatim: siyan-zhao/OPSD, data_collator.py (_build_prompts, math
# branch), commit c181e5bff7b94edef58cc64b4c0ba3a4d9e0d0dd. Its teacher is asked to "explore
# different approaches" and to "backtrack or reconsider": wording that may itself move the epistemic
# markers the paper measures.
OPSD_STUDENT = ("Problem: {question}\n\n"
                "Please reason step by step, and put your final answer within \\boxed{}.")
OPSD_REFERENCE_BLOCK = (
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{reference}\n=== Reference Solution End ===\n\n\n"
    "After reading the reference solution above, make sure you truly understand the reasoning "
    "behind each step \u2014 do not copy or paraphrase it. Now, using your own words and independent "
    "reasoning, derive the same final answer to the problem above. Think step by step, explore "
    "different approaches, and don't be afraid to backtrack or reconsider if something doesn't "
    "work out:\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
# prompts=...: (student and clean base, teacher, reference-only = the teacher without the problem)
PROMPTS = {
    "popsd": (STUDENT_TEMPLATE, TEACHER_TEMPLATE, REFONLY_TEMPLATE),
    "opsd_wording": (OPSD_STUDENT, "Problem: {question}\n\n" + OPSD_REFERENCE_BLOCK,
                     OPSD_REFERENCE_BLOCK),
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
    """Sampled completions: B = prompts × n sequences, T = the longest completion. An engine returns
    one (engines/); the loop adds each row's contexts, which the scoring passes read."""
    completions: torch.Tensor  # [B, T] long, pad after EOS
    mask: torch.Tensor  # [B, T] bool, True up to and including EOS
    truncated: torch.Tensor  # [B] bool, no EOS within max_new_tokens
    texts: list[str]  # [B] decoded (for logging and grading only: the loss reads the ids)
    logprobs: torch.Tensor | None = None  # [B, T] the engine's raw log-prob of each token, if it has
    contexts: list[Contexts] | None = None  # [B] each row's contexts, repeated n times per prompt
    # optimizer steps the sampling adapter had seen, where the engine samples from a copy of the
    # weights (the server pool); None: it sampled the training model itself
    weights_step: int | None = None

    def __len__(self):
        return len(self.texts)

    def select(self, rows: slice) -> "Rollout":
        mask = self.mask[rows]
        t = int(mask.sum(1).max().item()) if mask.numel() else 0  # trim padding columns
        return Rollout(self.completions[rows, :t], mask[:, :t], self.truncated[rows],
                       self.texts[rows], None if self.logprobs is None else self.logprobs[rows, :t],
                       None if self.contexts is None else self.contexts[rows], self.weights_step)

    def policy_lag(self, step: int) -> int:
        """Optimizer steps between the weights that sampled these completions and the student that
        step `step` trains on them (after step − 1 updates): 0 on-policy, 1 with rollout_ahead=1."""
        return 0 if self.weights_step is None else step - 1 - self.weights_step

    def state(self) -> dict:
        """What a checkpoint keeps of rollouts sampled ahead (their contexts come from the data)."""
        return {"completions": self.completions, "mask": self.mask, "truncated": self.truncated,
                "texts": self.texts, "logprobs": self.logprobs, "weights_step": self.weights_step,
                "prompts": [c.student for c in self.contexts]}


def check_templates(student: str, teacher: str, refonly: str):
    """Each template must carry exactly the fields its role sees."""
    want = {"student_template": (student, True, False), "teacher_template": (teacher, True, True),
            "refonly_template": (refonly, False, True)}
    for key, (text, has_q, has_r) in want.items():
        for field, needed in (("{question}", has_q), ("{reference}", has_r)):
            if (field in text) != needed:
                must = "must" if needed else "must not"
                raise ValueError(f"config key {key!r} {must} contain {field}")


def fill(template: str, question: str = "", reference: str = "") -> str:
    # One pass over the template, not str.format: LaTeX braces stay, and a question holding
    # "{reference}" stays that text (replacing one field after the other would put the reference
    # inside the question).
    def value(field):
        return question if field[1] == "question" else reference
    return re.sub(r"\{(question|reference)\}", value, template)


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's control tokens (<|im_end|>, </think>, ...): in data they act as controls."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values()
             if getattr(t, "special", False) or t.content.endswith("think>")]
    specials = set(tokenizer.all_special_tokens) | set(added)
    return sorted(t for t in specials if len(t) > 1)


def chat_ids(tokenizer, user_text: str, thinking: bool) -> list[int]:
    """Token ids of one user turn with the generation prompt, thinking mode as given."""
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template: use an instruct/chat model, or set one "
                         "on the tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_contexts(tokenizer, question, reference, *, templates, student_thinking,
                   teacher_thinking):
    """The three prompts of one (question, reference) row as token ids: a Contexts."""
    student_t, teacher_t, refonly_t = templates
    return Contexts(
        student=chat_ids(tokenizer, fill(student_t, question=question), student_thinking),
        teacher=chat_ids(tokenizer, fill(teacher_t, question, reference), teacher_thinking),
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


def from_tokens(tokens: list[list[int]], logprobs: list[list[float]] | None, tokenizer,
                eos_ids: list[int]):
    """What an engine sampled (per sequence its token ids, EOS included where it stopped, and the
    log-prob of each) → a Rollout: padded after the first EOS, masked up to and including it,
    truncated where none came. Every engine returns what this makes: all mean the same by a mask."""
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
    texts = tokenizer.batch_decode([c[m].tolist() for c, m in zip(completions, mask)],
                                   skip_special_tokens=True)
    lp = None if lp is None else lp.masked_fill(~mask, 0.0)
    return Rollout(completions, mask, truncated, texts, lp)


def completion_hidden(body, prompts: list[list[int]], completions, mask, pad_id: int):
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
    out = body(input_ids=x, attention_mask=a, position_ids=pos, use_cache=False)
    h = out.last_hidden_state  # [B, P+T, H]
    h = h[:, width - 1: width - 1 + completions.shape[1]]  # [B, T, H]
    return h[mask.to(device)]  # [N, H], row-major over (b, t) like mask


def repeated_ngrams(completions: torch.Tensor, mask: torch.Tensor, n: int = 4) -> tuple[int, int]:
    """(n-grams seen before in the same completion, all n-grams), valid tokens only: degenerate
    repetition."""
    repeats = total = 0
    for ids, m in zip(completions.tolist(), mask.tolist()):
        ids = [t for t, keep in zip(ids, m) if keep]
        grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
        repeats, total = repeats + len(grams) - len(set(grams)), total + len(grams)
    return repeats, total


def marker_counts(texts: list[str]) -> int:
    """Epistemic markers ("wait", "maybe", "perhaps", "check"; whole words, any case)."""
    return sum(len(MARKERS.findall(t)) for t in texts)
