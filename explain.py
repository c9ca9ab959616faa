"""explain.py: where the shortcut lives. Δ_ref and Δ_it token by token, on a student's own samples.

    python explain.py runs/toy                          # the final adapter: explain.html, .json, terminal
    python explain.py runs/toy --step 20 --samples 8    # a checkpoint of the run, 8 completions
    python explain.py data/toyworld/base --recipe toy   # a base (the initial policy), the recipe's prompts
    python explain.py runs/x/adapter --bench data/toyworld/test.jsonl --out runs/x/explain

For K held-out questions (the first K of --bench, default the run's evaluation file) the student samples one
completion each, and the four passes the training loop runs score it (popsd.frozen_passes: teacher,
reference-only and clean base with LoRA off; the student with LoRA on, all through rollout.completion_hidden).
Per completion token ŷ_t it records, with the readable loss path (loss.py) in float32, chunk by chunk over the
positions (never more than one chunk of [positions, V] per distribution):

    Δ_ref(ŷ_t) = log π_ref(ŷ_t) − log π_θ(ŷ_t)   the reference-induced shortcut (OPSD keeps it, Purified not)
    Δ_it(ŷ_t)  = log π_T(ŷ_t) − log π_ref(ŷ_t)   the question's part, what Purified keeps
    Δ_total    = Δ_ref + Δ_it                     OPSD's signal at the sampled token
    each method's per-token loss there (D(P ‖ π_θ), P Purified's target or π_T), and the top tokens of π_θ,
    π_T, π_ref, π_0 and of both targets, with their probabilities.

Writes explain.html (one self-contained page: no network, no server), explain.json (the numbers it draws)
and prints a coloured terminal view. The page colours each token by Δ_ref, Δ_it or Δ_total (blue: the
context raises its probability above the student's; red: lowers it), shows the top-k panel on hover or click,
and jumps to the tokens with the largest |Δ_ref| and |Δ_it|. docs/explain.md has what the toy worlds show.
"""
import argparse
import dataclasses
import html
import json
import math
import re
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.text import Text

import eval as E
import loss
import popsd
import worlds
from engines import make_sampler, request_seed
from plumbing.adapters import base_model_of, check_adapter_base, run_settings, swap_adapter
from plumbing.checkpoints import MARKER, folder_kind
from plumbing.config import FIELDS, Config, current_names, make_config, set_field, validate, validated
from plumbing.data import PopsdError, model_load_error, read_rows, resolve_local
from plumbing.grading import grade
from plumbing.models import base_fingerprint, eos_ids, load_model, model_parts, pick_device
from rollout import MARKERS, build_contexts, completion_hidden

console = Console()
TOPK = 5
DISTRIBUTIONS = ("student", "teacher", "refonly", "base", "purified", "opsd")  # the top-k panel's columns


# ----------------------------------------------------------------------------- what is explained

@dataclasses.dataclass
class Target:
    cfg: Config  # the run's settings (templates, temperature, β, c, the divergence...)
    base: str  # the base model's path or hub id
    adapter: Path | None  # the LoRA adapter explained (None: the base itself, π_θ = π_0)
    label: str  # what it is, for the page's title
    run: Path | None = None  # the run folder it belongs to: the page goes to <run>/explain/


def run_config(folder: Path) -> Config:
    """A run's Config from its config.json (renamed keys mapped, unknown keys left out), validated."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PopsdError(f"{folder / 'config.json'} cannot be read as a popsd run's config ({e})") from None
    cfg = Config()
    for key, value in current_names(saved).items():
        if key in FIELDS:
            setattr(cfg, key, value)
    return validated(cfg)


def resolve(path: str, step: int | None, recipe: str | None) -> Target:
    """A run folder (its final adapter, or checkpoints/step_N with step), a checkpoint or adapter folder, or a
    base model folder (with --recipe for its prompts and settings); anything else is one clear error."""
    folder = Path(path)
    if not folder.is_dir():
        raise PopsdError(f"{path}: no such folder (give a run folder, a checkpoint or adapter folder, "
                         "or a model)")
    if folder_kind(folder, FIELDS) == "run":
        cfg = run_config(folder)
        if step is not None:
            adapter = folder / "checkpoints" / f"step_{step:06d}"
            if not (adapter / "adapter_model.safetensors").is_file():
                have = sorted(int(p.name[5:]) for p in (folder / "checkpoints").glob("step_??????")
                              if (p / "adapter_model.safetensors").is_file())
                raise PopsdError(f"{folder}: step {step} has no checkpoint (checkpoints at steps: "
                                 f"{', '.join(map(str, have)) or 'none'}; without --step: the final adapter)")
        elif (folder / "adapter/adapter_model.safetensors").is_file():
            adapter = folder / "adapter"
        else:
            done = sorted((folder / "checkpoints").glob("step_??????/adapter_model.safetensors"))
            if not done:
                raise PopsdError(f"{folder}: the run holds no adapter yet (no adapter/ and no checkpoint)")
            adapter = done[-1].parent
        base = str(folder / "tiny_model") if cfg.model == "tiny" else base_model_of(adapter) or cfg.model
        return Target(cfg, base, adapter, f"{folder.name}, {adapter.name}", folder)
    if step is not None:
        raise PopsdError("--step picks a checkpoint of a run: give the run folder, not an adapter or a model")
    if (folder / "adapter_config.json").is_file():
        runs = [d for d in folder.resolve().parents[:3] if folder_kind(d, FIELDS) == "run"]
        cfg = make_config(recipe) if recipe else run_config(runs[0]) if runs else make_config("")
        base = base_model_of(folder)
        if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():  # before any other work
            raise model_load_error(base, FileNotFoundError(base))
        return Target(cfg, base, folder, str(folder))
    if (folder / "config.json").is_file():
        cfg = make_config(recipe) if recipe else make_config("")
        prompts = run_settings(None, str(folder))  # a base that ships popsd_prompts.json (the toy bases)
        for key, value in ([] if recipe else prompts.items()):
            setattr(cfg, key, value)
        return Target(cfg, str(folder), None, f"{folder.name} (the base: π_θ = π_0)")
    raise PopsdError(f"{folder} is not a popsd run, a checkpoint or adapter (adapter_config.json), nor a "
                     "model folder (config.json)")

def questions(cfg: Config, bench: str | None, k: int) -> list[tuple[str, str, str | None]]:
    """The first k (question, reference, gold answer or None) of --bench, else of the run's evaluation file
    (held out from training), else of its training data."""
    answer_field = cfg.eval_fields.split(",")[1].strip()
    sources = [bench] if bench else [s for s in (cfg.eval_bench, cfg.data) if resolve_local(s) is not None]
    if not sources:
        raise PopsdError("no local question file: pass --bench FILE (jsonl with the run's question and "
                         "reference fields)")
    fields = (cfg.question_field, cfg.reference_field)
    try:
        return read_rows(sources[0], "train", (*fields, answer_field))[0][:k]
    except PopsdError:  # no answers (correctness is not shown), or the question or reference is missing
        advice = (f"--bench needs the run's question field {cfg.question_field!r} and reference field "
                  f"{cfg.reference_field!r} in every row")
        return [(q, r, None) for q, r in read_rows(sources[0], "train", fields, advice=advice)[0][:k]]


# ----------------------------------------------------------------------------- the numbers

def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text as it adds to the decoded completion (prefix differences: multi-byte characters split
    over tokens land on the token that completes them)."""
    out, before = [], ""
    for i in range(len(ids)):
        now = tokenizer.decode(ids[:i + 1])
        out.append(now[len(before):] if now.startswith(before) else tokenizer.decode(ids[i:i + 1]))
        before = now
    return out


def kinds_of(texts: list[str]) -> list[str]:
    """Per token: marker (a character of an epistemic marker word or the space before it), digit or other."""
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    full = "".join(texts)
    marked = set()
    for m in MARKERS.finditer(full):
        lo = m.start() - 1 if m.start() > 0 and full[m.start() - 1] == " " else m.start()
        marked.update(range(lo, m.end()))
    out = []
    for t, s in zip(texts, starts):
        if any(c in marked for c in range(s, s + len(t))):
            out.append("marker")
        elif t.strip() and t.strip().isdigit():
            out.append("digit")
        else:
            out.append("other")
    return out


@torch.no_grad()
def score(model, rollout, cfg: Config, pad_id: int, topk: int, chunk_mb: int) -> list[dict]:
    """Per completion, per token: Δ_ref, Δ_it, Δ_total at ŷ_t, each method's per-token loss, the top-k of the
    six distributions. The hidden states come from the loop's own passes; logits are made chunk by chunk."""
    body, head_weight = model_parts(model)
    hidden = {k: [] for k in ("student", "teacher", "refonly", "base")}
    for i in range(0, len(rollout), cfg.micro_batch_size):
        part = rollout.select(slice(i, i + cfg.micro_batch_size))
        h_teacher, h_refonly, h_base = popsd.frozen_passes(model, body, part, dataclasses.replace(
            cfg, method="purified", diagnostics=True), pad_id)  # every pass, whatever the run trained
        model.eval()  # the student without dropout: the numbers do not depend on a draw
        h_student = completion_hidden(body, [c.student for c in part.contexts], part.completions, part.mask,
                                      pad_id)
        for k, h in zip(hidden, (h_student, h_teacher, h_refonly, h_base)):
            hidden[k].append(h)
    hidden = {k: torch.cat(v) for k, v in hidden.items()}  # [N, H] each, row-major over (b, t)
    tokens = rollout.completions[rollout.mask]  # [N]
    w = head_weight.detach().float()
    v = w.shape[0]
    tau = cfg.loss_temperature or cfg.temperature
    rows = max(1, (chunk_mb << 20) // (12 * v * 4))  # about twelve [C, V] float32 tensors at a time
    per = {k: [] for k in ("delta_ref", "delta_it", "delta_total", "loss_purified", "loss_opsd")}
    top = {k: [] for k in DISTRIBUTIONS}
    # each method's per-token loss as the run computes it: on its support (full, top-k, the sampled token)
    options = dict(kind=cfg.divergence, jsd_mix=cfg.jsd_mix, temperature=tau, term_clamp=cfg.term_clamp,
                   support=cfg.support, topk=cfg.topk, topk_tail=cfg.topk_tail)
    for i in range(0, len(tokens), rows):
        sl = slice(i, i + rows)
        y = tokens[sl].to(w.device)[:, None]  # [C, 1]
        logits = {k: hidden[k][sl].float() @ w.T for k in hidden}  # [C, V] each
        logp = {k: loss._logp(x, tau) for k, x in logits.items()}  # [C, V] each, at the loss temperature
        at = {k: x.gather(-1, y)[:, 0] for k, x in logp.items()}  # [C]
        per["delta_ref"].append(at["refonly"] - at["student"])
        per["delta_it"].append(at["teacher"] - at["refonly"])
        per["delta_total"].append(at["teacher"] - at["student"])
        purified = loss.purified_target(logits["teacher"], logits["refonly"], logits["base"], beta=cfg.beta,
                                     pmi_clip=cfg.pmi_clip, temperature=tau)  # [C, V] log P
        opsd = loss.opsd_target(logits["teacher"], temperature=tau)  # [C, V] log π_T
        per["loss_purified"].append(loss.per_token_loss(logits["student"], purified, tokens=y[:, 0],
                                                        **options))  # [C]
        per["loss_opsd"].append(loss.per_token_loss(logits["student"], opsd, tokens=y[:, 0],
                                                    **options))  # [C]
        for k, x in (*logp.items(), ("purified", purified), ("opsd", opsd)):
            p, ids = x.exp().topk(min(topk, v), dim=-1)  # [C, k]
            top[k].append((ids.cpu(), p.cpu()))
    per = {k: torch.cat(x).cpu().tolist() for k, x in per.items()}
    top = {k: (torch.cat([a for a, _ in x]), torch.cat([b for _, b in x])) for k, x in top.items()}
    out, start = [], 0
    for b in range(len(rollout)):
        n = int(rollout.mask[b].sum())
        sl = slice(start, start + n)
        out.append({"ids": rollout.completions[b][rollout.mask[b]].tolist(),
                    **{k: x[sl] for k, x in per.items()},
                    "top": {k: [[[int(t), round(float(q), 5)] for t, q in zip(ids, ps)]
                                for ids, ps in zip(top[k][0][sl], top[k][1][sl])] for k in DISTRIBUTIONS}})
        start += n
    return out


def roles_of(world, question: str, texts: list[str]) -> list[str | None]:
    """Per token, the role its world names there (worlds/<world>.py: roles; the first one where several fall
    on one token), None elsewhere or without a world."""
    if world is None or not hasattr(world, "roles"):
        return [None] * len(texts)
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    at = {}
    for role in world.roles(question, "".join(texts)):
        at.setdefault(role.at, role.role)
    return [next((at[c] for c in range(a, a + len(t)) if c in at), None) for a, t in zip(starts, texts)]


def by_role(records: list[dict]) -> dict:
    """Means over the tokens of each of the world's roles: Δ_ref, Δ_it, Δ_total and how many tokens."""
    out = {}
    for r in records:
        for t, role in enumerate(r["roles"]):
            if role is not None:
                row = out.setdefault(role, {"tokens": 0, "delta_ref": 0.0, "delta_it": 0.0,
                                            "delta_total": 0.0})
                row["tokens"] += 1
                for key in ("delta_ref", "delta_it", "delta_total"):
                    row[key] += r[key][t]
    return {role: {k: (v / row["tokens"] if k != "tokens" else v) for k, v in row.items()}
            for role, row in out.items()}


def by_kind(records: list[dict]) -> dict:
    """Means over the tokens of each kind (marker, digit, other, all): Δ_ref, Δ_it, Δ_total, their absolute
    values, both losses, and how many tokens."""
    out = {}
    for kind in ("marker", "digit", "other", "all"):
        picked = [(r, t) for r in records for t, k in enumerate(r["kinds"]) if kind == "all" or k == kind]
        row = {"tokens": len(picked)}
        for key in ("delta_ref", "delta_it", "delta_total", "loss_purified", "loss_opsd"):
            vals = [r[key][t] for r, t in picked]
            row[key] = sum(vals) / len(vals) if vals else None
            if key.startswith("delta"):
                row["abs_" + key] = sum(abs(x) for x in vals) / len(vals) if vals else None
        out[kind] = row
    return out


def explain(target: Target, bench: str | None, k: int, seed: int, topk: int, device_name: str,
            other_base: bool = False) -> dict:
    """Sample k completions from the student, score them in the four contexts: the page's numbers."""
    cfg = target.cfg
    device = pick_device(device_name if device_name != "run" else cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rows = questions(cfg, bench, k)
    local = resolve_local(target.base)
    path = str(local.resolve()) if local is not None else target.base
    base_sha = base_fingerprint(path)
    # an adapter is explained on the base it was trained from, unless --other-base
    base_check = check_adapter_base(str(target.adapter) if target.adapter else None, path, base_sha,
                                    other_base, lambda m: console.print(f"[yellow]{m}[/]", soft_wrap=True))
    if target.adapter is not None:  # the adapter's own rank and targets, on the base it names
        adapter_config = json.loads((target.adapter / "adapter_config.json").read_text())
        cfg = dataclasses.replace(cfg, lora_r=int(adapter_config["r"]),
                                  lora_alpha=int(adapter_config["lora_alpha"]), lora_dropout=0.0)
    tokenizer, model = load_model(dataclasses.replace(cfg, gradient_checkpointing=False), device, path)
    if target.adapter is not None:
        swap_adapter(model, target.adapter)
    cfg = dataclasses.replace(cfg, teacher=cfg.teacher if cfg.teacher != "ema" else "frozen",
                              rollout_server="", rollout_engine="dynamic" if cfg.rollout_engine == "vllm" else
                              cfg.rollout_engine, n_samples=1)
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    contexts = [build_contexts(tokenizer, q, r, templates=templates, student_thinking=cfg.student_thinking,
                               teacher_thinking=cfg.teacher_thinking) for q, r, _ in rows]
    sampler = make_sampler(cfg, model, tokenizer, path, eos_ids(model, tokenizer), device,
                           Path("runs/explain"), 0, 1, warn=lambda m: console.print(f"[yellow]{m}[/]"))
    try:
        sampled = sampler.generate([c.student for c in contexts], n=1, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                   seeds=[request_seed(seed, "explain", i) for i in range(len(contexts))])
    finally:
        sampler.close()
    sampled.contexts = contexts
    numbers = score(model, sampled, cfg, tokenizer.pad_token_id, topk, cfg.loss_chunk_mb)
    checker = E.checker_of(cfg.eval_grader)
    world = worlds.get(cfg.eval_grader) if cfg.eval_grader in worlds.NAMES else None
    records = []
    for i, ((q, r, gold), nums) in enumerate(zip(rows, numbers)):
        texts = token_texts(tokenizer, nums["ids"])
        graded = [{"completion": sampled.texts[i]}]
        if gold is not None:
            grade(graded, q, gold, checker, cfg.student_thinking)
        records.append({"index": i, "question": q, "reference": r, "gold": gold,
                        "completion": sampled.texts[i], "correct": graded[0].get("correct"),
                        "markers": len(MARKERS.findall(sampled.texts[i])),
                        "tokens": texts, "kinds": kinds_of(texts), "roles": roles_of(world, q, texts), **nums,
                        "sum_delta_ref": sum(nums["delta_ref"]), "sum_delta_it": sum(nums["delta_it"]),
                        "truncated": bool(sampled.truncated[i])})
    vocab = {int(t): tokenizer.decode([int(t)])
             for r in records for dist in r["top"].values() for row in dist for t, _ in row}
    settings = {"explained": target.label, "adapter": str(target.adapter) if target.adapter else None,
                "base": target.base, "base_sha256": base_sha,
                "trained_with": cfg.method if target.adapter is not None else None,
                "reference_field": cfg.reference_field, "samples": len(records), "seed": seed, "topk": topk,
                "temperature": cfg.temperature, "loss_temperature": cfg.loss_temperature or cfg.temperature,
                "beta": cfg.beta, "pmi_clip": cfg.pmi_clip, "divergence": cfg.divergence,
                "jsd_mix": cfg.jsd_mix, "term_clamp": cfg.term_clamp, "teacher": cfg.teacher,
                "support": cfg.support, "support_topk": cfg.topk, "topk_tail": cfg.topk_tail,
                "base_check": base_check}
    return {"settings": settings, "vocab": vocab, "by_kind": by_kind(records), "by_role": by_role(records),
            "roles": list(world.ROLES) if world is not None and hasattr(world, "ROLES") else [],
            "completions": records}


# ----------------------------------------------------------------------------- the views

def colour(x: float, scale: float = 3.0) -> tuple[int, int, int]:
    """Blue for positive, red for negative, white at 0; saturated at |x| = scale nats."""
    a = max(-1.0, min(1.0, x / scale)) if math.isfinite(x) else 0.0
    if a >= 0:
        return round(255 - 200 * a), round(255 - 120 * a), 255
    return 255, round(255 + 200 * a), round(255 + 200 * a)


def print_terminal(result: dict, out=console):
    """Each completion twice, its tokens' background coloured by Δ_ref, then by Δ_it, under its header."""
    s = result["settings"]
    out.print(f"[bold]{s['explained']}[/]: {s['samples']} completions; blue: the context raises the token's "
              "probability above the student's, red: lowers it (saturated at ±3 nats)", soft_wrap=True)
    for r in result["completions"]:
        verdict = {True: "[green]right[/]", False: "[red]wrong[/]", None: ""}[r["correct"]]
        out.print(f"\n[bold]#{r['index']}[/] {r['question']!r} {verdict}  markers {r['markers']}  "
                  f"ΣΔ_ref {r['sum_delta_ref']:+.1f}  ΣΔ_it {r['sum_delta_it']:+.1f}", soft_wrap=True)
        for key, name in (("delta_ref", "Δ_ref"), ("delta_it", "Δ_it ")):
            line = Text(f"  {name} ")
            for tok, x in zip(r["tokens"], r[key]):
                red, green, blue = colour(x)
                line.append(tok.replace("\n", "⏎"), style=f"black on rgb({red},{green},{blue})")
            out.print(line, soft_wrap=True)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>popsd explain: __TITLE__</title>
<style>
body{font:14px/1.5 system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto;padding:12px 20px}
#panel{width:430px;overflow:auto;border-left:1px solid #ccc;padding:10px;background:#fafafa;font-size:12px}
.card{border:1px solid #ddd;border-radius:6px;margin:10px 0;padding:8px}
.head{font-size:12px;color:#333}.q{font-family:monospace}
.toks{font-family:monospace;white-space:pre-wrap;margin-top:6px;line-height:1.9}
.tok{cursor:pointer;border-radius:2px;padding:1px 0}.tok.sel{outline:2px solid #000}
.ok{color:#080}.bad{color:#b00}table{border-collapse:collapse;margin:4px 0}
td,th{padding:1px 5px;font-family:monospace}th{text-align:left;background:#eee}
#tables{display:grid;grid-template-columns:1fr 1fr;gap:0 8px}
.legend span{display:inline-block;width:22px;height:12px}button{font-size:11px}
.tok.marked{border-bottom:3px solid #222}
</style></head><body>
<div id="main"><h2>__TITLE__</h2>
<p>Each sampled token of the student's own completions, coloured by
<label><input type="radio" name="view" value="delta_ref" checked> Δ<sub>ref</sub> = log π<sub>ref</sub> − log
π<sub>θ</sub> (the shortcut)</label>
<label><input type="radio" name="view" value="delta_it"> Δ<sub>it</sub> = log π<sub>T</sub> −
log π<sub>ref</sub> (the question's part)</label>
<label><input type="radio" name="view" value="delta_total"> Δ<sub>total</sub></label>.
<span class="legend">−3 <span style="background:rgb(255,55,55)"></span><span style="background:#fff;
border:1px solid #ccc"></span><span style="background:rgb(55,135,255)"></span> +3 nats</span>.
Hover or click a token for the top tokens of every distribution there. <span id="rolepick">Underline the
world's role <select id="role"><option value="">(none)</option></select>.</span>
<span id="settings"></span></p>
<div id="cards"></div></div>
<div id="panel"><b>Click or hover a token.</b></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById("data").textContent);
const NAMES = {student: "π_θ (student)", teacher: "π_T (teacher)", refonly: "π_ref (reference only)",
  base: "π_0 (clean base)", purified: "P (Purified's target)", opsd: "π_T (OPSD's target)"};
function colour(x) { let a = Math.max(-1, Math.min(1, x / 3)); if (!isFinite(a)) a = 0;
  return a >= 0 ? `rgb(${Math.round(255 - 200 * a)},${Math.round(255 - 120 * a)},255)`
                : `rgb(255,${Math.round(255 + 200 * a)},${Math.round(255 + 200 * a)})`; }
function show(text) { return text.replace(/\\n/g, "⏎\\n"); }
function fmt(x) { return (x >= 0 ? "+" : "") + x.toFixed(3); }
let view = "delta_ref";
function paint() { document.querySelectorAll(".tok").forEach(s => {
  const r = D.completions[s.dataset.c]; s.style.background = colour(r[view][s.dataset.t]); }); }
function panel(c, t) {
  const r = D.completions[c];
  let h = `<b>#${c}, token ${t}: <span class="q">${escape(show(r.tokens[t]))}</span></b> (${r.kinds[t]}` +
    (r.roles[t] ? `; ${escape(r.roles[t])}` : "") + ")<br>";
  h += `Δ_ref ${fmt(r.delta_ref[t])} · Δ_it ${fmt(r.delta_it[t])} · Δ_total ${fmt(r.delta_total[t])}<br>`;
  h += `per-token loss: Purified ${r.loss_purified[t].toExponential(2)}`;
  h += ` · OPSD ${r.loss_opsd[t].toExponential(2)}`;
  h += '<div id="tables">';
  for (const k of Object.keys(NAMES)) {
    h += `<table><tr><th colspan="2">${NAMES[k]}</th></tr>`;
    for (const [id, p] of r.top[k][t])
      h += `<tr><td>${escape(show(D.vocab[id]))}</td><td>${p.toFixed(4)}</td></tr>`;
    h += "</table>"; }
  document.getElementById("panel").innerHTML = h + "</div>"; }
function escape(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }
function jump(c, key) {
  const r = D.completions[c], order = r[key].map((x, i) => [Math.abs(x), i]).sort((a, b) => b[0] - a[0]);
  const card = document.getElementById("card" + c);
  const k = (+(card.dataset[key] || -1) + 1) % Math.min(5, order.length);
  card.dataset[key] = k; select(c, order[k][1]); }
function select(c, t) { document.querySelectorAll(".tok.sel").forEach(s => s.classList.remove("sel"));
  const s = document.getElementById(`t${c}_${t}`);
  s.classList.add("sel"); s.scrollIntoView({block: "center"});
  panel(c, t); }
const s = D.settings;
document.getElementById("settings").textContent = `${s.trained_with ? "Trained with " + s.trained_with
  : "Not trained (the base)"}; reference: ${s.reference_field};
  τ = ${s.loss_temperature}, β = ${s.beta}, c = ${s.pmi_clip}, ${s.divergence}; seed ${s.seed}.`;
const cards = document.getElementById("cards");
D.completions.forEach((r, c) => {
  const card = document.createElement("div"); card.className = "card"; card.id = "card" + c;
  const verdict = r.correct === null ? ""
    : r.correct ? '<span class="ok">right</span>' : '<span class="bad">wrong</span>';
  card.innerHTML = `<div class="head">#${c} · question <span class="q">${escape(r.question)}</span> ·
    reference
    <span class="q">${escape(r.reference)}</span> · ${verdict} · markers ${r.markers} · ΣΔ_ref
    ${fmt(r.sum_delta_ref)} · ΣΔ_it ${fmt(r.sum_delta_it)}
    <button onclick="jump(${c}, 'delta_ref')">largest |Δ_ref|</button>
    <button onclick="jump(${c}, 'delta_it')">largest |Δ_it|</button></div>`;
  const toks = document.createElement("div"); toks.className = "toks";
  r.tokens.forEach((text, t) => { const e = document.createElement("span"); e.className = "tok";
    e.id = `t${c}_${t}`; e.dataset.c = c; e.dataset.t = t; e.textContent = show(text);
    e.onmouseenter = () => panel(c, t); e.onclick = () => select(c, t); toks.appendChild(e); });
  card.appendChild(toks); cards.appendChild(card); });
document.querySelectorAll('input[name="view"]').forEach(i => i.onchange = () => { view = i.value; paint(); });
const pick = document.getElementById("role");
if (!D.roles.length) document.getElementById("rolepick").style.display = "none";
D.roles.forEach(name => { const o = document.createElement("option"); o.value = o.textContent = name;
  pick.appendChild(o); });
pick.onchange = () => document.querySelectorAll(".tok").forEach(s => s.classList.toggle("marked",
  pick.value !== "" && D.completions[s.dataset.c].roles[s.dataset.t] === pick.value));
paint();
</script></body></html>
"""


def write_page(result: dict, path: Path):
    data = json.dumps(result).replace("</", "<\\/")  # no "</script>" can end the data early
    title = html.escape(result["settings"]["explained"])
    path.write_text(PAGE.replace("__TITLE__", title).replace("__DATA__", data))


# ----------------------------------------------------------------------------- CLI

def check_out(out: Path):
    """explain.py writes explain.html and explain.json into a new or empty folder or one of its own, never
    into a file, a run, a model, an adapter or a checkpoint (whose files it would sit among)."""
    if out.exists() and not out.is_dir():
        raise PopsdError(f"--out {out} is a file: explain.py writes a folder (explain.html, explain.json)")
    if not out.is_dir() or (out / "explain.json").is_file() or not any(out.iterdir()):
        return
    for name, what in (("metrics.jsonl", "a training run"), (MARKER, "a training run"),
                       ("adapter_config.json", "an adapter or checkpoint"), ("config.json", "a model")):
        if (out / name).exists():
            raise PopsdError(f"--out {out} is {what} ({name}): give a new or empty folder, or one "
                             "explain.py wrote")
    raise PopsdError(f"--out {out} is not empty and holds no explain.json: explain.py writes only into a new "
                     "or empty folder or one it wrote")


def main(argv: list[str]):
    p = argparse.ArgumentParser(prog="explain.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("target", help="a run folder, a checkpoint or adapter folder, or a base model folder")
    p.add_argument("--step", type=int, help="a run's checkpoint at this step (default: its final adapter)")
    p.add_argument("--samples", type=int, default=4, help="completions to explain (the first K questions)")
    p.add_argument("--bench", help="questions with references (jsonl with the run's question and reference\n"
                                   "fields; default: the run's evaluation file, else its training data)")
    p.add_argument("--recipe", help="settings and prompts for a base, or for an adapter without its run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--topk", type=int, default=TOPK, help="tokens per distribution in the panel")
    p.add_argument("--device", default="run", help="cpu, cuda, auto (default: the run's device setting)")
    p.add_argument("--out", help="folder for explain.html and explain.json (default:\n"
                                 "<run>/explain/<adapter>, or runs/explain/<name>)")
    p.add_argument("--quiet", action="store_true", help="no terminal view")
    p.add_argument("--other-base", action="store_true",
                   help="explain an adapter on a base other than the one it was trained from (its\n"
                        "popsd_base.json); refused without this flag, and explain.json says it was given")
    p.add_argument("overrides", nargs="*", help="key=value over the run's (or recipe's) settings, e.g.\n"
                                                "reference_field=sketch")
    args = p.parse_intermixed_args(argv)  # key=value before or after the options
    import transformers
    transformers.utils.logging.disable_progress_bar()  # no loading bar between the lines
    if args.samples < 1 or args.topk < 1:
        p.error("--samples and --topk must be at least 1")
    try:
        target = resolve(args.target, args.step, args.recipe)
        for item in args.overrides:
            key, eq, value = item.partition("=")
            if not eq:
                raise PopsdError(f"expected key=value, got {item!r}")
            set_field(target.cfg, key.strip(), value, text=True)
        validate(target.cfg)
        name = re.sub(r"[^\w.+-]+", "-", target.label).strip("-")
        default = target.run / "explain" / target.adapter.name if target.run else Path("runs/explain") / name
        out = Path(args.out) if args.out else default
        check_out(out)
        result = explain(target, args.bench, args.samples, args.seed, args.topk, args.device, args.other_base)
    except PopsdError as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps(result) + "\n")
    write_page(result, out / "explain.html")
    if not args.quiet:
        print_terminal(result)
    console.print(f"\n{out / 'explain.html'} (open it in a browser) and {out / 'explain.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
