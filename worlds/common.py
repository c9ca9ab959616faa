"""What every toy world shares: the checked-completion record, the tokenizer and model, measuring a model in a
world, pre-training on a world's documents, the gates. A world (worlds/<name>.py) supplies the rest:

    NAME, DATA, BASE, RECIPE       its name, data folder (train.jsonl, test.jsonl, base/), popsd recipe
    TEMPLATES, CHANCE, GATES       its prompt templates, chance accuracy, gates (name, measured value, bound)
    MAX_NEW_TOKENS                 the longest trace it can need (derived, not tuned)
    sample_question(rng, split), references(q) -> {"full", "sketch"}, answer_of(q), check(q, completion) ->
    Check write_data(), pretrain(out, seed, quiet) -> (model, tok, log), measure_base(model, tok, n, seed) ->
    dict

Functions here take the world (the module) as their first argument; they never import a world.
"""
import json
import math
import random
import string
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch


@dataclass
class Check:
    """One completion, parsed by a world's checker. A step is *locally* wrong when it does not start from the
    value the trace carries, does not use the question's next operation, or miscomputes: what a reflection can
    catch."""
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


class Attempts:
    """The bookkeeping both worlds' checkers share: feed it attempts and waits in text order."""

    def __init__(self):
        self.out = Check()
        self.last = None  # the latest attempt: [index, value before it, first try?, wrong?, reflected?]
        self.after_wait = False

    def position(self, value):
        """(index of the step this attempt is for, the value it should start from, first try?)."""
        if self.after_wait and self.last is not None:  # a retry of the step just reflected on
            return self.last[0], self.last[1], False
        return (self.last[0] + 1 if self.last else 0), value, True

    def attempt(self, index, before, first, wrong):
        o = self.out
        o.steps += first
        o.errors += first and wrong
        o.wrong_attempts += wrong
        o.right_attempts += not wrong
        self.last, self.after_wait = [index, before, first, wrong, False], False

    def wait(self):
        o, last = self.out, self.last
        o.waits += 1
        if last is None or last[4] or not last[3]:
            o.false_reflections += 1
        if last is not None and not last[4]:
            last[4] = True
            o.caught += last[2] and last[3]
            o.wrong_reflected += last[3]
            o.right_reflected += not last[3]
        self.after_wait = True


def check_trace(pattern, completion: str, start: int, steps: int, answer: str, wrong) -> Check:
    """The checker both worlds share. pattern finds, in text order, a step (groups `a`, the value it starts
    from, and `c`, its result), a `wait`, or a `boxed` answer; wrong(index, m) says whether step match m is
    wrong for the question's step `index` beyond starting from the wrong value or running past the last
    step."""
    att, boxed, value = Attempts(), None, start
    for m in pattern.finditer(completion):
        if m["a"] is not None:
            index, before, first = att.position(value)
            att.attempt(index, before, first, index >= steps or int(m["a"]) != before or wrong(index, m))
            value = int(m["c"])
        elif m["wait"]:
            att.wait()
        else:
            boxed = m["boxed"].strip()
    att.out.correct = boxed == answer
    return att.out


@dataclass
class Role:
    """One token of a completion whose right outcome the world knows, by its checker's local judgement: at
    character `at` of the completion (the toy tokenizers are character-level, so also its token index) a
    correct trace writes `right`. Where the question is whether "wait" starts (the character after a step and
    its space), right is "w": after a wrong step "w" is the right outcome, after a right step (avoid) anything
    but "w" is."""
    at: int
    role: str
    right: str
    avoid: bool = False

    def met(self, char: str) -> bool:
        """Whether `char`, written at this position, is the right outcome."""
        return (char == self.right) != self.avoid


def trace_roles(pattern, completion: str, start: int, steps: int, wrong, step_roles, wait_role) -> list[Role]:
    """The roles of a completion's first tries, found as check_trace finds its attempts: step_roles(index, m,
    before) gives a first try's own (its digits, operands), wait_role(index, wrong) names the "wait" decision
    after it (None: none), and the step's local judgement (check_trace's) decides whether "wait" is right
    there. Retries after a "wait" are re-derivations, not first tries: they get no roles."""
    att, value, out = Attempts(), start, []
    for m in pattern.finditer(completion):
        if m["a"] is not None:
            index, before, first = att.position(value)
            bad = index >= steps or int(m["a"]) != before or wrong(index, m)
            att.attempt(index, before, first, bad)
            value = int(m["c"])
            if first and index < steps:
                out += step_roles(index, m, before)
                decision = m.end() + 1  # after the step's space: "w", or the next step or the answer
                name = wait_role(index, bad)
                if name and completion[m.end():decision] == " " and decision < len(completion):
                    out.append(Role(decision, name, "w", avoid=not bad))
        elif m["wait"]:
            att.wait()
    return out


def summarize(checks: list[Check], tokens: int) -> dict:
    """World metrics over samples; tokens = completion tokens of all of them (EOS included)."""
    n, total = len(checks), Check()
    for c in checks:
        for f in fields(Check):
            setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
    return {"accuracy": total.correct / n, "markers_per_1k": 1000 * total.waits / max(tokens, 1),
            "first_try_errors": total.errors / n, "caught_frac": total.caught / max(total.errors, 1),
            "false_reflections": total.false_reflections / n, "completion_len": tokens / n,
            "p_wait_wrong": total.wrong_reflected / max(total.wrong_attempts, 1),
            "p_wait_right": total.right_reflected / max(total.right_attempts, 1), "samples": n}


def fill_prompt(template: str, question: str, reference: str = "") -> str:
    return template.replace("{question}", question).replace("{reference}", reference)


def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_prompts(world, out: Path):
    """popsd_prompts.json in a base folder: how the base was pre-trained to be prompted, so eval.py and popsd
    prompt it right with no flags (popsd's prompt-settings file; the toy chat template has no thinking
    block)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "popsd_prompts.json").write_text(json.dumps({**world.TEMPLATES, "student_thinking": False,
                                                        "teacher_thinking": False}, indent=1) + "\n")


def rows_differing(a: str, b: str) -> int:
    a_rows, b_rows = a.splitlines(), b.splitlines()
    return sum(x != y for x, y in zip(a_rows, b_rows)) + abs(len(a_rows) - len(b_rows))


def write_data(world, out: Path | None = None, replace: bool = False, train: int = 2000, test: int = 500,
               seed: int = 0) -> dict[str, str]:
    """<out, default the world's data folder>/{train,test}.jsonl: question, full and sketch references,
    answer (test: the held-out split). Deterministic, so the shipped files are what this writes; a file that
    differs (edited, or made by other code) is replaced only when asked. {file name: what happened to it}."""
    out, rng = Path(out or world.DATA), random.Random(seed)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: the data files go into a folder")
    texts = {}
    for split, n in (("train", train), ("test", test)):
        seen, rows = set(), []
        while len(rows) < n:
            q = world.sample_question(rng, split)
            if q not in seen:
                seen.add(q)
                rows.append({"question": q, **world.references(q), "answer": world.answer_of(q)})
        texts[out / f"{split}.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows)
    old = {path: path.read_text(encoding="utf-8", errors="replace") for path in texts if path.exists()}
    differ = [path for path, text in texts.items() if path in old and old[path] != text]
    if differ and not replace:  # checked for both files before either is written
        said = "; ".join(f"{path}: {rows_differing(old[path], texts[path])} of "
                         f"{len(texts[path].splitlines())} rows differ" for path in differ)
        raise ValueError(f"{said} from what the generator writes: pass --replace to write over them, or "
                         "--out DIR for a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        if old.get(path) != text:
            path.write_text(text, encoding="utf-8")
    return {path.name: "unchanged" if old.get(path) == text else "replaced" if path in old else "written"
            for path, text in texts.items()}


# ----------------------------------------------------------------------------- tokenizer and model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                 # role names left out: short prompts
                 "{% if add_generation_prompt %}<|im_start|>{% endif %}")


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
    config = Qwen3Config(vocab_size=128, hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=hidden // 4, max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.fill_(2.5)
            layer.self_attn.k_norm.weight.fill_(2.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def load_base(world, path: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path or world.BASE)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no {world.NAME} base at {path}: run `python compare.py pretrain --world "
                                f"{world.NAME}` to build it")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


# ----------------------------------------------------------------------------- measuring a model in a world

class Forbid:
    """A logits processor that keeps `word` from being written: whenever the text so far ends with a proper
    prefix of " " + word (the empty prefix after a space included), the word's next token is banned. HF's
    bad_words_ids bans only the last token of a sequence, which lets a character-level model write "wai" and
    carry on reflecting; banning from the word's first token keeps it from starting."""

    def __init__(self, tok, word: str):
        self.ids = tok(" " + word, add_special_tokens=False)["input_ids"]

    def __call__(self, input_ids, scores):
        for i, row in enumerate(input_ids[:, 1 - len(self.ids):].tolist()):  # the tail a prefix can end in
            for k in range(1, len(self.ids)):  # the row ends with the first k tokens of " word"
                if row[-k:] == self.ids[:k]:
                    scores[i, self.ids[k]] = -float("inf")
        return scores


def sample_texts(world, model, tok, prompts: list[str], seed: int = 0, batch_size: int = 256,
                 max_new_tokens: int | None = None, forbid: str | None = None, engine: str = "static",
                 temperature: float = 1.0) -> tuple[list[str], int]:
    """One completion per prompt (at temperature 1 unless told): (texts, completion tokens in all). engine:
    engines.hf's generate (HF's); static gives dynamic's very samples here, faster
    (tests/test_toyworld.py)."""
    from transformers import LogitsProcessorList
    from engines.hf import generate
    from rollout import chat_ids
    ids = [chat_ids(tok, p, False) for p in prompts]
    processors = LogitsProcessorList([Forbid(tok, forbid)]) if forbid else None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        got = generate(model, tok, ids, n=1, max_new_tokens=max_new_tokens or world.MAX_NEW_TOKENS,
                       temperature=temperature, top_p=1.0, top_k=0, eos_ids=[tok.eos_token_id],
                       batch_size=batch_size,
                       device=next(model.parameters()).device, logits_processor=processors, engine=engine)
    return got.texts, int(got.mask.sum())


def measure(world, model, tok, questions: list[str], role: str = "student", reference: str = "full",
            seed: int = 0, batch_size: int = 256, forbid: str | None = None,
            temperature: float = 1.0) -> dict:
    """Sample one completion per question in one context (temperature 1 unless told) and check it:
    summarize() metrics; for a world that names its roles, also "role_errors": {role: the rate at which
    wrong outcomes are written there}."""
    template = world.TEMPLATES[f"{role}_template"]
    prompts = [fill_prompt(template, q, world.references(q)[reference]) for q in questions]
    texts, tokens = sample_texts(world, model, tok, prompts, seed, batch_size, forbid=forbid,
                                 temperature=temperature)
    out = summarize([world.check(q, t) for q, t in zip(questions, texts)], tokens)
    if hasattr(world, "roles"):
        counts = {r: [0, 0] for r in world.ROLES}
        for q, t in zip(questions, texts):
            for r in world.roles(q, t):
                counts[r.role][0] += not r.met(t[r.at])
                counts[r.role][1] += 1
        out["role_errors"] = {r: w / n if n else None for r, (w, n) in counts.items()}
    return out


def held_out(world, n: int) -> list[str]:
    """The first n questions of the world's test.jsonl: the held-out questions every measurement uses."""
    path = world.DATA / "test.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    if n > len(rows):
        raise ValueError(f"{n} held-out questions asked, {path} has {len(rows)}")
    return [r["question"] for r in rows[:n]]


def measure_contexts(world, model, tok, n: int = 400, seed: int = 0) -> dict:
    """World metrics of every context on n held-out questions (one sample each, temperature 1)."""
    qs = held_out(world, n)
    return {"student": measure(world, model, tok, qs, seed=seed),
            **{f"{role}_{ref}": measure(world, model, tok, qs, role, ref, seed=seed)
               for role in ("teacher", "refonly") for ref in ("full", "sketch")}}


def gates(world, measured: dict) -> list[dict]:
    """Each gate (name, how its value comes from the measurements, threshold[, "≤"]; a lower bound unless
    "≤"), measured and judged."""
    rows = []
    for name, get, t, *bound in world.GATES:
        if bound not in ([], ["≤"]):
            raise ValueError(f"{world.NAME}.GATES, {name!r}: the fourth element is '≤' or absent, "
                             f"not {bound}")
        upper = bound == ["≤"]
        value = get(measured)
        rows.append({"gate": name, "value": value, "threshold": t, "bound": "≤" if upper else "≥",
                     "passed": value <= t if upper else value >= t})
    return rows


# ----------------------------------------------------------------------------- pre-training

def batch_tensors(docs: list[tuple[str, str | list]], tok):
    """Right-padded ids [B, T], attention mask [B, T] and labels [B, T] (-100 outside the completions). A
    completion is a string, or a list of (text, trained) pieces: an untrained piece is read, never learned."""
    from rollout import chat_ids
    rows = []
    for prompt, completion in docs:
        p = chat_ids(tok, prompt, False)
        ids, labels = list(p), [-100] * len(p)
        for text, trained in ([(completion, True)] if isinstance(completion, str) else completion):
            piece = tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [-100] * len(piece)
        rows.append((ids + [tok.eos_token_id], labels + [tok.eos_token_id]))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)  # [B, T]
    labels = torch.full((len(rows), width), -100)  # [B, T]
    attn = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], attn[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, attn, labels


def train_lm(model, tok, documents, out: Path, steps: int, *, batch_size: int, lr: float, warmup: int,
             evaluate, eval_every: int, label: str = "pre-training", quiet: bool = False,
             log: list | None = None, stop=None, stop_every: int = 100):
    """Next-token training on documents(k) → k (prompt, completion) pairs, loss on completions only, AdamW
    with warm-up and a cosine to 10% of lr. Every eval_every steps (and at the end) evaluate(model) → dict is
    logged with the mean loss, appended to out/pretrain_log.jsonl, and the model saved to out (an interrupted
    run leaves a usable base). stop(model) → bool, asked every stop_every steps, ends training early (the end:
    an evaluation and a save). Deterministic for the documents' seed, the torch seed and the thread count."""
    from rich.progress import Progress
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))
    out.mkdir(parents=True, exist_ok=True)
    log, losses, t0 = log if log is not None else [], [], time.time()
    offset = log[-1]["step"] if log else 0  # a later stage continues the step count
    with Progress(disable=quiet, transient=True) as bar:
        task = bar.add_task(label, total=steps)
        for step in range(1, steps + 1):
            model.train()
            ids, attn, labels = batch_tensors(documents(batch_size), tok)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.advance(task)
            done = step == steps or (stop is not None and step % stop_every == 0 and stop(model.eval()))
            if step % eval_every == 0 or done:
                model.eval()
                row = {"step": offset + step, "stage": label, "loss": sum(losses) / len(losses),
                       "minutes": (time.time() - t0) / 60, **evaluate(model)}
                losses = []
                log.append(row)
                s = row["student"]
                bar.console.print(f"{label} step {step}  loss {row['loss']:.4f}  student acc "
                                  f"{s['accuracy']:.3f}  errors {s['first_try_errors']:.2f}  caught "
                                  f"{s['caught_frac']:.2f}  P(wait|wrong) {s['p_wait_wrong']:.2f}  "
                                  f"P(wait|right) {s['p_wait_right']:.2f}  {row['minutes']:.1f} min")
                write_jsonl(out / "pretrain_log.jsonl", log)
                model.save_pretrained(out)
                tok.save_pretrained(out)
            if done:
                break
    return log


def continue_lm(world, out: Path, seed: int, quiet: bool, base: Path, settings: dict, document) -> tuple:
    """Continued pre-training of the base in `base` on document(rng) → (prompt, completion) pairs, one cosine
    schedule (settings: steps, batch_size, lr, warmup; eval_every, eval_samples), deterministic for a seed and
    thread count: the model, its tokenizer, the world's prompt settings and the curve (pretrain_log.jsonl) go
    to `out`. Returns (model, tokenizer, log)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"no base to continue {world.NAME}'s pre-training from at {base} (--from; "
                                f"the default is the shipped world-one base, {world.FROM})")
    s = {"eval_every": 250, "eval_samples": 100} | settings
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    questions = held_out(world, s["eval_samples"])
    out.mkdir(parents=True, exist_ok=True)
    save_prompts(world, out)

    def evaluate(m):
        half = questions[:len(questions) // 2]
        return {"student": measure(world, m, tok, questions),
                "teacher_full": measure(world, m, tok, half, "teacher", "full"),
                "teacher_sketch": measure(world, m, tok, half, "teacher", "sketch")}
    log = train_lm(model, tok, lambda k: [document(rng) for _ in range(k)], out, s["steps"],
                   batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"], evaluate=evaluate,
                   eval_every=s["eval_every"], label="continued pre-training", quiet=quiet)
    return model, tok, log
