"""docs/walkthrough.py: one step of `python popsd.py --recipe toy`, traced with its real shapes; its output is
the figure and the table of docs/walkthrough.md (tests/test_docs.py checks the page against it).

    python docs/walkthrough.py

It runs the functions the loop runs (popsd.sample, popsd.frozen_passes, rollout.completion_hidden) and the
readable loss path (loss.purified_target, loss.divergence) on the toy recipe's first step, step 1 of seed 0.
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engines  # noqa: E402
import loss  # noqa: E402
import popsd  # noqa: E402
from plumbing.config import make_config  # noqa: E402
from plumbing.data import DataStream, read_rows  # noqa: E402
from plumbing.models import eos_ids, load_model, model_parts  # noqa: E402
from rollout import completion_hidden, pad_left  # noqa: E402
from plumbing.session import prepare_contexts  # noqa: E402


def shape(t) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


# one character per token (the toy's are characters)
GLYPHS = {"<|im_start|>": "[", "<|im_end|>": "]", "\n": "⏎"}


def row_picture(tok, contexts, completion, mask, pad_id) -> list[str]:
    """Row 0 in every context, as the scoring passes see it: left padding (·), the prompt, then ŷ (each
    context padded to its own width P, drawn here right-aligned so ŷ starts in one column); ^ marks column
    P−1."""
    def glyphs(ids):
        return "".join(GLYPHS.get(t, t) for t in (tok.decode([i]) for i in ids))
    y = glyphs(completion[mask].tolist()[:14])
    widths = {role: pad_left([getattr(c, role) for c in contexts], pad_id)[0].shape[1]
              for role in ("student", "teacher", "refonly")}
    wide = max(widths.values())
    lines = []
    for role, width in widths.items():
        ids, attn = pad_left([getattr(c, role) for c in contexts], pad_id)
        text = "".join("·" if not a else glyphs([i]) for i, a in zip(ids[0].tolist(), attn[0].tolist()))
        lines.append(f"  {role:<8}{' ' * (wide - width)}{text}|{y}…   P = {width}")
    lines.append(f"  {'':<8}{' ' * (wide - 1)}^ column P−1 in each: its hidden state scores ŷ_0 ('{y[0]}')")
    return lines


@torch.no_grad()
def main():
    torch.manual_seed(0)
    cfg = make_config("toy", ["out_dir=unused"])
    torch.set_num_threads(cfg.threads)
    tok, model = load_model(cfg, torch.device("cpu"), str(ROOT / cfg.model))
    rows, _ = read_rows(str(ROOT / cfg.data), cfg.data_split, (cfg.question_field, cfg.reference_field))
    examples, _ = prepare_contexts(rows, tok, cfg)
    batch = [examples[i] for i in DataStream(len(examples), cfg.seed).take(cfg.batch_size)]
    sampler = engines.make_sampler(cfg, model, tok, str(ROOT / cfg.model), eos_ids(model, tok),
                                   torch.device("cpu"), ROOT / "runs/unused", 0, 1)
    rollout = popsd.sample(sampler, batch, cfg, step=1, rank=0, world=1)  # 1. sample
    body, head_weight = model_parts(model)
    pad = tok.pad_token_id
    h_teacher, h_refonly, h_base = popsd.frozen_passes(model, body, rollout, cfg, pad)  # 2. score
    model.train()
    h_student = completion_hidden(body, [c.student for c in rollout.contexts], rollout.completions,
                                  rollout.mask, pad)
    w = head_weight.float()
    student, teacher, refonly, base = (h.float() @ w.T for h in (h_student, h_teacher, h_refonly, h_base))
    tau = cfg.loss_temperature or cfg.temperature
    delta_it = loss._logp(teacher, tau) - loss._logp(refonly, tau)
    target = loss.purified_target(teacher, refonly, base, beta=cfg.beta, pmi_clip=cfg.pmi_clip,
                                  temperature=tau)
    per_token = loss.divergence(student, target, kind=cfg.divergence, jsd_mix=cfg.jsd_mix, temperature=tau)
    n_step = int(rollout.mask.sum())
    contexts = {role: pad_left([getattr(c, role) for c in rollout.contexts], pad)[0]
                for role in ("student", "teacher", "refonly")}
    print(
        "Row 0 in the three contexts (the clean base reads the student's); [ ] are <|im_start|> <|im_end|>:")
    print(*row_picture(tok, rollout.contexts, rollout.completions[0], rollout.mask[0], pad), sep="\n")
    print()
    print("| step | what | shape |")
    print("|---|---|---|")
    print(f"| 1 sample | prompts, left-padded: student, teacher, reference-only (`rollout.pad_left`) | "
          f"{', '.join(shape(t) for t in contexts.values())} |")
    print(f"| 1 sample | ŷ and its mask, B = {len(rollout)} rows × T (`popsd.sample`) | "
          f"{shape(rollout.completions)}, {shape(rollout.mask)} |")
    print(f"| 2 score | hidden states at the N = {n_step} valid positions, per pass "
          f"(`rollout.completion_hidden`) | {shape(h_student)} × 4 |")
    print(f"| 2 score | frozen output head W (`plumbing.models.model_parts`) | {shape(head_weight)} |")
    print("| 3 target | logits h @ Wᵀ, one pass (`loss.reference_loss`, the toy's path; "
          f"`plumbing/loss_fused.py` works in chunks of C rows) | {shape(student)} |")
    print(f"| 3 target | Δ_it = log π_T − log π_ref (`loss.purified_target`) | {shape(delta_it)} |")
    print(f"| 3 target | log P = log_softmax(log π_0 + c·tanh(centre(Δ_it)/c)/β) | {shape(target)} |")
    print(f"| 3 loss | D_t, the per-token JSD (`loss.divergence`) | {shape(per_token)} |")
    print(f"| 4 step | the loss: Σ_t D_t ÷ N_step = {per_token.sum().item() / n_step:.3g}, N_step = {n_step} "
          f"(`popsd.update`) | {shape(per_token.sum())} |")


if __name__ == "__main__":
    main()
