"""toyworld.py: a world small enough to pre-train a reasoning base on a CPU, where popsd can be watched working.

    python toyworld.py gates      # the shipped base's gates, measured and printed (~1 min)
    python toyworld.py compare    # base / OPSD / Purified × full / sketch reference × 3 seeds (compare.py)
    python toyworld.py pretrain   # rebuild the shipped base in data/toyworld/base from scratch (~90 min, 2 cores)
    python toyworld.py data       # rewrite data/toyworld/{train,test}.jsonl

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
import argparse
import json
import math
import random
import re
import string
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data" / "toyworld"
BASE = DATA / "base"

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
    return "V:" + step_text(a, op, b, rng.choice([x for x in range(10) if x != c])), "wait " + step_text(a, op, b, c)


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
        prompt = TEMPLATES["teacher_template"].replace("{question}", question).replace("{reference}", reference)
    else:
        prompt = TEMPLATES["refonly_template"].replace("{reference}", reference)
    return prompt, trace(question, reflective)


# ----------------------------------------------------------------------------- the checker

ITEM = re.compile(r"(\d)([+\-*])(\d)=(\d)|\b(wait)\b|\\boxed\{([^{}]*)\}")


@dataclass
class Check:
    """One completion, parsed. A step is *locally* wrong when it does not start from the value the trace
    carries, does not use the question's next operation, or miscomputes: what a reflection can catch."""
    correct: bool = False  # the last \boxed{} holds the answer
    steps: int = 0  # first tries (one per step the trace takes)
    errors: int = 0  # first tries that are locally wrong
    caught: int = 0  # ... and followed by "wait"
    false_reflections: int = 0  # "wait" after a right step (or with no step before it)
    waits: int = 0
    wrong_attempts: int = 0  # all attempts, retries included, for P(wait | wrong) and P(wait | right)
    wrong_reflected: int = 0
    right_attempts: int = 0
    right_reflected: int = 0


def check(question: str, completion: str) -> Check:
    truth = steps_of(question)
    out, boxed = Check(), None
    value = truth[0][0]  # the value the trace carries
    last = None  # the latest attempt: [index, value before it, first try?, wrong?, reflected?]
    after_wait = False
    for m in ITEM.finditer(completion):
        if m.group(1):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if after_wait and last is not None:  # a retry of the step just reflected on
                index, before, first = last[0], last[1], False
            else:
                index, before, first = (last[0] + 1 if last else 0), value, True
            wrong = (index >= len(truth) or a != before or (op, b) != truth[index][1:3] or c != apply(a, op, b))
            out.steps += first
            out.errors += first and wrong
            out.wrong_attempts += wrong
            out.right_attempts += not wrong
            last, value, after_wait = [index, before, first, wrong, False], c, False
        elif m.group(5):
            out.waits += 1
            if last is None or last[4] or not last[3]:
                out.false_reflections += 1
            if last is not None and not last[4]:
                last[4] = True
                out.caught += last[2] and last[3]
                out.wrong_reflected += last[3]
                out.right_reflected += not last[3]
            after_wait = True
        else:
            boxed = m.group(6).strip()
    out.correct = boxed == str(truth[-1][3])
    return out


def summarize(checks: list[Check], tokens: int) -> dict:
    """World metrics over samples; tokens = completion tokens of all of them (EOS included)."""
    n, total = len(checks), Check()
    for c in checks:
        for k in ("correct", "steps", "errors", "caught", "false_reflections", "waits", "wrong_attempts",
                  "wrong_reflected", "right_attempts", "right_reflected"):
            setattr(total, k, getattr(total, k) + getattr(c, k))
    return {"accuracy": total.correct / n, "markers_per_1k": 1000 * total.waits / max(tokens, 1),
            "first_try_errors": total.errors / n, "caught_frac": total.caught / max(total.errors, 1),
            "false_reflections": total.false_reflections / n, "completion_len": tokens / n,
            "p_wait_wrong": total.wrong_reflected / max(total.wrong_attempts, 1),
            "p_wait_right": total.right_reflected / max(total.right_attempts, 1), "samples": n}


# ----------------------------------------------------------------------------- tokenizer and model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>{% endif %}")  # role names left out: short prompts


def build_tokenizer():
    """Character level: one token per printable ASCII character, plus the chat specials."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {s: i for i, s in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))  # no merges: characters
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<|unk|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(tok, hidden=128, layers=4, seed=0):
    """A random-init Qwen3; q/k-norm weights start at 2.5 (sharper initial attention helps copying)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    config = Qwen3Config(vocab_size=128, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=hidden // 4,
                         max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(2.5)
            layer.self_attn.k_norm.weight.fill_(2.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


# ----------------------------------------------------------------------------- measuring a model in the world

def measure(model, tok, questions: list[str], role: str = "student", reference: str = "full", seed: int = 0,
            batch_size: int = 256, max_new_tokens: int = 128) -> dict:
    """Sample one completion per question at temperature 1 in one context and check it: summarize() metrics."""
    from rollout import chat_ids, fill, generate
    template = TEMPLATES[f"{role}_template"]
    prompts = [chat_ids(tok, fill(template, q, references(q)[reference]), False) for q in questions]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        _, mask, _, texts = generate(model, tok, prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0,
                                     top_p=1.0, top_k=0, eos_ids=[tok.eos_token_id], batch_size=batch_size,
                                     device=next(model.parameters()).device)
    return summarize([check(q, t) for q, t in zip(questions, texts)], int(mask.sum()))


def held_out(n: int) -> list[str]:
    """The first n questions of data/toyworld/test.jsonl: the held-out questions every measurement uses."""
    rows = [json.loads(x) for x in (DATA / "test.jsonl").read_text().splitlines()]
    if n > len(rows):
        raise ValueError(f"{n} held-out questions asked, data/toyworld/test.jsonl has {len(rows)}")
    return [r["question"] for r in rows[:n]]


# ----------------------------------------------------------------------------- pre-training

PRETRAIN = dict(steps=12000, batch_size=32, lr=3e-3, warmup=200, hidden=128, layers=4, threads=1)  # the shipped base


def batch_tensors(docs: list[tuple[str, str]], tok):
    """Right-padded ids [B, T], attention mask [B, T] and labels [B, T] (-100 outside the completions)."""
    from rollout import chat_ids
    rows = []
    for prompt, completion in docs:
        p = chat_ids(tok, prompt, False)
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)  # [B, T]
    labels = torch.full((len(rows), width), -100)  # [B, T]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, attn, labels


def pretrain(out: Path, steps: int, batch_size: int = 64, lr: float = 2e-3, warmup: int = 300, seed: int = 0,
             hidden: int = 128, layers: int = 4, eval_every: int = 1000, eval_samples: int = 200, quiet=False):
    """Pre-train the base from scratch on the world's documents; deterministic for a seed and thread count.
    Writes the model and tokenizer to `out` and the curve (loss, world metrics) to out/pretrain_log.jsonl."""
    from rich.progress import Progress
    rng = random.Random(seed)
    tok = build_tokenizer()
    model = build_model(tok, hidden, layers, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))
    out.mkdir(parents=True, exist_ok=True)
    log, losses, t0 = [], [], time.time()
    questions = held_out(eval_samples)
    with Progress(disable=quiet, transient=True) as bar:
        task = bar.add_task("pre-training", total=steps)
        for step in range(1, steps + 1):
            model.train()
            ids, attn, labels = batch_tensors([document(rng) for _ in range(batch_size)], tok)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.advance(task)
            if step % eval_every == 0 or step == steps:
                model.eval()
                row = {"step": step, "loss": sum(losses) / len(losses), "minutes": (time.time() - t0) / 60,
                       "student": measure(model, tok, questions),
                       "teacher_full": measure(model, tok, questions[:eval_samples // 2], "teacher", "full")}
                losses = []
                log.append(row)
                s = row["student"]
                bar.console.print(f"step {step}  loss {row['loss']:.4f}  student acc {s['accuracy']:.3f}  "
                                  f"errors {s['first_try_errors']:.2f}  caught {s['caught_frac']:.2f}  "
                                  f"P(wait|wrong) {s['p_wait_wrong']:.2f}  P(wait|right) {s['p_wait_right']:.2f}  "
                                  f"teacher acc {row['teacher_full']['accuracy']:.3f}  {row['minutes']:.1f} min")
                (out / "pretrain_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
                model.save_pretrained(out)  # the newest evaluated weights: an interrupted run leaves a usable base
                tok.save_pretrained(out)
    return model, tok, log


# ----------------------------------------------------------------------------- data files and gates

def write_data(train: int = 2000, test: int = 500, seed: int = 0):
    """data/toyworld/{train,test}.jsonl: question, full and sketch references, answer (test: held-out split)."""
    rng = random.Random(seed)
    DATA.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        seen, rows = set(), []
        while len(rows) < n:
            q = sample_question(rng, split)
            if q not in seen:
                seen.add(q)
                rows.append({"question": q, **references(q), "answer": answer_of(q)})
        (DATA / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


CHANCE = 0.1  # ten possible answers
GATES = [  # (name, how it is computed from measure_base's numbers, threshold): a base must pass all of them
    ("student accuracy far above chance (≥ 5× chance)", lambda m: m["student"]["accuracy"], 5 * CHANCE),
    ("most first-try errors caught by a reflection", lambda m: m["student"]["caught_frac"], 0.5),
    ("P(wait | wrong step) / P(wait | right step)",
     lambda m: m["student"]["p_wait_wrong"] / max(m["student"]["p_wait_right"], 1e-9), 2.0),
    ("teacher accuracy with the full reference", lambda m: m["teacher_full"]["accuracy"], 0.95),
]


def load_base(path: Path = BASE):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy base at {path}: run `python toyworld.py pretrain` to build it")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def measure_base(model, tok, n: int = 400, seed: int = 0) -> dict:
    """World metrics of every context on n held-out questions (one sample each, temperature 1)."""
    qs = held_out(n)
    return {"student": measure(model, tok, qs, seed=seed),
            **{f"{role}_{ref}": measure(model, tok, qs, role, ref, seed=seed)
               for role in ("teacher", "refonly") for ref in ("full", "sketch")}}


def gates(measured: dict) -> list[dict]:
    return [{"gate": name, "value": get(measured), "threshold": t, "passed": get(measured) >= t}
            for name, get, t in GATES]


def print_gates(measured: dict, console=None):
    """The gate table, and a loud banner when a gate fails: the comparison then cannot show what it is for."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    table = Table(title="toy base: gates (held-out questions, one sample each at temperature 1)")
    for col in ("gate", "measured", "needed", ""):
        table.add_column(col)
    result = gates(measured)
    for g in result:
        table.add_row(g["gate"], f"{g['value']:.3f}", f"≥ {g['threshold']:.2f}",
                      "[green]pass[/]" if g["passed"] else "[bold red]FAIL[/]")
    console.print(table)
    contexts = Table(title="the base in each context", box=box.SIMPLE_HEAD, caption="acc: accuracy; errors: first-"
                     "try errors per sample; P(w|✗), P(w|✓): P(wait | wrong step), P(wait | right step); mk/1k: "
                     "markers per 1k tokens; len: tokens")  # short headers: 80 columns hold the table
    for col in ("context", "acc", "errors", "caught", "P(w|✗)", "P(w|✓)", "mk/1k", "len"):
        contexts.add_column(col, justify="left" if col == "context" else "right", no_wrap=True)
    for name, m in measured.items():
        contexts.add_row(name, f"{m['accuracy']:.3f}", f"{m['first_try_errors']:.2f}", f"{m['caught_frac']:.2f}",
                         f"{m['p_wait_wrong']:.2f}", f"{m['p_wait_right']:.2f}", f"{m['markers_per_1k']:.1f}",
                         f"{m['completion_len']:.1f}")
    console.print(contexts)
    failed = [g["gate"] for g in result if not g["passed"]]
    if failed:
        console.print(f"[bold white on red] THE TOY BASE FAILS {len(failed)} GATE(S): {'; '.join(failed)}. "
                      "What follows is not evidence about reflection. [/]")
    return result


# ----------------------------------------------------------------------------- CLI

def main(argv: list[str]):
    from rich.console import Console
    console = Console()  # a pipe or a log file gets 80 columns: the tables are made to fit them
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gates", help="measure the shipped base in every context and check the gates")
    g.add_argument("--samples", type=int, default=400)
    g.add_argument("--base", default=str(BASE))
    c = sub.add_parser("compare", help="base / OPSD / Purified from the shipped base")
    c.add_argument("--out", default="runs/toy_compare")
    c.add_argument("--formats", default="full,sketch", help="reference formats, comma-separated")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--clip", default="10", help="Purified's soft clip c; a list (5,10,20) adds ablation runs")
    c.add_argument("--beta", default="1", help="Purified's β; a list (0.5,1,2) adds ablation runs")
    c.add_argument("--workers", type=int, default=2, help="runs side by side, one torch thread each")
    c.add_argument("--gate-samples", type=int, default=400)
    c.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    c.add_argument("overrides", nargs="*", help="key=value for every run (e.g. steps=30); the same for all methods")
    t = sub.add_parser("pretrain", help="pre-train the base from scratch (the shipped one took ~90 min on 2 cores)")
    t.add_argument("--out", default=str(BASE))
    t.add_argument("--steps", type=int, default=PRETRAIN["steps"])
    t.add_argument("--threads", type=int, default=PRETRAIN["threads"])
    t.add_argument("--seed", type=int, default=0)
    sub.add_parser("data", help="rewrite data/toyworld/train.jsonl and test.jsonl")
    args = p.parse_args(argv)
    if args.command == "data":
        write_data()
    elif args.command == "gates":
        torch.set_num_threads(2)
        tok, model = load_base(Path(args.base))
        print_gates(measure_base(model, tok, args.samples), console)
    elif args.command == "pretrain":
        torch.set_num_threads(args.threads)
        import plots
        out = Path(args.out)
        _, _, log = pretrain(out, args.steps, seed=args.seed, eval_every=500, eval_samples=200,
                             **{k: v for k, v in PRETRAIN.items() if k not in ("steps", "threads")})
        plots.plot_pretrain(log, [(name, t) for name, _, t in GATES if t <= 1], out / "pretrain.png")
        tok, model = load_base(out)
        print_gates(measure_base(model, tok), console)
    else:
        floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
        try:
            from compare import compare
            compare(Path(args.out), [f.strip() for f in args.formats.split(",")], args.seeds, floats(args.clip),
                    floats(args.beta), args.workers, args.gate_samples, args.overrides, args.overwrite, console)
        except (FileExistsError, FileNotFoundError, RuntimeError, ValueError) as e:
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
            sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
