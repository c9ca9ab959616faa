"""Writes data/toy_math.jsonl: small arithmetic problems with worked solutions (problem, solution), and
data/toy_math_test.jsonl: 32 held-out problems (none in the training file) with gold answers (problem,
answer).

The tiny recipe trains its tokenizer and model on these; the numbers they produce mean nothing,
they only show that the pipeline runs. Rerun: python data/make_toy_math.py
"""
import json
import random
from pathlib import Path


def example(rng: random.Random) -> dict:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    kind = rng.choice(["add", "sub", "mul", "half"])
    if kind == "add":
        q = f"What is {a} + {b}?"
        s = (f"We add the two numbers. {a} + {b} = {a + b}. Let me check: {a + b} - {b} = {a}. "
             f"The answer is \\boxed{{{a + b}}}.")
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"What is {a} - {b}?"
        s = f"We subtract. {a} - {b} = {a - b}. Check: {a - b} + {b} = {a}. The answer is \\boxed{{{a - b}}}."
    elif kind == "mul":
        a, b = a % 13 + 2, b % 11 + 2
        q = f"Compute {a} times {b}."
        s = (f"{a} times {b} is {a} added {b} times, which is {a * b}. Wait, check: {a * b} / {b} = {a}. "
             f"So the answer is \\boxed{{{a * b}}}.")
    else:
        q = f"What is half of {2 * a}?"
        s = (f"Half of {2 * a} is {2 * a} / 2 = {a}. Maybe verify: {a} + {a} = {2 * a}. "
             f"The answer is \\boxed{{{a}}}.")
    return {"problem": q, "solution": s}


if __name__ == "__main__":
    rng = random.Random(0)
    rows = [example(rng) for _ in range(256)]
    path = Path(__file__).with_name("toy_math.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {path}")
    seen, test = {r["problem"] for r in rows}, []
    while len(test) < 32:
        r = example(rng)
        if r["problem"] not in seen:
            seen.add(r["problem"])
            answer = r["solution"].rsplit("\\boxed{", 1)[1].rstrip("}.")
            test.append({"problem": r["problem"], "answer": answer})
    path = Path(__file__).with_name("toy_math_test.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in test))
    print(f"wrote {len(test)} rows to {path}")
