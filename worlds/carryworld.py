"""carryworld: a second toy world, where the base's errors are its own and reflection pays.

A question is a two-digit start and 3-5 multiplications, all mod 100, each by 3, 7 or 9 (an easy step) or, a
third of the time, by a two-digit number ending in 1, 3, 7 or 9 (a hard step):
    Q:47*7*23*3           (47·7 mod 100 = 29, 29·23 → 67, 67·3 → 01): the answer is 01
A direct step writes the product's last two digits in one go (`29*23=67`). For an easy step the tens digit is
two digit products and a carry, which a 0.9M-parameter model learns; for a hard one it is three products, a
carry and two sums at once, which it does not (its first tries there are mostly wrong). After "wait" the model
re-derives the step in single-digit sub-steps it does reliably, then restates it:
    47*7=39 wait 7*7=49 4*7=28 4+8=2 47*7=29 29*23=47 wait 9*3=27 2*3=06 9*2=18 2+6=8 8+8=6 29*23=67 ...
(29·23: units 9·3 = 27 → 7; tens 2 (carried) + 6 (of 2·3) + 8 (of 9·2) = 16 → 6.) The multipliers are coprime
to 10, so every step is a bijection mod 100: a wrong step left standing always gives a wrong answer.

No error is injected. Pre-training has two stages:
  1. direct steps only, all right, in every context, plus procedure practice (`P:47*7` → the sub-steps), until
     its own first tries on the easy steps of a probe are wrong on at most `stage1_error` of them (checked
     every stage1_check_every steps; 0: a fixed stage1_steps);
  2. the stage-1 model's own traces: for each step it samples the two result digits itself (temperature 1)
     after the question and the clean trace so far; the checker marks the wrong ones, which are followed by
     "wait", the procedure and the right result (a right step is re-checked the same way 5% of the time).
     Training continues, at a lower rate, on these traces in the student context and in 20% of the documents
     of both teacher contexts (the style control of the first world: "question ⇒ reflective" is not a
     difference Δ_it could carry). A wrong first try is context, never a target; a right one is learned. The
     easy steps' errors shrink in stage 2; the hard ones stay beyond the model's one-shot reach (stage 1's
     right targets on every hard step leave their tens digit at chance), so most errors are the hard steps'
     own.
The errors the base makes are the ones its own first tries make; its reflections are learned from them.
With the full reference in context a teacher reads each step's value instead of computing it.
"""
import random
import re
import sys
import zlib
from pathlib import Path

import torch

from worlds import common
from worlds.common import fill_prompt

NAME = "carryworld"
RECIPE = "carry"
DATA = Path(__file__).resolve().parent.parent / "data" / "carryworld"
BASE = DATA / "base"
TEMPLATES = {"student_template": "Q:{question}", "teacher_template": "Q:{question}\nR:{reference}",
             "refonly_template": "R:{reference}"}
FORMATS = ("full", "sketch")  # the reference formats of the data, each an arm of the comparison
NUMBERS = [n for n in range(11, 100) if n % 10]  # starts: two digits, neither 0
FACTORS = [3, 7, 9]  # easy multipliers: one digit, coprime to 10 (every step a bijection mod 100)
HARD = [10 * t + u for t in range(1, 10) for u in (1, 3, 7, 9)]  # hard ones: two digits, coprime to 10
P_HARD = 1 / 3  # the share of hard steps
MIN_OPS, MAX_OPS = 3, 5
P_PROCEDURE = 0.1  # procedure practice documents
P_RECHECK = 0.05  # a right step of an own trace re-checked with the procedure
P_TEACHER_REFLECTIVE = 0.2  # reflective (own-trace) documents in both teacher contexts: the style control
CHANCE = 0.01  # a hundred possible answers


def steps_of(question: str) -> list[tuple[int, int, int]]:
    """The true steps (a, b, c = a·b mod 100) of a question such as '47*7*9*3'."""
    value, steps = int(question[:2]), []
    for b in re.findall(r"\*(\d+)", question):
        steps.append((value, int(b), value * int(b) % 100))
        value = steps[-1][2]
    return steps


def answer_of(question: str) -> str:
    return f"{steps_of(question)[-1][2]:02d}"


def is_test(question: str) -> bool:
    """The held-out split: a fixed 10% of all questions, by hash."""
    return zlib.crc32(question.encode()) % 10 == 0


def multiplier(rng: random.Random) -> int:
    return rng.choice(HARD) if rng.random() < P_HARD else rng.choice(FACTORS)


def sample_question(rng: random.Random, split: str = "train") -> str:
    while True:
        question = f"{rng.choice(NUMBERS)}" + "".join(f"*{multiplier(rng)}"
                                                       for _ in range(rng.randint(MIN_OPS, MAX_OPS)))
        if is_test(question) == (split == "test"):
            return question


def step_text(a: int, b: int, c: int) -> str:
    return f"{a:02d}*{b}={c:02d}"


def procedure(a: int, b: int) -> str:
    """The reliable way: single-digit products (units·units, tens·units, and for a two-digit multiplier
    units·tens), the tens digit as one-digit sums mod 10 (the carry first), then the step restated."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    p, r = a0 * b0, a1 * b0
    t = (p // 10 + r % 10) % 10
    text = f"{a0}*{b0}={p:02d} {a1}*{b0}={r:02d} "
    if b1:
        s = a0 * b1
        text += f"{a0}*{b1}={s:02d} {p // 10}+{r % 10}={t} {t}+{s % 10}={(t + s) % 10} "
    else:
        text += f"{p // 10}+{r % 10}={t} "
    return text + step_text(a, b, a * b % 100)


def trace(question: str) -> str:
    """The clean direct trace (the full reference)."""
    return " ".join(step_text(*s) for s in steps_of(question)) + f" \\boxed{{{answer_of(question)}}}"


def references(question: str) -> dict:
    """Both reference formats: full (the clean worked trace) and sketch (start and answer only)."""
    return {"full": trace(question), "sketch": f"{question[:2]}..{answer_of(question)}"}


def reflective(question: str, first_tries: list[int], rng: random.Random | None) -> list[tuple[str, bool]]:
    """A trace from first-try results (one per step, after the right operands), as (text, trained) pieces:
    each wrong one followed by "wait" and the procedure, a right one re-checked with probability P_RECHECK
    (rng None: never). A wrong first try is read, never trained on (the model learns to reflect on its errors,
    not to make them); a right one is learned."""
    pieces = []
    for k, ((a, b, c), tried) in enumerate(zip(steps_of(question), first_tries)):
        pieces += [(f"{' ' if k else ''}{a:02d}*{b}=", True), (f"{tried:02d}", tried == c)]
        if tried != c or (rng is not None and rng.random() < P_RECHECK):
            pieces.append((f" wait {procedure(a, b)}", True))
    return pieces + [(f" \\boxed{{{answer_of(question)}}}", True)]


def text_of(pieces: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in pieces)


def longest_trace() -> int:
    """Characters of the longest trace a document can hold: every step of the longest question reflected."""
    step = max(len(f"{step_text(a, b, 1)} wait {procedure(a, b)} ") for a in range(100) for b in FACTORS
               + HARD)
    return MAX_OPS * step + len("\\boxed{00}")


MAX_NEW_TOKENS = longest_trace() + 1  # characters are tokens; + EOS


# ----------------------------------------------------------------------------- the checker

ITEM = re.compile(
    r"(?<!\d)(?P<a>\d\d)\*(?P<b>\d\d?)=(?P<c>\d\d)(?!\d)|\b(?P<wait>wait)\b|\\boxed\{(?P<boxed>[^{}]*)\}")


def wrong_step(truth):
    """wrong(i, m): step match m's multiplier is not the question's i-th, or its product is wrong
    (check_trace adds: not from the carried value)."""
    def wrong(i, m):
        return int(m["b"]) != truth[i][1] or int(m["c"]) != int(m["a"]) * int(m["b"]) % 100
    return wrong


def check(question: str, completion: str) -> common.Check:
    """Direct steps (`aa*b=cc`, two-digit a and c, b the multiplier) are the attempts; the procedure's
    single-digit sub-steps are not (a restated step after them is the retry). Locally wrong: not from the
    carried value, not the question's next multiplier, or a wrong product."""
    truth = steps_of(question)
    return common.check_trace(ITEM, completion, truth[0][0], len(truth), answer_of(question),
                              wrong_step(truth))


# the roles of a trace's tokens (measure.py's per-role tables), in table order
ROLES = ("multiplier (copied from the question)", "units digit", "tens digit, easy step",
         "tens digit, hard step", "tens digit, first step", "tens digit, last step",
         "wait after a wrong easy step", "wait after a wrong hard step", "wait after a right step")


def roles(question: str, completion: str) -> list[common.Role]:
    """The first tries' roles: the multiplier copied from the question (each of its digits), the result's
    digits (the product of a and b as written: the checker's test) with the tens digit by the step's kind
    (easy: one digit; hard: two) and by its place (the first step, the last), and the "wait" decision after
    the step."""
    truth = steps_of(question)

    def hard(i):
        return truth[i][1] >= 10

    def step_roles(i, m, before):
        multiplier, product = str(truth[i][1]), f"{int(m['a']) * int(m['b']) % 100:02d}"
        tens, units = m.start("c"), m.start("c") + 1
        out = [common.Role(m.start("b") + k, ROLES[0], d) for k, d in enumerate(multiplier)]
        out += [common.Role(units, "units digit", product[1]),
                common.Role(tens, f"tens digit, {'hard' if hard(i) else 'easy'} step", product[0])]
        out += [common.Role(tens, f"tens digit, {place} step", product[0])
                for place, at in (("first", 0), ("last", len(truth) - 1)) if i == at]
        return out

    def wait_role(i, bad):
        kind = "hard" if hard(i) else "easy"
        return f"wait after a wrong {kind} step" if bad else "wait after a right step"
    return common.trace_roles(ITEM, completion, truth[0][0], len(truth), wrong_step(truth), step_roles,
                              wait_role)


# ----------------------------------------------------------------------------- documents and pre-training

def practice(rng: random.Random) -> tuple[str, str]:
    """A procedure practice document: `P:47*7` → the sub-steps."""
    a, b = rng.randrange(100), multiplier(rng)
    return f"P:{a:02d}*{b}", procedure(a, b)


def direct_document(rng: random.Random) -> tuple[str, str]:
    """Stage 1: procedure practice, or a clean direct trace in one of the three contexts."""
    if rng.random() < P_PROCEDURE:
        return practice(rng)
    question, kind = sample_question(rng), rng.random()
    reference = references(question)["full" if rng.random() < 0.5 else "sketch"]
    template = TEMPLATES["student_template" if kind < 0.5 else "teacher_template" if kind < 0.75 else
                         "refonly_template"]
    return fill_prompt(template, question, reference), trace(question)


def own_first_tries(model, tok, questions: list[str], seed: int, batch_size: int = 512) -> list[list[int]]:
    """For each question, the model's own first-try result at every step (temperature 1, two digits), each
    after the question, the clean trace so far and the step's right operands."""
    from engines.hf import generate
    from rollout import chat_ids
    tries = [[] for _ in questions]
    prefix = ["" for _ in questions]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for k in range(MAX_OPS):
            live = [i for i, q in enumerate(questions) if k < len(steps_of(q))]
            if not live:
                break
            prompts = []
            for i in live:
                a, b, _ = steps_of(questions[i])[k]
                prompts.append(chat_ids(tok, fill_prompt(TEMPLATES["student_template"], questions[i]),
                                        False) +
                               tok(prefix[i] + f"{a:02d}*{b}=", add_special_tokens=False)["input_ids"])
            texts = generate(model, tok, prompts, n=1, max_new_tokens=2, temperature=1.0, top_p=1.0, top_k=0,
                             eos_ids=[tok.eos_token_id], batch_size=batch_size,
                             device=next(model.parameters()).device).texts
            for i, text in zip(live, texts):
                a, b, c = steps_of(questions[i])[k]
                tried = int(text) if re.fullmatch(r"\d\d", text) else (c + 1) % 100  # not two digits: wrong
                tries[i].append(tried)
                prefix[i] += f"{step_text(a, b, c)} "
    return tries


def first_try_error(model, tok, questions: list[str], seed: int = 0, hard: bool | None = None) -> float:
    """The fraction of steps whose own first try (as own_first_tries samples it) is wrong; hard True / False:
    of the hard / easy steps only."""
    tries = own_first_tries(model, tok, questions, seed)
    pairs = [(t, c) for q, ts in zip(questions, tries) for t, (_, b, c) in zip(ts, steps_of(q))
             if hard is None or (b > 9) == hard]
    return sum(t != c for t, c in pairs) / max(len(pairs), 1)


def reflective_documents(questions, tries, seed: int):
    """Stage 2's document source: own traces (student context, and 20% of both teacher contexts), clean direct
    traces in the other teacher documents, procedure practice; every one as reflective()'s pieces."""
    rng = random.Random(seed)
    pool = list(zip(questions, tries))

    def documents(k: int) -> list[tuple[str, list]]:
        docs = []
        for _ in range(k):
            if rng.random() < P_PROCEDURE:
                docs.append(practice(rng))
                continue
            question, first = rng.choice(pool)
            kind = rng.random()
            if kind < 0.5:
                docs.append((fill_prompt(TEMPLATES["student_template"], question),
                             reflective(question, first, rng)))
                continue
            fmt = "full" if rng.random() < 0.5 else "sketch"
            template = TEMPLATES["teacher_template" if kind < 0.75 else "refonly_template"]
            own = rng.random() < P_TEACHER_REFLECTIVE
            docs.append((fill_prompt(template, question, references(question)[fmt]),
                         reflective(question, first if own else [c for _, _, c in steps_of(question)],
                                    rng if own else None)))
        return docs
    return documents


GATES = [  # (name, how it is computed from measure_base's numbers, threshold): a base must pass all of them
    ("student accuracy ≥ 0.5 (chance 0.01)", lambda m: m["student"]["accuracy"], 0.5),
    ("reflection pays: accuracy − accuracy with \"wait\" forbidden",
     lambda m: m["student"]["accuracy"] - m["student_no_wait"]["accuracy"], 0.10),
    ("most first-try errors caught by a reflection", lambda m: m["student"]["caught_frac"], 0.5),
    ("P(wait | wrong step) / P(wait | right step)",
     lambda m: m["student"]["p_wait_wrong"] / max(m["student"]["p_wait_right"], 1e-9), 2.0),
    ("teacher accuracy with the full reference", lambda m: m["teacher_full"]["accuracy"], 0.95),
]


def measure_base(model, tok, n: int = 400, seed: int = 0) -> dict:
    """Every context on n held-out questions, and the student with "wait" forbidden (the reflection gate)."""
    world = sys.modules[__name__]
    return {**common.measure_contexts(world, model, tok, n, seed),
            "student_no_wait": common.measure(world, model, tok, common.held_out(world, n), seed=seed,
                                              forbid="wait")}


def write_data(out=None, replace=False):
    return common.write_data(sys.modules[__name__], out, replace)


PRETRAIN = dict(stage1_steps=4000, stage1_error=0.10, stage1_check_every=100, stage2_steps=8000,
                stage2_lr=1e-3, stage2_warmup=50, pool=5000, probe=500, batch_size=32, lr=3e-3, warmup=200,
                hidden=128, layers=4,
                threads=1, eval_every=500, eval_samples=200)  # pilots and the choice: docs/carryworld.md


def pretrain(out: Path, seed: int = 0, quiet: bool = False, **settings) -> tuple:
    """Both stages from scratch; the log (loss, world metrics on held-out questions, the stage-1 probe) in
    out/pretrain_log.jsonl. Stage 1 ends (at most stage1_steps) when the own first tries on the easy steps of
    `probe` training questions (checked every stage1_check_every steps; 0: never) are wrong on at most
    stage1_error of them."""
    s = PRETRAIN | settings
    rng = random.Random(seed)
    tok = common.build_tokenizer()
    model = common.build_model(tok, s["hidden"], s["layers"], seed)
    world = sys.modules[__name__]
    questions = common.held_out(world, s["eval_samples"])
    probe_rng = random.Random(seed + 3)
    # training questions: test stays unseen
    probe_questions = [sample_question(probe_rng) for _ in range(s["probe"])]
    common.save_prompts(world, out)
    probes = []

    def probe(m):
        probes.append(first_try_error(m, tok, probe_questions, seed, hard=False))
        common.write_jsonl(out / "stage1_probe.jsonl", [{"check": i + 1, "first_try_error_easy": e}
                                                       for i, e in enumerate(probes)])
        if not quiet:
            print(f"stage 1 probe: own first tries wrong on {probes[-1]:.3f} of the probe's easy steps",
                  flush=True)
        return probes[-1] <= s["stage1_error"]

    def evaluate(m):
        return {"student": common.measure(world, m, tok, questions),
                "student_no_wait": common.measure(world, m, tok, questions, forbid="wait"),
                "teacher_full": common.measure(world, m, tok, questions[:len(questions) // 2], "teacher",
                                               "full"),
                "first_try_error": first_try_error(m, tok, probe_questions, seed),
                "first_try_error_easy": first_try_error(m, tok, probe_questions, seed, hard=False),
                "first_try_error_hard": first_try_error(m, tok, probe_questions, seed, hard=True)}
    log = common.train_lm(model, tok, lambda k: [direct_document(rng) for _ in range(k)], out,
                          s["stage1_steps"], batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"],
                          evaluate=evaluate, eval_every=s["eval_every"], label="stage 1", quiet=quiet,
                          stop=probe if s["stage1_check_every"] else None,
                          stop_every=max(s["stage1_check_every"], 1))
    pool_rng = random.Random(seed + 1)
    pool = [sample_question(pool_rng) for _ in range(s["pool"])]
    tries = own_first_tries(model.eval(), tok, pool, seed)
    common.write_jsonl(out / "stage1_first_tries.jsonl", [{"question": q, "first_tries": t}
                                                         for q, t in zip(pool, tries)])
    log = common.train_lm(model, tok, reflective_documents(pool, tries, seed + 2), out, s["stage2_steps"],
                          batch_size=s["batch_size"], lr=s["stage2_lr"], warmup=s["stage2_warmup"],
                          evaluate=evaluate, eval_every=s["eval_every"], label="stage 2", quiet=quiet,
                          log=log)
    return model, tok, log
