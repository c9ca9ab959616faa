"""measure.py: what a toy comparison's students do beyond their runs' own evaluations. compare.py runs both
measurements after the runs; neither changes a run.

The temperature sweep. Sampling the base at a lower temperature is the cheapest way to gain accuracy, so it is
the baseline every method must beat (docs/toyworld.md registers the rule). Per seed, the base (the step-0
student: a fresh LoRA adds nothing, so its adapter is switched off) and every final student are evaluated at
each temperature with the run's own sampler, batch and evaluation seeds (eval.evaluate, as the run's own
in-training evaluation): accuracy and markers on the rows the runs evaluate (the first eval_limit of the
held-out file), and for the base also on the next PICK_ROWS rows, which no comparison scores and where its
best temperature is picked (ties: the lower temperature).

The roles. Each world names the roles of its trace tokens (worlds/<world>.py: ROLES, roles(question,
completion)) and what a right step writes at each, given the trace so far. On the base's own samples
(teacher-forced), the mean probability of the right outcome at each role under the base π_0, each method's
step-0 target (OPSD's π_T, Purified's P: the loop's own popsd.frozen_passes and loss.py, per reference format)
and each trained student; and, on each model's own samples at T = 1, the rate at which it writes a wrong
outcome there.
"""
import dataclasses
import math
from pathlib import Path

import torch

import eval as E
import loss
import popsd
from engines import make_sampler
from plumbing.adapters import swap_adapter
from plumbing.config import Config
from plumbing.data import PopsdError, read_rows, resolve_local
from plumbing.models import eos_ids, load_model, model_parts, pick_device
from rollout import Rollout, build_contexts, completion_hidden

TEMPERATURES = (1.0, 0.7, 0.5)
PICK_ROWS = 100  # held-out rows after the evaluated ones: where the base's best temperature is picked
KEYS = ("accuracy", "markers_per_1k", "caught_frac", "first_try_errors", "false_reflections",
        "completion_len")


def metrics_of(records: list[dict], world=None) -> dict:
    """The world metrics of graded evaluation records, named as compare's points name them; with a world,
    also its role errors: {role: [wrong outcomes written, tokens]} (error_counts)."""
    m = E.records_metrics(records)
    renamed = {"accuracy": next(v for k, v in m.items() if k.startswith("avg@")),
               "completion_len": m["len_mean"]}
    out = {k: renamed.get(k, m.get(k)) for k in KEYS} | {"questions": len(records)}
    if world is not None:
        samples = [(r["question"], x["completion"]) for r in records for x in r["samples"]]
        out["role_errors"] = {r: list(c) for r, c in error_counts(world, samples).items()}
    return out


class RunModel:
    """One comparison's model as its runs had it (the world's recipe with the comparison's overrides): the
    tokenizer, the base + LoRA, the sampler the runs sampled and evaluated with, and the held-out rows."""

    def __init__(self, cfg: Config, world=None):
        self.cfg, self.world = cfg, world  # the world: role errors in every measurement
        local = resolve_local(cfg.model)
        path = str(local.resolve()) if local is not None else cfg.model
        self.device = pick_device(cfg.device)
        self.tok, self.model = load_model(cfg, self.device, path)
        self.eos = eos_ids(self.model, self.tok)
        self.sampler = make_sampler(cfg, self.model, self.tok, path, self.eos, self.device,
                                    Path("runs/unused"), 0, 1, warn=lambda m: None)
        train, _ = read_rows(cfg.data, cfg.data_split, (cfg.question_field, cfg.reference_field))
        wide = dataclasses.replace(cfg, eval_limit=cfg.eval_limit + PICK_ROWS)
        benches = E.held_out_benches(wide, train)
        if len(benches) != 1:
            raise PopsdError(f"the sweep evaluates one held-out file; eval_bench names {len(benches)}")
        (self.bench, self.rows), = benches.items()
        if len(self.rows) <= cfg.eval_limit:
            raise PopsdError(f"{cfg.eval_bench}: {len(self.rows)} held-out rows, none after the "
                             f"{cfg.eval_limit} the runs evaluate (where the base's best temperature is "
                             "picked)")

    def records(self, rows: list, seed: int, temperature: float) -> list[dict]:
        """Graded records of rows at a temperature, seeded as a run of this seed seeds its evaluations (each
        question's seed from the seed, the benchmark's name and the question's index)."""
        cfg = self.cfg
        _, records = E.evaluate(
            None, self.tok, {self.bench: rows}, n=cfg.eval_n, max_new_tokens=cfg.eval_max_new_tokens,
            temperature=temperature, top_p=cfg.eval_top_p, top_k=0, eos_ids=self.eos, batch_size=0,
            device=self.device, template=cfg.student_template, thinking=cfg.student_thinking, seed=seed,
            grader=cfg.eval_grader, sampler=self.sampler)
        return records[self.bench]

    def sweep_base(self, seed: int, temperatures) -> dict:
        """{T: {"report": metrics of the evaluated rows, "pick": metrics of the next rows}} for the base."""
        out, n = {}, self.cfg.eval_limit
        with self.model.disable_adapter():  # the step-0 student's fresh LoRA adds exactly nothing
            for t in temperatures:
                recs = self.records(self.rows, seed, t)
                out[f"{t:g}"] = {"report": metrics_of(recs[:n], self.world), "pick": metrics_of(recs[n:])}
        return out

    def sweep_student(self, adapter: Path, seed: int, temperatures) -> dict:
        """{T: metrics of the evaluated rows} for a run's final adapter."""
        swap_adapter(self.model, adapter)
        rows = self.rows[:self.cfg.eval_limit]
        return {f"{t:g}": metrics_of(self.records(rows, seed, t), self.world) for t in temperatures}


def best_temperature(base: dict) -> str:
    """The base's best temperature (a key of sweep_base's result): the highest accuracy on the pick rows,
    ties to the lower temperature."""
    return max(base, key=lambda t: (base[t]["pick"]["accuracy"], -float(t)))


# ----------------------------------------------------------------------------- the roles

def char_ids(tok, text: str) -> list[int]:
    """The token ids of a completion's text, one per character (the toy tokenizers'; checked)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != len(text) or tok.decode(ids) != text:
        raise PopsdError("the role tables need a character-level tokenizer (one token per character)")
    return ids


def teacher_forced(run: RunModel, world, samples: list[tuple[str, str]], fmt: str | None = None,
                   adapter: Path | None = None, micro: int = 64) -> dict[str, list[torch.Tensor]]:
    """Per sample (question, completion text), the log-probs [T, V] at every completion position: with
    fmt, the base π_0 and the step-0 targets, OPSD's π_T and Purified's P (reference format fmt), from the
    loop's own frozen passes and loss.py; with adapter, the trained student π_θ (LoRA on, no dropout)."""
    cfg, tok, model = run.cfg, run.tok, run.model
    body, head_weight = model_parts(model)
    w = head_weight.detach().float()  # [V, H]
    tau = cfg.loss_temperature or cfg.temperature
    scoring = dataclasses.replace(cfg, method="purified", diagnostics=True, teacher="frozen")
    templates = (cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    if adapter is not None:
        swap_adapter(model, adapter)
    out = {}
    for i in range(0, len(samples), micro):
        part = samples[i:i + micro]
        ids = [char_ids(tok, text) + [run.eos[0]] for _, text in part]  # the EOS closes each, as sampled
        completions = torch.full((len(ids), max(map(len, ids))), tok.pad_token_id)  # [b, T]
        mask = torch.zeros(completions.shape, dtype=torch.bool)  # [b, T]
        for b, x in enumerate(ids):
            completions[b, :len(x)], mask[b, :len(x)] = torch.tensor(x), True
        rollout = Rollout(completions, mask, torch.zeros(len(ids), dtype=torch.bool), [t for _, t in part])
        rollout.contexts = [build_contexts(tok, q, world.references(q)[fmt or "full"], templates=templates,
                                           student_thinking=cfg.student_thinking,
                                           teacher_thinking=cfg.teacher_thinking) for q, _ in part]
        with torch.no_grad():
            if adapter is not None:
                model.eval()  # the student without dropout
                h = completion_hidden(body, [c.student for c in rollout.contexts], completions, mask,
                                      tok.pad_token_id)  # [N, H]
                logps = {"student": torch.log_softmax(h.float() @ w.T / tau, -1)}  # [N, V]
            else:
                frozen = popsd.frozen_passes(model, body, rollout, scoring, tok.pad_token_id)
                teacher, refonly, base = (h.float() @ w.T for h in frozen)  # [N, V] each
                logps = {"base": torch.log_softmax(base / tau, -1),
                         "opsd target": loss.opsd_target(teacher, temperature=tau),
                         "purified target": loss.purified_target(teacher, refonly, base, beta=cfg.beta,
                                                                 pmi_clip=cfg.pmi_clip, temperature=tau)}
        for k, logp in logps.items():
            out.setdefault(k, []).extend(logp.cpu().split(mask.sum(1).tolist()))  # per sample [T_b, V]
    return out


def right_probabilities(world, tok, samples, logps: list[torch.Tensor]) -> dict[str, list[float]]:
    """{role: P(right outcome) at each of its tokens} over samples, from per-sample log-probs [T, V]."""
    out = {r: [] for r in world.ROLES}
    for (q, text), logp in zip(samples, logps):
        for role in world.roles(q, text):
            p = logp[role.at, char_ids(tok, role.right)[0]].exp().item()
            out[role.role].append(1 - p if role.avoid else p)
    return out


def error_counts(world, samples) -> dict[str, tuple[int, int]]:
    """{role: (wrong outcomes written, tokens)} over samples: what each wrote at its roles' positions."""
    out = {r: [0, 0] for r in world.ROLES}
    for q, text in samples:
        for role in world.roles(q, text):
            out[role.role][0] += not role.met(text[role.at])
            out[role.role][1] += 1
    return {r: tuple(v) for r, v in out.items()}


def mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


def role_tables(world, run: RunModel, base_samples: list, students: dict, own_samples: dict,
                base_at: dict | None = None) -> dict:
    """The per-role numbers. base_samples: the base's own (question, completion) samples at T = 1, where every
    distribution is teacher-forced; students: {arm: [adapter folders, one per seed]}, an arm being
    "<method>, <reference>"; own_samples: {"base" or arm: [(question, completion)]} at T = 1, each model's own
    (pooled over seeds), for the error rates; base_at: {T: {role: (wrong, tokens)}}, the base's own samples
    at each temperature of the sweep (seeds pooled), for its error rates there."""
    tok = run.tok
    formats = sorted({arm.split(", ")[1] for arm in students})
    columns = {"base": None}
    for fmt in formats:
        forced = teacher_forced(run, world, base_samples, fmt=fmt)
        columns["base"] = columns["base"] or right_probabilities(world, tok, base_samples, forced["base"])
        columns[f"π_T, {fmt}"] = right_probabilities(world, tok, base_samples, forced["opsd target"])
        columns[f"P, {fmt}"] = right_probabilities(world, tok, base_samples, forced["purified target"])
    for arm, adapters in students.items():  # each seed's student, pooled
        pooled = {r: [] for r in world.ROLES}
        for adapter in adapters:
            forced = teacher_forced(run, world, base_samples, adapter=adapter)["student"]
            for r, ps in right_probabilities(world, tok, base_samples, forced).items():
                pooled[r] += ps
        columns[arm] = pooled
    errors = {who: error_counts(world, samples) for who, samples in own_samples.items()}
    errors |= {f"base, T = {t}": counts for t, counts in (base_at or {}).items() if t != "1"}
    return {"samples": len(base_samples), "roles": list(world.ROLES),
            "p_right": {who: {r: mean(ps) for r, ps in col.items()} for who, col in columns.items()},
            "tokens": {r: len(columns["base"][r]) for r in world.ROLES},
            "error_rate": {who: {r: (w / n if n else None) for r, (w, n) in e.items()}
                           for who, e in errors.items()},
            "error_tokens": {who: {r: n for r, (_, n) in e.items()} for who, e in errors.items()}}


def roles_markdown(tables: dict) -> str:
    """The two per-role tables as Markdown."""
    def cell(v):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"
    p, e = tables["p_right"], tables["error_rate"]
    heads = list(p)
    lines = [f"P(right outcome), teacher-forced on the base's own samples ({tables['samples']} completions "
             "at T = 1); π_T and P: each method's step-0 target for that reference; an arm: its trained "
             "students (seeds pooled)", "",
             "| role | tokens | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for r in tables["roles"]:
        lines.append(f"| {r} | {tables['tokens'][r]} | " + " | ".join(cell(p[h][r]) for h in heads) + " |")
    who = list(e)
    lines += ["", "Sampled error rate per role: how often each writes a wrong outcome there, on its own "
              "samples at T = 1 (the base's step-0 and each student's last evaluation), and the base's at "
              "the lower temperatures of the sweep (seeds pooled; tokens "
              "in parentheses)", "", "| role | " + " | ".join(who) + " |", "|---|" + "---:|" * len(who)]
    for r in tables["roles"]:
        cells = (f"{cell(e[w][r])} ({tables['error_tokens'][w][r]})" for w in who)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
