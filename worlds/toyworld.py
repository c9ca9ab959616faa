"""toyworld: the first toy world, small enough to pre-train a reasoning base on a CPU, where popsd can be
watched working (compare.py measures its gates, pre-trains its base and runs the comparison: --world
toyworld).

The world is last-digit arithmetic. A question is a start digit and 4-6 operations, each used once:
    Q:3+4*2-5+7          the answer is ((3+4)·2−5+7) mod 10 = 6
The student's chain of thought writes one step per operation and sometimes reflects:
    3+4=7 7*2=5 wait 7*2=4 4-5=9 9+7=6 \\boxed{6}
A step can go wrong (a wrong digit, or the wrong operand copied from the question); "wait" then
re-does the step. Two reference formats for the teachers: full (the whole clean worked trace, as in
the paper) and sketch (start and answer only, `3..6`: the teacher knows where to go, not the steps).

The base is a 4-layer Qwen3 (the class every popsd path loads) with a character-level tokenizer,
pre-trained from scratch on three document kinds, loss on the completion only:
    Q:q     → a reflective trace (15% of steps wrong then fixed, 5% of right steps re-checked)
    Q:q R:r → a trace, reflective in 20% of documents      (r full or sketch, half each)
    R:r     → a trace, reflective in 20% of documents      (the same rate: "question ⇒ reflective"
                                                              is not a style Δ_it could carry)
The gates (GATES) say whether the base is good enough for a comparison to mean something.
"""
import random
import re
import sys
import zlib
from pathlib import Path

from worlds import common
from worlds.common import Check

NAME = "toyworld"
RECIPE = "toy"
DATA = Path(__file__).resolve().parent.parent / "data" / "toyworld"
BASE = DATA / "base"
MAX_NEW_TOKENS = 128  # the longest reflective traces are ~110 characters

# ----------------------------------------------------------------------------- the world

OPS = "+-*"
PAIRS = [(op, b) for op in OPS for b in range(10)]  # the 30 operations
MIN_OPS, MAX_OPS = 4, 6
P_ERROR, P_RECHECK, P_OPERAND_ERROR = 0.15, 0.05, 0.4  # reflective traces: a step goes wrong; a right step is
# re-checked; a wrong step took the wrong operand (else the wrong result digit)
P_TEACHER_REFLECTIVE = 0.2  # reflective documents in both teacher contexts (the style control)
P_VERIFY = 0.1  # verification practice documents: one step, right or wrong, to accept or to fix
TEMPLATES = {"student_template": "Q:{question}", "teacher_template": "Q:{question}\nR:{reference}",
             "refonly_template": "R:{reference}"}
FORMATS = ("full", "sketch")  # the reference formats of the data, each an arm of the comparison


def apply(a: int, op: str, b: int) -> int:
    return (a + b) % 10 if op == "+" else (a - b) % 10 if op == "-" else (a * b) % 10


def steps_of(question: str) -> list[tuple[int, str, int, int]]:
    """The true steps (a, op, b, c) of a question such as '3+4*2-5'."""
    value, steps = int(question[0]), []
    for op, b in zip(question[1::2], question[2::2]):
        steps.append((value, op, int(b), apply(value, op, int(b))))
        value = steps[-1][3]
    return steps


def answer_of(question: str) -> str:
    return str(steps_of(question)[-1][3])


def is_test(question: str) -> bool:
    """The held-out split: a fixed 10% of all questions, by hash."""
    return zlib.crc32(question.encode()) % 10 == 0


def sample_question(rng: random.Random, split: str = "train") -> str:
    while True:
        ops = rng.sample(PAIRS, rng.randint(MIN_OPS, MAX_OPS))  # each operation at most once
        question = str(rng.randrange(10)) + "".join(f"{op}{b}" for op, b in ops)
        if is_test(question) == (split == "test"):
            return question


def step_text(a, op, b, c) -> str:
    return f"{a}{op}{b}={c}"


def references(question: str) -> dict:
    """Both reference formats: full (the clean worked trace) and sketch (start and answer only)."""
    return {"full": trace(question), "sketch": f"{question[0]}..{answer_of(question)}"}


def trace(question: str, rng: random.Random | None = None) -> str:
    """A worked trace; with rng, reflective: wrong steps fixed after "wait", some right steps re-checked."""
    parts = []
    for a, op, b, c in steps_of(question):
        right = step_text(a, op, b, c)
        if rng is not None and rng.random() < P_ERROR:
            if rng.random() < P_OPERAND_ERROR:
                b2 = rng.choice([x for x in range(10) if x != b])
                wrong = step_text(a, op, b2, apply(a, op, b2))
            else:
                wrong = step_text(a, op, b, rng.choice([x for x in range(10) if x != c]))
            parts.append(f"{wrong} wait {right}")
        elif rng is not None and rng.random() < P_RECHECK:
            parts.append(f"{right} wait {right}")
        else:
            parts.append(right)
    return " ".join(parts) + f" \\boxed{{{answer_of(question)}}}"


def verification(rng: random.Random) -> tuple[str, str]:
    """Practice at noticing a wrong step: `V:7*2=5` → `wait 7*2=4`, `V:7*2=4` → `ok`."""
    a, (op, b) = rng.randrange(10), rng.choice(PAIRS)
    c = apply(a, op, b)
    if rng.random() < 0.5:
        return "V:" + step_text(a, op, b, c), "ok"
    return "V:" + step_text(a, op, b,
                            rng.choice([x for x in range(10) if x != c])), "wait " + step_text(a, op, b, c)


def document(rng: random.Random, p_verify: float = P_VERIFY) -> tuple[str, str]:
    """One pre-training document (prompt text, completion text): the three kinds, style-controlled."""
    if rng.random() < p_verify:
        return verification(rng)
    question, kind = sample_question(rng), rng.random()
    reference = references(question)["full" if rng.random() < 0.5 else "sketch"]
    if kind < 0.5:
        return TEMPLATES["student_template"].replace("{question}", question), trace(question, rng)
    reflective = rng if rng.random() < P_TEACHER_REFLECTIVE else None
    if kind < 0.75:
        prompt = TEMPLATES["teacher_template"].replace("{question}",
                                                       question).replace("{reference}", reference)
    else:
        prompt = TEMPLATES["refonly_template"].replace("{reference}", reference)
    return prompt, trace(question, reflective)


# ----------------------------------------------------------------------------- the checker

ITEM = re.compile(
    r"(?P<a>\d)(?P<op>[+\-*])(?P<b>\d)=(?P<c>\d)|\b(?P<wait>wait)\b|\\boxed\{(?P<boxed>[^{}]*)\}")


def wrong_step(truth):
    """wrong(i, m): step match m is not the question's operation i, or miscomputes (check_trace adds: not
    from the carried value)."""
    def wrong(i, m):
        a, op, b = int(m["a"]), m["op"], int(m["b"])
        return (op, b) != truth[i][1:3] or int(m["c"]) != apply(a, op, b)
    return wrong


def check(question: str, completion: str) -> Check:
    """Locally wrong: not from the value the trace carries, not the question's next operation, or
    miscomputed."""
    truth = steps_of(question)
    return common.check_trace(ITEM, completion, truth[0][0], len(truth), str(truth[-1][3]), wrong_step(truth))


# the roles of a trace's tokens (measure.py's per-role tables), in table order
ROLES = ("carried value", "operand", "result digit", "wait after a wrong step", "wait after a right step")


def roles(question: str, completion: str) -> list[common.Role]:
    """The first tries' roles: the carried value (the previous result the trace wrote, or the start), the
    operand copied from the question, the result digit (a op b as written: the checker's miscompute test) and
    the "wait" decision after the step."""
    truth = steps_of(question)

    def step_roles(i, m, before):
        return [common.Role(m.start("a"), "carried value", str(before)),
                common.Role(m.start("b"), "operand", str(truth[i][2])),
                common.Role(m.start("c"), "result digit", str(apply(int(m["a"]), m["op"], int(m["b"]))))]

    return common.trace_roles(ITEM, completion, truth[0][0], len(truth), wrong_step(truth), step_roles,
                              lambda i, bad: "wait after a wrong step" if bad else "wait after a right step")


# ----------------------------------------------------------------------------- gates and pre-training

CHANCE = 0.1  # ten possible answers
GATES = [  # (name, how it is computed from measure_base's numbers, threshold): a base must pass all of them
    ("student accuracy far above chance (≥ 5× chance)", lambda m: m["student"]["accuracy"], 5 * CHANCE),
    ("most first-try errors caught by a reflection", lambda m: m["student"]["caught_frac"], 0.5),
    ("P(wait | wrong step) / P(wait | right step)",
     lambda m: m["student"]["p_wait_wrong"] / max(m["student"]["p_wait_right"], 1e-9), 2.0),
    ("teacher accuracy with the full reference", lambda m: m["teacher_full"]["accuracy"], 0.95),
]

def measure_base(model, tok, n: int = 400, seed: int = 0) -> dict:
    """World metrics of every context on n held-out questions (one sample each, temperature 1)."""
    return common.measure_contexts(sys.modules[__name__], model, tok, n, seed)


def write_data(out=None, replace=False):
    return common.write_data(sys.modules[__name__], out, replace)


# the shipped base
PRETRAIN = dict(steps=12000, batch_size=32, lr=3e-3, warmup=200, hidden=128, layers=4, threads=1)


def pretrain(out: Path, seed: int = 0, quiet: bool = False, **settings) -> tuple:
    """Pre-train the base from scratch on the world's documents (deterministic for a seed and thread count).
    Writes the model and tokenizer to `out` and the curve (loss, world metrics) to out/pretrain_log.jsonl."""
    s = PRETRAIN | {"eval_every": 500, "eval_samples": 200} | settings
    world, rng = sys.modules[__name__], random.Random(seed)
    tok = common.build_tokenizer()
    model = common.build_model(tok, s["hidden"], s["layers"], seed)
    questions = common.held_out(world, s["eval_samples"])
    common.save_prompts(world, out)

    def evaluate(m):
        return {"student": common.measure(world, m, tok, questions),
                "teacher_full": common.measure(world, m, tok, questions[:len(questions) // 2], "teacher",
                                               "full")}
    log = common.train_lm(model, tok, lambda k: [document(rng) for _ in range(k)], out, s["steps"],
                          batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"], evaluate=evaluate,
                          eval_every=s["eval_every"], quiet=quiet)
    return model, tok, log
