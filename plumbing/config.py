"""config.py: popsd's one Config, recipes that override it, and the checks that stop a run that would be
wasted.

    cfg = make_config("tiny", ["steps=3", "lr=1e-4"])   # defaults ← recipes/tiny.py ← key=value overrides

A recipe (recipes/<name>.py) is Python: `key = value` lines, executed with runpy. It is code, like any
script you download: read it before you run it. Unknown keys and wrong types are errors that name the
key and the nearest valid one; `validate` rejects values that would make a run silently useless.
"""
import dataclasses
import difflib
import math
import os
import re
import runpy
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

import loss
import worlds
from plumbing import trackers
from plumbing.data import PopsdError
from rollout import PROMPTS, check_templates

ROOT = Path(__file__).resolve().parent.parent  # the repository


@dataclass
class Config:
    # model
    model: str = "Qwen/Qwen3-8B"  # HF id or local dir; "tiny" builds a random-init tiny Qwen3 from the data
    trust_remote_code: bool = False  # run code shipped with hub models (off: safer)
    dtype: str = "bf16"  # bf16 | fp32: weights and activations
    load_in_4bit: bool = False  # QLoRA: nf4 weights, double quantisation, bf16 compute (bitsandbytes)
    gradient_checkpointing: bool = True  # recompute activations in the student backward (off while sampling)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    lora_r: int = 64  # LoRA rank (paper: 64)
    lora_alpha: int = 128  # LoRA alpha (paper: 128)
    lora_dropout: float = 0.0  # LoRA dropout
    lora_targets: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    # data
    data: str = "siyanzhao/Openthoughts_math_30k_opsd"  # hub dataset id, or a local .jsonl/.json/.parquet
    data_split: str = "train"  # split of a hub dataset
    question_field: str = "problem"  # field holding the question q
    reference_field: str = "solution"  # field holding the reference solution r
    skip_bad_rows: bool = False  # skip (and count) rows with a missing/empty field instead of stopping
    max_prompt_len: int = 4096  # rows whose longest context is longer (tokens) are skipped and counted
    # prompts: {question} and {reference} are replaced; thinking mode is passed to the chat template
    prompts: str = "popsd"  # template preset (rollout.PROMPTS): popsd (ours) | opsd_wording (the OPSD
        # code's teacher wording; any method can use it)
    student_template: str = ""  # student and clean base ("": the preset's)
    teacher_template: str = ""  # teacher: question + reference ("": the preset's)
    refonly_template: str = ""  # reference-only teacher: no question ("": the preset's)
    student_thinking: bool = True  # enable_thinking for the student and clean base (the paper's models think)
    teacher_thinking: bool = True  # enable_thinking for the teacher and reference-only contexts
    # sampling
    n_samples: int = 1  # rollouts per prompt (paper: 1)
    max_new_tokens: int = 1024  # completion budget (paper: 1024)
    temperature: float = 1.1  # sampling temperature
    top_p: float = 0.95  # nucleus sampling
    top_k: int = 20  # top-k sampling (0: off)
    gen_batch_size: int = 32  # sequences per generate call
    rollout_engine: str = "dynamic"  # dynamic | static: HF generate, KV cache grown | preallocated;
        # vllm: vLLM in this process; graph: a static KV cache, the decoding step replayed as a CUDA graph
        # (engines/: the table)
    graph_keep_rows: bool = True  # graph: step every row to the end (seeded samples = dynamic's);
        # false: halve the batch as rows finish (eager: grow its cache)
    graph_kv_gb: float = 0.0  # graph: GiB its KV caches may hold (0: 25% of the GPU's free memory; CPU: 8)
    rollout_server: str = ""  # URL[,URL...]: vLLM servers sample instead (docs/engines.md has the command);
        # on the command line it replaces a recipe's rollout_engine=graph or vllm (both there: an error)
    rollout_adapter_dir: str = ""  # where servers read each step's adapter ("": <out_dir>/rollout_adapters)
    rollout_concurrency: int = 16  # requests in flight per rollout server
    rollout_ahead: int = 0  # 1: the servers sample step t+1 while step t trains, from weights one step old
        # (policy_lag 1; engines/ahead.py, docs/engines.md); 0: every step samples from the student it trains
    server_timeout: float = 30.0  # seconds a rollout server may leave a connection, /v1/models, /health or
        # an adapter load unanswered before popsd gives up on it (a completion may take longer: /health is
        # probed meanwhile)
    vllm_gpu_memory: float = 0.3  # rollout_engine=vllm on a GPU: the card's share vLLM takes while sampling
    vllm_kv_cache_gb: float = 0.0  # vLLM's KV cache in GiB (0: from vllm_gpu_memory on a GPU, 1 GiB on a CPU)
    vllm_enforce_eager: bool = False  # vLLM on a GPU without CUDA graphs (starts faster; CPU: always eager)
    sample_gathered: bool = True  # FSDP: gather the weights once per generate call (each GPU: all of them)
    sampler_gap_warn: float = 0.05  # a mean |log p_engine − log p_student| per token above it warns each step
    sampler_gap_stop: float = 0.5  # ... above it the run stops: the engine is not sampling from the student
    # algorithm
    method: str = "purified"  # purified (PMI target) | opsd (target = teacher)
    teacher: str = "frozen"  # frozen (LoRA disabled) | live (current weights, detached) | ema (an EMA of the
        # LoRA: ema.py)
    ema_rate: float = 0.05  # teacher=ema: θ_T ← (1 − rate)·θ_T + rate·θ per step (TRL's 0.05; OPSD's decay
        # 0.999 is 0.001)
    divergence: str = "jsd"  # jsd | forward_kl | reverse_kl
    jsd_mix: float = 0.5  # b: the generalized JSD's mixture weight of the target, M = b·P + (1 − b)·π_θ
    beta: float = 1.0  # β: KL strength of the PMI target
    pmi_clip: float | None = 10.0  # c: soft clip c·tanh(·/c) of the centred PMI Δ_it (none: no clip)
    loss_temperature: float | None = None  # τ dividing all logits in the loss (none: sampling temperature)
    term_clamp: float | None = None  # cap each (token, vocab entry) term of D before summing (OPSD: 0.05)
    support: str = "full"  # full (every vocab entry) | topk (the target's top-k) | sampled (ŷ_t: reverse_kl)
    topk: int = 100  # support=topk: entries per position (TRL's default; the toy recipes 16 of 128)
    topk_tail: bool = False  # support=topk: a bucket for the rest of each side's mass (else renormalised)
    diagnostics: bool = True  # also run the reference-only pass under opsd, to log the signal cosines
    loss_impl: str = "fused"  # fused (chunked, memory flat in N) | reference (materialised logits, readable)
    loss_chunk_mb: int = 512  # fused: memory for one chunk's [tokens, V] float32 buffers
    loss_compile: str = "auto"  # fused, support=full: torch.compile the chunk's elementwise math (auto: CUDA)
    # optimisation
    steps: int = 200  # optimizer steps
    batch_size: int = 32  # prompts per optimizer step
    micro_batch_size: int = 4  # sequences per forward/backward
    lr: float = 5e-6  # AdamW learning rate
    lr_schedule: str = "constant"  # constant | cosine (to 0), after linear warm-up
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.0  # AdamW weight decay
    optim: str = "adamw"  # adamw | paged_adamw_8bit (bitsandbytes: 8-bit states, paged out under pressure)
    max_grad_norm: float = 0.1  # gradient-norm clip (OPSD: 0.1)
    seed: int = 0  # seeds data order, LoRA init and sampling
    # evaluation (eval.py) on held-out benchmarks: before step 1, every eval_every steps and at the end
    eval_every: int = 0  # steps between evaluations (0: off); logged as eval/<bench>/avg@<n> etc.
    eval_bench: str = "aime24,aime25,hmmt25"  # benchmarks (eval.BENCHMARKS) or local files, comma-separated
    eval_fields: str = "problem,answer"  # question and gold-answer fields of local benchmark files
    eval_n: int = 12  # samples per question (paper: avg@12)
    eval_limit: int = 0  # first K questions per benchmark (0: all)
    eval_max_new_tokens: int = 32768  # completion budget at evaluation
    eval_temperature: float = 0.6  # sampling temperature at evaluation
    eval_top_p: float = 0.95  # nucleus sampling at evaluation
    eval_grader: str = "math"  # math (math-verify on the last \boxed{}) | a world's name (its exact checker)
    # run
    recipe: str = ""  # set by --recipe
    out_dir: str = ""  # run folder (default runs/<recipe>)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints that keep their resume state (every adapter is kept)
    resume: bool = False  # continue the run in out_dir from its newest good checkpoint (config checked first)
    resume_data_changed: bool = False  # resume=true on training rows that changed since the run started
        # (refused without it: the data order is a cursor into them); sessions.jsonl records the change
    overwrite: bool = False  # replace the run in out_dir (without it, a folder holding a run is refused)
    samples_per_step: int = 2  # completions written to samples.txt each step
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is often fastest for tiny models
    report_to: str = "none"  # none | tensorboard | wandb (comma-separated for both): metrics to a tracker too


CHOICES = {"loss_impl": ("fused", "reference"), "loss_compile": ("auto", "on", "off"),
           "dtype": ("bf16", "fp32"), "method": ("purified", "opsd"),
           "teacher": ("frozen", "live", "ema"), "divergence": loss.KINDS, "support": loss.SUPPORTS,
           "lr_schedule": ("constant", "cosine"), "optim": ("adamw", "paged_adamw_8bit"),
           "eval_grader": ("math", *worlds.NAMES), "prompts": tuple(PROMPTS),
           "rollout_engine": ("dynamic", "static", "graph", "vllm")}
TEMPLATE_KEYS = ("student_template", "teacher_template", "refonly_template")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------- config

def coerce(key: str, value, typ, text: bool):
    """A CLI string (text=True) or a recipe's Python value → the field's type, or a PopsdError naming the
    key."""
    if isinstance(typ, types.UnionType):  # X | None
        if value is None or (text and value.lower() in ("none", "null")):
            return None
        typ = next(t for t in typ.__args__ if t is not type(None))
    try:
        if text and typ is not str:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return typ(value)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not typ:
            raise ValueError
        return value
    except ValueError:
        raise PopsdError(f"config key {key!r} expects {typ.__name__}, got {value!r}") from None


# old name: new (2026-12), so that no two knobs share a name (β of the PMI target; the JSD's b; c, the
# per-term cap and max_grad_norm were three clips)
RENAMED = {"jsd_beta": "jsd_mix", "clip": "pmi_clip", "token_clip": "term_clamp"}
# key: {old value: new} (2026-12: prompts=opsd read as if it were method=opsd)
RENAMED_VALUES = {"prompts": {"opsd": "opsd_wording"}}


def current_names(saved: dict) -> dict:
    """A saved config's keys and values under their current names (a run saved before a rename)."""
    named = {RENAMED.get(k, k): v for k, v in saved.items()}
    return {k: RENAMED_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in named.items()}


def current_name(key: str) -> str:
    """A renamed key's new name, with a one-line note (the old name keeps working for now)."""
    if key in RENAMED:
        print(f"note: config key {key!r} is now {RENAMED[key]!r} (the old name still works, for now)",
              file=sys.stderr)
    return RENAMED.get(key, key)


def set_field(cfg: Config, key: str, value, text: bool = False):
    key = current_name(key)
    if key not in FIELDS:
        near = difflib.get_close_matches(key, FIELDS, n=1)
        raise PopsdError(f"unknown config key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    value = coerce(key, value, FIELDS[key].type, text)
    if isinstance(value, str) and value in RENAMED_VALUES.get(key, {}):
        new = RENAMED_VALUES[key][value]
        print(f"note: {key}={value} is now {key}={new} (the old value still works, for now)", file=sys.stderr)
        value = new
    setattr(cfg, key, value)


def load_recipe(name: str) -> dict:
    path = Path(name) if name.endswith(".py") else ROOT / "recipes" / f"{name}.py"
    if not path.exists():
        known = sorted(p.stem for p in (ROOT / "recipes").glob("*.py"))
        raise PopsdError(f"recipe {name!r} not found at {path} (recipes: {', '.join(known)})")
    values = runpy.run_path(str(path))
    return {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def make_config(recipe: str = "", overrides: list[str] = ()) -> Config:
    """Defaults ← recipes/<recipe>.py ← key=value overrides, each checked against the Config fields."""
    cfg = Config(recipe=recipe)
    for key, value in (load_recipe(recipe) if recipe else {}).items():
        set_field(cfg, key, value)
    seen = set()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise PopsdError(f"expected key=value, got {item!r}")
        if key.strip() == "recipe":  # a key=value would only relabel the run: the recipe's values are read
            raise PopsdError(f"{item!r}: a recipe is chosen with --recipe {value.strip() or 'NAME'}, before "
                             "any key=value (recipe is the run's label of it, not a setting)")
        if RENAMED.get(key.strip(), key.strip()) in seen:
            raise PopsdError(f"config key {key.strip()!r} is given twice: which one did you mean?")
        seen.add(RENAMED.get(key.strip(), key.strip()))
        set_field(cfg, key.strip(), value, text=True)
    if "rollout_server" in seen and "rollout_engine" not in seen and cfg.rollout_engine in ("vllm", "graph"):
        # servers asked for here replace the recipe's in-process sampler
        cfg.rollout_engine = Config.rollout_engine
    validate(cfg)
    return cfg


POSITIVE = ("lr", "temperature", "beta", "max_grad_norm", "lora_alpha", "eval_temperature",
            "sampler_gap_warn",
            "sampler_gap_stop", "server_timeout")  # > 0, or nothing trains
AT_LEAST_1 = ("steps", "batch_size", "micro_batch_size", "n_samples", "max_new_tokens", "gen_batch_size",
              "max_prompt_len", "lora_r", "eval_n", "eval_max_new_tokens", "keep_checkpoints",
              "rollout_concurrency", "topk")
NOT_NEGATIVE = ("top_k", "warmup_steps", "weight_decay", "save_every", "eval_every", "eval_limit",
                # loss_chunk_mb=0: one token per chunk
                "samples_per_step", "threads", "loss_chunk_mb", "vllm_kv_cache_gb")
POSITIVE_OR_NONE = ("pmi_clip", "loss_temperature", "term_clamp")


def validate(cfg: Config):
    """Rejects values that would crash a run late or make it silently useless, naming the key; fills in the
    prompt templates from the preset and the run folder."""
    def fail(key, why):
        raise PopsdError(f"config key {key!r} {why}, got {getattr(cfg, key)!r}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            fail(key, f"must be one of {allowed}")
    trackers.names(cfg.report_to)
    for keys, ok, why in ((AT_LEAST_1, lambda v: v >= 1, "must be at least 1"),
                          (POSITIVE, lambda v: v > 0, "must be > 0"),
                          (NOT_NEGATIVE, lambda v: v >= 0, "must be >= 0"),
                          (POSITIVE_OR_NONE, lambda v: v is None or v > 0, "must be > 0 (or none: off)")):
        for key in keys:
            value = getattr(cfg, key)
            if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
                fail(key, why)
    if not 0 <= cfg.seed < 2 ** 63:
        fail("seed", "must be between 0 and 2**63 - 1")
    if cfg.threads > (os.cpu_count() or 1):
        fail("threads", f"must be at most this machine's {os.cpu_count()} cores (0: torch's default)")
    for key in ("top_p", "eval_top_p"):
        if not 0 < getattr(cfg, key) <= 1:
            fail(key, "must be in (0, 1]")
    if cfg.sampler_gap_stop < cfg.sampler_gap_warn:
        fail("sampler_gap_stop", f"must be at least sampler_gap_warn ({cfg.sampler_gap_warn})")
    if not 0 < cfg.vllm_gpu_memory <= 1:
        fail("vllm_gpu_memory", "must be in (0, 1]")
    if cfg.rollout_ahead not in (0, 1):
        fail("rollout_ahead", "must be 0 (synchronous) or 1 (one step ahead)")
    if cfg.rollout_ahead and not cfg.rollout_server:
        fail("rollout_ahead", "needs rollout_server=URL,...: an in-process engine samples with the weights "
             "being trained (hf, graph) or on this process's device (vllm), so there is nothing to overlap")
    if cfg.rollout_server and cfg.rollout_engine in ("vllm", "graph"):
        fail("rollout_server", f"and rollout_engine={cfg.rollout_engine} both name the sampler: keep one")
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except RuntimeError:
            fail("device", "must be auto, cpu, cuda or cuda:N")
    if cfg.graph_kv_gb < 0:
        fail("graph_kv_gb", "must be ≥ 0 (0: a quarter of the GPU's free memory)")
    for url in filter(None, (u.strip() for u in cfg.rollout_server.split(","))):
        if not re.match(r"^https?://[^/\s]+", url):
            fail("rollout_server", f"holds {url!r}, not an http(s)://host:port address")
    if not 0 <= cfg.lora_dropout < 1:
        fail("lora_dropout", "must be in [0, 1)")
    if not 0 < cfg.ema_rate <= 1:
        fail("ema_rate", "must be in (0, 1]")
    if cfg.support == "sampled" and (cfg.divergence != "reverse_kl" or cfg.term_clamp is not None):
        fail("support", "is the sampled-token estimator of reverse KL: it needs divergence=reverse_kl and no "
             f"term_clamp (got divergence={cfg.divergence}, term_clamp={cfg.term_clamp})")
    if cfg.support == "topk" and cfg.topk == 1 and not cfg.topk_tail:
        fail("topk", "must be at least 2 with support=topk and topk_tail=false: both sides renormalised on "
             "one token are 1, so the loss is exactly 0 and nothing trains (or set topk_tail=true)")
    if cfg.eval_every and not cfg.eval_bench.strip(", "):
        fail("eval_bench", f"names no benchmark while eval_every={cfg.eval_every} asks for evaluations: name "
             "one (a local file or one of eval.BENCHMARKS), or set eval_every=0 to train without")
    if cfg.divergence == "jsd" and not 0 < cfg.jsd_mix < 1:
        fail("jsd_mix", "must be in (0, 1) for divergence=jsd: at 0 or 1 the JSD is 0 and nothing trains "
             "(use divergence=forward_kl for KL(target||student) or divergence=reverse_kl for "
             "KL(student||target))")
    for key in ("model", "data", "question_field", "reference_field", "lora_targets"):
        if not getattr(cfg, key).strip():
            fail(key, "must not be empty")
    preset = PROMPTS[cfg.prompts]
    for key, text in zip(TEMPLATE_KEYS, preset):
        setattr(cfg, key, getattr(cfg, key) or text)
    try:
        check_templates(cfg.student_template, cfg.teacher_template, cfg.refonly_template)
    except ValueError as e:
        raise PopsdError(str(e)) from None
    if len(cfg.eval_fields.split(",")) != 2:
        fail("eval_fields", "must be 'question_field,answer_field'")
    # out_dir=~/x: the real folder
    cfg.out_dir = os.path.expanduser(cfg.out_dir or f"runs/{cfg.recipe or 'default'}")


def derived_sizes(cfg: Config, n_examples: int) -> dict:
    seqs = cfg.batch_size * cfg.n_samples
    return {"prompts per step": cfg.batch_size, "sequences per step": seqs,
            "micro-batches per step": math.ceil(seqs / cfg.micro_batch_size), "total steps": cfg.steps,
            "usable prompts": n_examples, "epochs": round(cfg.steps * cfg.batch_size / max(n_examples, 1), 2)}


def print_config(cfg: Config, sizes: dict, console):
    """The fields this run sets away from the defaults, and the derived sizes (all of it is in
    config.json)."""
    table = Table(title=f"popsd config (recipe: {cfg.recipe or 'none'}); every field in config.json",
                  show_header=False, box=None)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # long paths wrap, never truncate
    defaults = validated(Config())
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name) and f.name not in ("recipe", "out_dir") + TEMPLATE_KEYS:
            table.add_row(f.name, repr(value))
    for key in TEMPLATE_KEYS:  # long: shown only when not the preset's
        if getattr(cfg, key) != PROMPTS[cfg.prompts][TEMPLATE_KEYS.index(key)]:
            table.add_row(key, repr(getattr(cfg, key))[:60] + "...")
    table.add_row("out_dir", cfg.out_dir)
    for k, v in sizes.items():
        table.add_row(f"[cyan]{k}[/]", f"[cyan]{v}[/]")
    console.print(table)


def validated(cfg: Config) -> Config:
    validate(cfg)
    return cfg


def field_docs() -> list[tuple[str, str, str, str]]:
    """(name, type, default, comment) of every Config field, the comment read from this file's source."""
    import inspect
    comments, name = {}, None
    for line in inspect.getsource(Config).splitlines():  # a field's comment goes on in lines indented deeper
        field = re.match(r"^    (\w+): [^=]+=.*?#\s*(.*)$", line)
        more = re.match(r"^        #\s*(.*)$", line)
        if field:
            name, comments[field[1]] = field[1], field[2]
        elif more and name:
            comments[name] += " " + more[1]
        else:
            name = None
    return [(f.name, getattr(f.type, "__name__", str(f.type)), repr(f.default), comments.get(f.name, ""))
            for f in dataclasses.fields(Config)]


def recipe_list() -> list[tuple[str, str]]:
    """(name, first docstring line after the name) of every recipe in recipes/."""
    out = []
    for path in sorted((ROOT / "recipes").glob("*.py")):
        doc = (path.read_text().split('"""') + ["", ""])[1].strip().splitlines()
        out.append((path.stem, doc[0].split(":", 1)[-1].strip() if doc else ""))
    return out


# ----------------------------------------------------------------------------- command line

def usage(doc: str) -> str:
    """--help: the script's docstring, every recipe with its first line, every field's type, default and
    comment."""
    recipes = "\n".join(f"  {name:<22}{line}" for name, line in recipe_list())
    fields = "\n".join(f"  {name}: {kind} = {default}{f'  # {comment}' if comment else ''}"
                       for name, kind, default, comment in field_docs())
    return (f"{doc}\nRecipes (recipes/*.py: each is Python that popsd executes: read one you downloaded "
            f"before running it):\n{recipes}\n\nConfig fields (key=value):\n{fields}\n")


def from_command_line(argv: list[str], doc: str) -> Config:
    """popsd.py's arguments: `--recipe NAME` (or --recipe=NAME) and key=value overrides, as a checked
    Config. No arguments print a short usage and exit 2; -h or --help anywhere prints every recipe and
    field and exits 0."""
    if not argv:
        print(usage(doc).split("\nConfig fields")[0] + "\nAll fields: python popsd.py --help")
        sys.exit(2)
    if "-h" in argv or "--help" in argv:
        print(usage(doc))
        sys.exit(0)
    recipe, overrides, i = "", [], 0
    while i < len(argv):
        if argv[i] == "--recipe":
            recipe, i = argv[i + 1] if i + 1 < len(argv) else "", i + 2
            continue
        if argv[i].startswith("--recipe="):
            recipe = argv[i].split("=", 1)[1]
        else:
            overrides.append(argv[i])
        i += 1
    return make_config(recipe, overrides)
