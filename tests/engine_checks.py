"""The in-process vLLM engine against HF + peft on the toy base, in its own process (vLLM binds this process's
threads and patches torch.set_num_threads): tests/test_engines.py runs it and reads the JSON it prints.

    python tests/engine_checks.py ADAPTER_DIR      # a trained popsd adapter of the toy base
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import loss  # noqa: E402
from plumbing import models  # noqa: E402
import popsd  # noqa: E402
from plumbing.config import make_config  # noqa: E402
from plumbing.adapters import swap_adapter  # noqa: E402
from engines import request_seed  # noqa: E402
from engines.hf import HFSampler, generate  # noqa: E402
from engines.vllm_engine import VLLMEngine  # noqa: E402
from rollout import build_contexts, completion_hidden  # noqa: E402


def parts(r):
    """A Rollout as (completions, mask, truncated, texts, logprobs)."""
    return r.completions, r.mask, r.truncated, r.texts, r.logprobs


def student_logprobs(model, body, head, prompts, completions, mask, pad_id):
    """popsd's student log π_θ(ŷ_t) at τ = 1, read off the student pass as the loop does: [N]."""
    model.train()
    with torch.no_grad():
        h = completion_hidden(body, prompts, completions, mask, pad_id)
    return loss.token_logprob(h.float() @ head.float().T, completions[mask])


def main(adapter: str):
    torch.manual_seed(0)
    cfg = make_config("toy", ["out_dir=unused"])
    base = str(ROOT / cfg.model)
    tok, model = models.load_model(cfg, torch.device("cpu"), base)
    swap_adapter(model, Path(adapter))  # the trained adapter
    body, head = models.model_parts(model)
    eos = models.eos_ids(model, tok)
    rows = [json.loads(line) for line in (ROOT / "data/toyworld/test.jsonl").read_text().splitlines()[:16]]
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    prompts = [build_contexts(tok, r["question"], r["full"], templates=templates, student_thinking=False,
                              teacher_thinking=False).student for r in rows]
    engine = VLLMEngine(cfg, base, tok, eos, torch.device("cpu"), max_model_len=512)
    engine.sync(model, 7)
    out = {"startup_s": round(engine.started, 1)}
    kw = dict(max_new_tokens=cfg.max_new_tokens, top_p=1.0, top_k=0)

    # (a) greedy: the engine's tokens are HF + peft's (a row may part only at a near-tie of HF's log-probs)
    seeds = [request_seed(0, 7, i) for i in range(len(prompts))]
    got = parts(engine.generate(prompts, n=1, temperature=0.0, seeds=seeds, **kw))
    hf = HFSampler(model, tok, engine="dynamic", batch_size=16, device="cpu", eos_ids=eos)
    model.eval()
    want = parts(generate(model, tok, prompts, n=1, temperature=1.0, eos_ids=eos, batch_size=16, device="cpu",
                          do_sample=False, **kw))
    rows_equal = [torch.equal(g[m], w[wm]) for g, m, w, wm in zip(got[0], got[1], want[0], want[1])]
    out["greedy_equal"], out["greedy_rows"] = sum(rows_equal), len(rows_equal)
    lp = student_logprobs(model, body, head, prompts, got[0], got[1], tok.pad_token_id)
    out["greedy_gap_max"] = (lp - got[4][got[1]]).abs().max().item()
    out["stopped_with_eos"] = all(c[m][-1].item() in eos for c, m, t in zip(got[0], got[1], got[2]) if not t)
    out["hf_sampler_reports_logprobs"] = hf.reports_logprobs

    # (b) sampled at τ = 1: the engine's log-probs are the student's; the same seeds give the same samples
    sampled = engine.generate(prompts, n=2, temperature=1.0, seeds=seeds, **kw)
    first = parts(sampled)
    again = parts(engine.generate(prompts, n=2, temperature=1.0, seeds=seeds, **kw))
    other = parts(engine.generate(prompts, n=2, temperature=1.0, seeds=[s + 100 for s in seeds], **kw))
    out["same_seeds_same_samples"] = torch.equal(first[0], again[0])
    out["other_seeds_other_samples"] = not torch.equal(first[0], other[0])
    out["pairs_differ"] = sum(not torch.equal(first[0][2 * i], first[0][2 * i + 1])
                              for i in range(len(prompts)))
    rep = [p for p in prompts for _ in range(2)]
    out["sampled_gap_mean"] = (student_logprobs(model, body, head, rep, first[0], first[1], tok.pad_token_id)
                               - first[4][first[1]]).abs().mean().item()

    # (c) a real training step, then sync: the engine follows the updated adapter (and would show a stale one)
    ctx = [build_contexts(tok, r["question"], r["full"], templates=templates, student_thinking=False,
                          teacher_thinking=False) for r in rows]
    part = sampled
    part.contexts = [c for c in ctx for _ in range(2)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg.method, cfg.max_grad_norm = "opsd", 1.0
    row = popsd.update(model, body, head, part, cfg, tok.pad_token_id, opt, sched)
    out["update_gap"] = row["sampler_logprob_gap"]  # the step's own metric: engine vs student before the step
    engine.sync(model, 8)
    seeds8 = [request_seed(0, 8, i) for i in range(len(prompts))]
    new = parts(engine.generate(prompts, n=2, temperature=1.0, seeds=seeds8, **kw))
    lp_new = student_logprobs(model, body, head, rep, new[0], new[1], tok.pad_token_id)
    out["after_step_gap_mean"] = (lp_new - new[4][new[1]]).abs().mean().item()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in old:
                p.copy_(old[n])
    lp_stale = student_logprobs(model, body, head, rep, new[0], new[1], tok.pad_token_id)
    out["stale_gap_mean"] = (lp_stale - new[4][new[1]]).abs().mean().item()
    out["adapters_in_ram"] = sorted(p.name for p in engine.folder.iterdir())
    engine.close()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
