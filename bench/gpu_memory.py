"""bench/gpu_memory.py: time and peak GPU memory of complete popsd training steps on real-size architectures.

    python bench/gpu_memory.py                                        # CUDA: 4 models × {1024, 4096, 8192}
    python bench/gpu_memory.py --models qwen3_8b --lengths 1024 gradient_checkpointing=false
    python bench/gpu_memory.py --cpu-test                             # scaled-down architectures on the CPU

Each architecture is built from its published config values (bench/configs/*.json) with random
weights, saved, and loaded by popsd's own `load_model` under the single_gpu recipe (nf4 4-bit,
LoRA r64, gradient checkpointing, fused loss, paged 8-bit AdamW, micro-batch 1); trailing
key=value arguments override recipe fields, to measure what each choice buys. A step is the
loop's: sample (forced to the full length), the three frozen passes (score), the student forward
and backward through the loss (loss+backward), clip and optimizer step (step). The second of two
steps is reported (the first warms up): seconds and peak GPU memory, allocated and reserved, per phase.
--synthetic skips sampling: the completions are random token ids of the given length (scoring and the update
do not care how the tokens were sampled), so the update phase's memory never waits on sampling; --cap-gib 24
limits the card to 24 GiB (torch.cuda.set_per_process_memory_fraction), so "fits on 24 GB" is measured.
--estimate computes instead of measuring (no GPU, no model): the update phase's peak allocated memory from the
architecture's config values and the recipe's sizes, term by term (estimate()); its rows are labelled
computed. Prints a table and one JSON line per row.
"""
import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import models  # noqa: E402
import popsd  # noqa: E402
from plumbing.config import make_config  # noqa: E402
import rollout  # noqa: E402
from plumbing.data import build_tiny_model  # noqa: E402
from engines.hf import generate  # noqa: E402
from rollout import Contexts, Rollout  # noqa: E402

MODELS = ("qwen3_8b", "qwen3_4b", "r1_distill_qwen_7b", "qwen3_1_7b")
SCALED_DOWN = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8,
               # --cpu-test: same code paths, tiny sizes (each layer at
               "num_key_value_heads": 4, "head_dim": 16}
# least 64 wide: the recipe's LoRA rank 64 must fit every layer it adapts)
PHASES = ("sample", "score", "loss+backward", "step")
GiB = 2 ** 30


def build(name: str, where: Path, scaled_down: bool, device: torch.device,
          overrides: dict | None = None) -> Path:
    """Random weights in the published architecture, saved with a small BPE tokenizer (ids < 512); a folder
    already built there is reused. overrides: config values on top (bench/rollout.py: head_dim 32 for
    vLLM)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    values = {k: v for k, v in json.loads((ROOT / "bench/configs" / f"{name}.json").read_text()).items()
              if not k.startswith("_")}
    extra = (SCALED_DOWN if scaled_down else {}) | (overrides or {})
    config = AutoConfig.for_model(**(values | extra))
    path = where / (name + "".join(f"_{k}{v}" for k, v in (overrides or {}).items()))
    if (path / "tokenizer_config.json").exists():  # written last: the build finished
        return path
    tok_dir = build_tiny_model(where / "tokenizer", [rollout.STUDENT_TEMPLATE, rollout.TEACHER_TEMPLATE] * 8)
    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 8B
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    for f in tok_dir.iterdir():
        if "token" in f.name or f.name == "chat_template.jinja":
            shutil.copy(f, path / f.name)
    return path


def synthetic_contexts(n: int, prompt_len: int, reference_len: int, vocab: int) -> list[Contexts]:
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(10, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [Contexts(student=ids(prompt_len), teacher=ids(prompt_len + reference_len),
                     refonly=ids(reference_len))
            for _ in range(n)]


def synthetic_rollout(contexts: list[Contexts], length: int, vocab: int) -> Rollout:
    """Random completions of exactly `length` tokens (no EOS: truncated), as if sampled."""
    g = torch.Generator().manual_seed(1)
    completions = torch.randint(10, vocab, (len(contexts), length), generator=g)
    return Rollout(completions, torch.ones_like(completions, dtype=torch.bool),
                   torch.ones(len(contexts), dtype=torch.bool), [""] * len(contexts), contexts=contexts)


class Phases:
    """Seconds and peak memory per phase; a phase entered many times (micro-batches) keeps its max peak."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        zero = 0.0 if self.cuda else None  # no GPU memory to report on the CPU
        self.rows = {p: {"s": 0.0, "alloc_gib": zero, "reserved_gib": zero} for p in PHASES}

    @contextlib.contextmanager
    def __call__(self, phase):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        yield
        row = self.rows[phase]
        if self.cuda:
            torch.cuda.synchronize()
            row["alloc_gib"] = max(row["alloc_gib"], torch.cuda.max_memory_allocated() / GiB)
            row["reserved_gib"] = max(row["reserved_gib"], torch.cuda.max_memory_reserved() / GiB)
        row["s"] += time.time() - t0


def load(path: Path, args, overrides: list[str]):
    """The single_gpu recipe's model, optimizer and synthetic prompts: loaded once per model, for every
    length."""
    cfg = make_config("single_gpu", [f"out_dir={path}_run", *(["device=cpu"] if args.cpu_test else []),
                                           *overrides])
    device = models.pick_device(cfg.device)
    torch.manual_seed(0)
    tokenizer, model = models.load_model(cfg, device, str(path))
    params = [p for p in model.parameters() if p.requires_grad]
    contexts = synthetic_contexts(args.batch, args.prompt_len, args.reference_len, len(tokenizer))
    return cfg, device, tokenizer, model, params, models.make_optimizer(cfg, params), contexts


def measure(path: Path, length: int, args, loaded) -> dict:
    cfg, device, tokenizer, model, params, optimizer, contexts = loaded
    body, head = models.model_parts(model)
    pad_id = tokenizer.pad_token_id
    for _ in range(args.steps):  # warm-up step(s), then the measured one
        ph = Phases(device)
        if args.synthetic:
            rollout = synthetic_rollout(contexts, length, len(tokenizer))
        else:
            with ph("sample"):
                rollout = generate(model, tokenizer, [c.student for c in contexts], n=1,
                                   max_new_tokens=length, min_new_tokens=length, temperature=cfg.temperature,
                                   top_p=cfg.top_p, top_k=cfg.top_k, eos_ids=[pad_id],
                                   batch_size=cfg.gen_batch_size, device=device)
                rollout.contexts = contexts
                if device.type == "cuda" and not args.keep_cache:
                    torch.cuda.empty_cache()
        n_tokens = int(rollout.mask.sum())
        for i in range(0, len(rollout), cfg.micro_batch_size):
            part = rollout.select(slice(i, i + cfg.micro_batch_size))
            with ph("score"):
                frozen = popsd.frozen_passes(model, body, part, cfg, pad_id)
            with ph("loss+backward"):
                loss, _ = popsd.student_loss(model, body, head, part, frozen, cfg, pad_id)
                (loss / n_tokens).backward()
            del frozen, loss
        with ph("step"):
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = max(r["reserved_gib"] for r in ph.rows.values()) if device.type == "cuda" else None
    return {"model": path.name, "length": length, "completion_tokens": n_tokens, "sequences": len(rollout),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "settings": {k: getattr(cfg, k) for k in ("load_in_4bit", "gradient_checkpointing", "loss_impl",
                                                      "optim", "micro_batch_size", "gen_batch_size",
                                                      "lora_r")}
            | {"keep_cache": args.keep_cache, "prompt_len": args.prompt_len,
               "reference_len": args.reference_len, "synthetic": args.synthetic, "cap_gib": args.cap_gib},
            "phases": ph.rows, "peak_reserved_gib": peak, "step_s": sum(r["s"] for r in ph.rows.values())}


def estimate(config: dict, length: int, prompt_len: int, reference_len: int, lora_r: int = 64,
             gen_batch: int = 16, chunk_mb: int = 512) -> dict:
    """GiB of the single_gpu recipe's update phase (one sequence: micro-batch 1) and of its sampling KV cache,
    computed from the config alone. Terms (the assumptions, each a rounded model, not a measurement):
      weights       linear layers in nf4 with double quantisation (0.5 + ~0.016 bytes a parameter), embeddings
                    and the untied head in bf16 (bitsandbytes leaves them unquantised)
      lora          LoRA r on every linear layer: fp32 weights + fp32 grads + 8-bit Adam's two states
      checkpoints   gradient checkpointing keeps each layer's input [T, H] in bf16 for the student pass
      recompute     one layer's forward activations and their grads in its backward: T × (4H + 3I), bf16, × 2
      loss          the fused loss's chunk buffers (loss_chunk_mb) and five [N, H] float32 tensors (four
                    contexts'
                    hidden states and the student's gradient)
      frozen pass   the widest frozen pass (the teacher: prompt + reference + completion), one layer's
                    activations
      sample_kv     gen_batch sequences of prompt + completion in the bf16 KV cache (the sampling phase; freed
                    before the update)"""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv, d, v = (config["num_attention_heads"],
                       config.get("num_key_value_heads", config["num_attention_heads"]),
                       config.get("head_dim") or h // config["num_attention_heads"], config["vocab_size"])
    # q k v o gate up down
    shapes = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, i), (h, i), (i, h)]
    linear = n * sum(a * b for a, b in shapes)
    lora = n * sum(lora_r * (a + b) for a, b in shapes)
    student, teacher = prompt_len + length, prompt_len + reference_len + length
    out = {"weights": linear * (0.5 + 1 / 64) + v * h * 2 * (1 if config.get("tie_word_embeddings") else 2),
           "lora": lora * (4 + 4 + 2),
           "checkpoints": n * student * h * 2,
           "recompute": student * (4 * h + 3 * i) * 2 * 2,
           "loss": (chunk_mb << 20) + 5 * length * h * 4,
           "frozen pass": teacher * (4 * h + 3 * i) * 2}
    out = {k: x / GiB for k, x in out.items()}
    out["update total"] = out["weights"] + out["lora"] + out["checkpoints"] + out["loss"] + max(
        out["recompute"], out["frozen pass"])
    out["sample_kv"] = gen_batch * student * 2 * n * kv * d * 2 / GiB
    return out


def print_estimates(models, lengths, args):
    from rich.console import Console
    from rich.table import Table
    table = Table(title="computed, not measured: the single_gpu update phase, GiB (prompt "
                        f"{args.prompt_len}, reference {args.reference_len}; sampling KV for "
                        f"{args.batch} sequences)")
    for c in ("model", "tokens", "weights", "LoRA+Adam", "activations", "loss", "update", "sampling KV",
              "≤ 22?"):
        table.add_column(c, justify="right")
    for name in models:
        config = json.loads((ROOT / "bench/configs" / f"{name}.json").read_text())
        for length in lengths:
            e = estimate(config, length, args.prompt_len, args.reference_len, gen_batch=args.batch)
            row = {"bench": "gpu_memory", "computed": True, "model": name, "length": length,
                   **{k: round(x, 2) for k, x in e.items()}, "fits_22_gib": e["update total"] <= 22}
            print(json.dumps(row))
            act = e["checkpoints"] + max(e["recompute"], e["frozen pass"])
            table.add_row(name, f"{length:,}", *(f"{x:.2f}" for x in (e["weights"], e["lora"], act, e["loss"],
                                                                     e["update total"], e["sample_kv"])),
                          "yes" if row["fits_22_gib"] else "no")
    Console().print(table)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--lengths", default="1024,4096,8192",
                   help="completion lengths (sampling is forced to them)")
    p.add_argument("--batch", type=int, default=16, help="sequences per measured step (one generate call)")
    p.add_argument("--prompt-len", type=int, default=256, help="student prompt tokens")
    p.add_argument("--reference-len", type=int, default=1024,
                   help="reference solution tokens (teacher, ref-only)")
    p.add_argument("--keep-cache", action="store_true", help="skip torch.cuda.empty_cache() after sampling")
    p.add_argument("--cpu-test", action="store_true", help="scaled-down architectures on the CPU")
    p.add_argument("--synthetic", action="store_true", help="no sampling: random completions of each length "
                   "(the update phase alone; use --batch 1 or 2: the peak is per micro-batch)")
    p.add_argument("--cap-gib", type=float, default=0.0,
                   help="cap the card at this many GiB (0: no cap), so a row "
                   "that fits has fitted in that much")
    p.add_argument("--steps", type=int, default=2,
                   help="steps per row, the last measured (1: no warm-up, faster)")
    p.add_argument("--build-dir",
                   help="keep the built architectures here and reuse them (default: a temporary folder)")
    p.add_argument("--build-only", action="store_true",
                   help="build the architectures into --build-dir, then stop")
    p.add_argument("--check-args", action="store_true",
                   help="parse the arguments, print them, stop (gpu_check.sh --dry-run)")
    p.add_argument("--estimate", action="store_true",
                   help="compute the update phase's memory from the configs "
                   "(no GPU, no model): rows labelled computed")
    args, overrides = p.parse_known_args(argv)
    if args.estimate:
        return print_estimates(args.models.split(","), [int(x) for x in args.lengths.split(",")], args)
    if args.check_args:  # the overrides are recipe fields: checked by popsd's own config
        make_config("single_gpu", [*overrides, "out_dir=unused"])
        print(f"arguments ok: {vars(args)} {overrides}")
        return
    device = torch.device("cpu" if args.cpu_test else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or use --cpu-test")
    if args.cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib / total))
    if args.build_only:
        if not args.build_dir:
            p.error("--build-only needs --build-dir")
        for name in args.models.split(","):
            t0 = time.perf_counter()
            print(f"built {build(name, Path(args.build_dir), args.cpu_test, device)} in "
                  f"{time.perf_counter() - t0:.0f} s")
        return
    import transformers
    from rich.console import Console
    from rich.table import Table
    transformers.utils.logging.disable_progress_bar()
    table = Table(title=f"popsd training step, single_gpu recipe {' '.join(overrides)}")
    for c in ["model", "length", *(f"{ph} s / GiB" for ph in PHASES), "step s", "peak reserved GiB"]:
        table.add_column(c, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = build(name, Path(args.build_dir or tmp), args.cpu_test, device)
            loaded = load(path, args, overrides)
            for length in map(int, args.lengths.split(",")):
                try:
                    row = measure(path, length, args, loaded)
                except torch.OutOfMemoryError:
                    row = {"model": name, "length": length, "oom": True}
                    torch.cuda.empty_cache()
                gc.collect()  # the row's model and optimizer go before the next one loads
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                if row.get("oom"):
                    table.add_row(name, str(length), *["OOM"] * (len(PHASES) + 2))
                    continue
                cells = [f"{r['s']:.1f}" + (f" / {r['alloc_gib']:.1f} ({r['reserved_gib']:.1f})"
                                            if device.type == "cuda"
                                           else "") for r in row["phases"].values()]
                peak = row["peak_reserved_gib"]
                table.add_row(name, str(length), *cells, f"{row['step_s']:.1f}",
                              "n/a" if peak is None else f"{peak:.1f}")
            del loaded
            gc.collect()
            if not args.build_dir:
                shutil.rmtree(path)
    Console().print(table)
    print("phase cells: seconds / peak allocated GiB (peak reserved GiB), over the measured step")


if __name__ == "__main__":
    main(sys.argv[1:])
