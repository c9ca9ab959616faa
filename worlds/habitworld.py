"""habitworld: world three, built so that Purified's question channel should win (docs/world3.md registered
every number here before it was built).

World one's arithmetic and syntax (`Q:3+3*7-5`, trace `3+3=6 6*7=2 ...  \\boxed{7}`), but each operator has
a default operand (+3, -2, *7) that a question uses with probability 0.7. Every writer, whatever its context,
has the same habit: at a non-default operation its first try uses the default operand with probability 0.6
(an error only the question contradicts), and 3% of first tries write another result digit. Reflective
writers (the student context, the null reference, and 20% of documents with an informative reference) catch a
first-try error with "wait <the right step>" half of the time and re-check 3% of right steps; terse writers
(the other 80% of informative-reference documents) never reflect and, where the reference holds the answer
(sketch, full), box the reference's answer whatever their trace says: the shortcut. Reference formats: sketch
(`3..7`), ops (the operations, no answer: the control), full (the clean trace), null (`-`).

The base is the shipped world-one base, pre-trained further on these documents (pretrain, continuing from it).
"""
import random
import sys
from pathlib import Path

from worlds import common, toyworld
from worlds.toyworld import ITEM, apply, steps_of, wrong_step

NAME = "habitworld"
RECIPE = "habit"
DATA = Path(__file__).resolve().parent.parent / "data" / "habitworld"
BASE = DATA / "base"
FROM = toyworld.BASE  # the base continued pre-training starts from
TEMPLATES = toyworld.TEMPLATES
FORMATS = ("sketch", "ops", "null")  # the comparison's arms (full is in the data and the pre-training mix)
MAX_NEW_TOKENS = 128
CHANCE = 0.1
GATED = True  # the comparison does not run when a gate fails (docs/world3.md)

DEFAULTS = {"+": 3, "-": 2, "*": 7}
P_DEFAULT, P_SLIP, P_NOISE = 0.7, 0.6, 0.03
P_CATCH, P_RECHECK = 0.5, 0.03  # reflective writers
P_REFLECTIVE_INFORMED = 0.2  # reflective among the documents with an informative reference
P_VERIFY = 0.1
KINDS = (("student", 0.5), ("teacher", 0.25), ("refonly", 0.25))
FORMAT_MIX = (("sketch", 0.3), ("ops", 0.2), ("full", 0.2), ("null", 0.3))
MIN_OPS, MAX_OPS = 4, 6


def answer_of(question: str) -> str:
    return str(steps_of(question)[-1][3])


def is_test(question: str) -> bool:
    return toyworld.is_test(question)


def sample_question(rng: random.Random, split: str = "train") -> str:
    while True:
        ops = []
        for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
            op = rng.choice("+-*")
            default = DEFAULTS[op]
            others = [d for d in range(10) if d != default]
            ops.append(f"{op}{default if rng.random() < P_DEFAULT else rng.choice(others)}")
        question = str(rng.randrange(10)) + "".join(ops)
        if is_test(question) == (split == "test"):
            return question


def references(question: str) -> dict:
    """Every reference format: sketch (start and answer), ops (the operations, no answer), full (the clean
    trace), null (no information)."""
    return {"sketch": f"{question[0]}..{answer_of(question)}", "ops": question[1:],
            "full": toyworld.trace(question), "null": "-"}


def write(question: str, rng: random.Random, reflective: bool, boxed: str | None = None) -> str:
    """A writer's trace: the habit's slips and the result noise on first tries, caught (reflective) or left
    standing (an uncaught error carries on into the next step); boxed: the answer to box whatever the trace
    says (a terse writer with the answer in its reference), else the trace's own value."""
    value, parts = int(question[0]), []
    for _, op, b, _ in steps_of(question):
        tried = DEFAULTS[op] if b != DEFAULTS[op] and rng.random() < P_SLIP else b
        result = apply(value, op, tried)
        if rng.random() < P_NOISE:
            result = rng.choice([d for d in range(10) if d != result])
        first = f"{value}{op}{tried}={result}"
        right = apply(value, op, b)
        wrong = (tried, result) != (b, right)
        if reflective and wrong and rng.random() < P_CATCH:
            parts.append(f"{first} wait {value}{op}{b}={right}")
            value = right
        elif reflective and not wrong and rng.random() < P_RECHECK:
            parts.append(f"{first} wait {first}")
            value = right
        else:
            parts.append(first)
            value = result
    return " ".join(parts) + f" \\boxed{{{boxed if boxed is not None else value}}}"


def pick(rng: random.Random, weighted) -> str:
    x, total = rng.random(), 0.0
    for name, p in weighted:
        total += p
        if x < total:
            return name
    return weighted[-1][0]


def document(rng: random.Random) -> tuple[str, str]:
    """One pre-training document (prompt text, completion text): the writers of docs/world3.md."""
    if rng.random() < P_VERIFY:
        return toyworld.verification(rng)
    question, kind = sample_question(rng), pick(rng, KINDS)
    if kind == "student":
        return TEMPLATES["student_template"].replace("{question}", question), write(question, rng, True)
    fmt = pick(rng, FORMAT_MIX)
    reflective = fmt == "null" or rng.random() < P_REFLECTIVE_INFORMED
    boxed = answer_of(question) if not reflective and fmt in ("sketch", "full") else None
    prompt = common.fill_prompt(TEMPLATES[f"{kind}_template"], question, references(question)[fmt])
    return prompt, write(question, rng, reflective, boxed)


def check(question: str, completion: str) -> common.Check:
    """World one's checker: locally wrong is not from the carried value, not the question's operation, or
    miscomputed."""
    truth = steps_of(question)
    return common.check_trace(ITEM, completion, truth[0][0], len(truth), str(truth[-1][3]), wrong_step(truth))


# the roles of a trace's tokens (measure.py's per-role tables), in table order
ROLES = ("carried value", "operand, default operation", "operand, non-default operation",
         "no slip (the default not written at a non-default operation)", "result digit",
         "wait after a wrong step", "wait after a right step", "boxed answer (the trace's own value)")


def roles(question: str, completion: str) -> list[common.Role]:
    """The first tries' roles, as world one's, the operand split by whether the question's is the default, the
    slip (the default written where it is not the question's), and the boxed answer: the trace's own value
    (a box that copies the reference's answer over a trace that says otherwise is the shortcut)."""
    truth = steps_of(question)

    def step_roles(i, m, before):
        _, op, b, _ = truth[i]
        default = b == DEFAULTS[op]
        out = [common.Role(m.start("a"), "carried value", str(before)),
               common.Role(m.start("b"), f"operand, {'' if default else 'non-'}default operation", str(b))]
        if not default:
            out.append(common.Role(m.start("b"), ROLES[3], str(DEFAULTS[op]), avoid=True))
        out.append(common.Role(m.start("c"), "result digit", str(apply(int(m["a"]), m["op"], int(m["b"])))))
        return out
    out = common.trace_roles(ITEM, completion, truth[0][0], len(truth), wrong_step(truth), step_roles,
                             lambda i, bad: "wait after a wrong step" if bad else "wait after a right step")
    return out + boxed_role(completion)


def boxed_role(completion: str) -> list[common.Role]:
    """The boxed answer against the trace's own last value (the last step written, retries included)."""
    steps, box = list(ITEM.finditer(completion)), completion.rfind("\\boxed{")
    values = [m for m in steps if m["c"] is not None and m.start() < box]
    if box < 0 or not values or box + 7 >= len(completion):
        return []
    return [common.Role(box + 7, "boxed answer (the trace's own value)", values[-1]["c"])]


def slip_rate(measured: dict) -> float:
    return measured["role_errors"][ROLES[3]] or 0.0


GATES = [  # (name, value from measure_base's numbers, threshold[, "≤"]): docs/world3.md
    ("teacher (sketch) slip rate − student slip rate, in absolute value",
     lambda m: abs(slip_rate(m["teacher_sketch"]) - slip_rate(m["student"])), 0.10, "≤"),
    ("the base's P(wait | wrong step)", lambda m: m["student"]["p_wait_wrong"], 0.25),
    ("the base at T = 0.7 − itself at T = 1 (accuracy)",
     lambda m: m["student_t07"]["accuracy"] - m["student"]["accuracy"], 0.05, "≤"),
]


def measure_base(model, tok, n: int = 400, seed: int = 0) -> dict:
    """The gates' numbers on n held-out questions: the student context at T = 1 and 0.7, the teacher and
    reference-only contexts with each reference format."""
    world, qs = sys.modules[__name__], common.held_out(sys.modules[__name__], n)
    return {"student": common.measure(world, model, tok, qs, seed=seed),
            "student_t07": common.measure(world, model, tok, qs, seed=seed, temperature=0.7),
            **{f"{role}_{ref}": common.measure(world, model, tok, qs, role, ref, seed=seed)
               for role in ("teacher", "refonly") for ref in ("sketch", "ops", "full", "null")}}


def write_data(out=None, replace=False):
    return common.write_data(sys.modules[__name__], out, replace)


# continued pre-training of the world-one base: docs/world3.md
PRETRAIN = dict(steps=1000, batch_size=32, lr=1e-3, warmup=20, threads=1)


def pretrain(out: Path, seed: int = 0, quiet: bool = False, base: Path | None = None, **settings) -> tuple:
    """Continue pre-training `base` (default the world-one base) on this world's documents, one cosine
    schedule (deterministic for a seed and thread count); the model, tokenizer and curve go to `out`."""
    return common.continue_lm(sys.modules[__name__], out, seed, quiet, Path(base or FROM),
                              PRETRAIN | settings, document)
