"""legendworld: world four, built so that Purified's question × reference interaction should win
(docs/world3.md registered every number here before it was built).

World one's arithmetic, but an operand can be the letter k (probability 0.15): `Q:3+k*2-5`. Its value is given
only by an informative reference, as a legend at its start (`k=6;3..4`, or `k=6;` and the clean trace); the
null reference (`-`) gives nothing. In pre-training documents the legend's value is drawn per document; in the
task's questions it is always LEGEND (6). Writers without the legend (the student context, the null reference)
guess k uniformly and cannot know they are wrong; every writer writes another result digit on 8% of first
tries, which reflective writers catch with probability 0.6; writers with the legend are terse 80% of the time
(never reflect) and box the reference's answer whatever their trace says, as in world three.

The base is the shipped world-one base, pre-trained further on these documents (pretrain, continuing from it).
"""
import random
import re
import sys
from pathlib import Path

from worlds import common, toyworld
from worlds.habitworld import boxed_role
from worlds.toyworld import ITEM, PAIRS, apply

NAME = "legendworld"
RECIPE = "legend"
DATA = Path(__file__).resolve().parent.parent / "data" / "legendworld"
BASE = DATA / "base"
FROM = toyworld.BASE
TEMPLATES = toyworld.TEMPLATES
FORMATS = ("sketch", "null", "full")  # the comparison's arms
MAX_NEW_TOKENS = 128
CHANCE = 0.1
GATED = True

LEGEND = 6  # k's value in the task's questions
P_K, P_NOISE, P_CATCH = 0.15, 0.08, 0.6
P_TERSE = 0.8  # among writers with the legend
P_VERIFY = 0.1
KINDS = (("student", 0.5), ("teacher", 0.25), ("refonly", 0.25))
FORMAT_MIX = (("sketch", 0.4), ("full", 0.3), ("null", 0.3))
MIN_OPS, MAX_OPS = 4, 6


def steps_of(question: str, k: int = LEGEND) -> list[tuple[int, str, int, int]]:
    """The true steps (a, op, b, c) of a question such as '3+k*2-5', k standing for `k`."""
    value, steps = int(question[0]), []
    for op, b in zip(question[1::2], question[2::2]):
        b = k if b == "k" else int(b)
        steps.append((value, op, b, apply(value, op, b)))
        value = steps[-1][3]
    return steps


def answer_of(question: str, k: int = LEGEND) -> str:
    return str(steps_of(question, k)[-1][3])


def is_test(question: str) -> bool:
    return toyworld.is_test(question)


def sample_question(rng: random.Random, split: str = "train") -> str:
    while True:
        ops = rng.sample(PAIRS, rng.randint(MIN_OPS, MAX_OPS))  # world one's: each operation at most once
        start = str(rng.randrange(10))
        question = start + "".join(f"{op}{'k' if rng.random() < P_K else b}" for op, b in ops)
        if is_test(question) == (split == "test"):
            return question


def trace(question: str, k: int = LEGEND) -> str:
    """The clean trace, k written as its value."""
    return " ".join(f"{a}{op}{b}={c}" for a, op, b, c in steps_of(question, k)) + \
        f" \\boxed{{{answer_of(question, k)}}}"


def references(question: str, k: int = LEGEND) -> dict:
    """sketch (the legend, start and answer), full (the legend and the clean trace), null (nothing)."""
    return {"sketch": f"k={k};{question[0]}..{answer_of(question, k)}", "full": f"k={k};{trace(question, k)}",
            "null": "-"}


def write(question: str, rng: random.Random, k: int | None, reflective: bool,
          boxed: str | None = None) -> str:
    """A writer's trace: k read from the legend (k given) or guessed (None, once per question: a writer
    cannot know it is wrong), the result noise on first tries, caught (reflective) or left standing."""
    guess = rng.randrange(10) if k is None else k
    value, parts = int(question[0]), []
    for _, op, b, _ in steps_of(question, guess):
        result = apply(value, op, b)
        first = result if rng.random() >= P_NOISE else rng.choice([d for d in range(10) if d != result])
        if reflective and first != result and rng.random() < P_CATCH:
            parts.append(f"{value}{op}{b}={first} wait {value}{op}{b}={result}")
            value = result
        else:
            parts.append(f"{value}{op}{b}={first}")
            value = first
    return " ".join(parts) + f" \\boxed{{{boxed if boxed is not None else value}}}"


def pick(rng: random.Random, weighted) -> str:
    x, total = rng.random(), 0.0
    for name, p in weighted:
        total += p
        if x < total:
            return name
    return weighted[-1][0]


def document(rng: random.Random) -> tuple[str, str]:
    """One pre-training document (prompt text, completion text): the writers of docs/world3.md, the legend's
    value drawn per document."""
    if rng.random() < P_VERIFY:
        return toyworld.verification(rng)
    question, kind, k = sample_question(rng), pick(rng, KINDS), rng.randrange(10)
    if kind == "student":
        return TEMPLATES["student_template"].replace("{question}", question), write(question, rng, None, True)
    fmt = pick(rng, FORMAT_MIX)
    prompt = common.fill_prompt(TEMPLATES[f"{kind}_template"], question, references(question, k)[fmt])
    if fmt == "null":
        return prompt, write(question, rng, None, True)
    terse = rng.random() < P_TERSE
    return prompt, write(question, rng, k, not terse, answer_of(question, k) if terse else None)


def wrong_step(question: str):
    """wrong(i, m): step match m is not the question's operation i (k is LEGEND), or miscomputes."""
    truth = steps_of(question)

    def wrong(i, m):
        a, op, b = int(m["a"]), m["op"], int(m["b"])
        return (op, b) != truth[i][1:3] or int(m["c"]) != apply(a, op, b)
    return wrong


def check(question: str, completion: str) -> common.Check:
    """World one's checker, k read as LEGEND."""
    truth = steps_of(question)
    return common.check_trace(ITEM, completion, truth[0][0], len(truth), str(truth[-1][3]),
                              wrong_step(question))


ROLES = ("carried value", "k (the legend's value)", "operand (a digit in the question)", "result digit",
         "wait after a wrong step", "wait after a right step", "boxed answer (the trace's own value)")


def roles(question: str, completion: str) -> list[common.Role]:
    """The first tries' roles, the operand split by whether the question writes k there."""
    truth, letters = steps_of(question), re.findall(r"[+\-*](\w)", question)

    def step_roles(i, m, before):
        operand = "k (the legend's value)" if letters[i] == "k" else "operand (a digit in the question)"
        return [common.Role(m.start("a"), "carried value", str(before)),
                common.Role(m.start("b"), operand, str(truth[i][2])),
                common.Role(m.start("c"), "result digit", str(apply(int(m["a"]), m["op"], int(m["b"]))))]
    out = common.trace_roles(ITEM, completion, truth[0][0], len(truth), wrong_step(question), step_roles,
                             lambda i, bad: "wait after a wrong step" if bad else "wait after a right step")
    return out + boxed_role(completion)


def k_right(measured: dict) -> float:
    """How often k is written as its value in one context's samples (1 − the role's error rate)."""
    return 1 - (measured["role_errors"]["k (the legend's value)"] or 0.0)


GATES = [  # docs/world3.md
    ("the teacher (sketch) reads k right", lambda m: k_right(m["teacher_sketch"]), 0.9),
    ("the student context writes k right", lambda m: k_right(m["student"]), 0.2, "≤"),
]


def measure_base(model, tok, n: int = 400, seed: int = 0) -> dict:
    """The gates' numbers on n held-out questions: the student context, and the teacher and reference-only
    contexts with each reference format."""
    world, qs = sys.modules[__name__], common.held_out(sys.modules[__name__], n)
    return {"student": common.measure(world, model, tok, qs, seed=seed),
            **{f"{role}_{ref}": common.measure(world, model, tok, qs, role, ref, seed=seed)
               for role in ("teacher", "refonly") for ref in FORMATS}}


def write_data(out=None, replace=False):
    return common.write_data(sys.modules[__name__], out, replace)


PRETRAIN = dict(steps=1200, batch_size=32, lr=1e-3, warmup=20, threads=1)


def pretrain(out: Path, seed: int = 0, quiet: bool = False, base: Path | None = None, **settings) -> tuple:
    """Continue pre-training `base` (default the world-one base) on this world's documents."""
    return common.continue_lm(sys.modules[__name__], out, seed, quiet, Path(base or FROM),
                              PRETRAIN | settings, document)
