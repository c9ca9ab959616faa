"""bench/rollout.py: how fast popsd samples, as a fraction of what the hardware allows (the decode floor).

    python bench/rollout.py --cpu-test                          # a scaled-down Qwen3 on the CPU (tested)
    python bench/rollout.py --model qwen3_8b --dtype nf4        # on a GPU: Qwen3-8B in 4-bit, LoRA r64
    python bench/rollout.py --model qwen3_8b --dtype bf16 --batch 32 --max-new-tokens 1024
    python bench/rollout.py --model toy --batch 16 --prompt-len 16 --max-new-tokens 128 --lora-r 16  # toy

Engines, each with a LoRA adapter active on all linear layers (r64 as single_gpu; random, non-zero):
  dynamic     engines.hf.generate as the loop runs it: HF generate, a KV cache grown step by step, one batch
  static      engines.hf.generate(engine="static"): HF's preallocated KV cache (cache_implementation="static")
  compile     static + torch.compile of the forward (GPU only: compiling on a CPU takes minutes)
  graph       rollout_engine=graph (engines/graph.py): a static cache, each decoding step a CUDA graph replay
              (on a CPU the same loop, eager); graph-drop: graph_keep_rows=false, the batch halved as rows
              finish
  continuous  transformers' continuous batching (paged KV cache, a finished sequence frees its slot at once)
  vllm        vLLM in this process with the same adapter as a LoRARequest (rollout_engine=vllm; measured last:
              on a CPU it binds this process's threads); on a CPU its attention needs head_dim >= 32, so
              --cpu-test builds its scaled-down Qwen3 with head_dim 32 for every engine
Workloads: fixed (every sequence runs to --max-new-tokens) and longtail (one in eight runs to the limit,
the others stop after 5-30% of it, as long-CoT rollouts do). Every engine does the same work: EOS is
banned before a sequence's length and forced at it (continuous: per-request max_new_tokens, EOS banned).
Decode floor: per decoding step, the bytes that must be read (the weights as stored, adapter included,
plus the KV cache of the sequences still running) divided by the memory bandwidth, measured with a large
copy in the same run; prefill is not counted. "% of floor" = floor seconds / measured seconds.
Before an engine is timed, its greedy completions must equal dynamic's token for token (except after a
near-tie in dynamic's own log-probs), and (generate-based engines) its per-step log-probs must agree
within rounding; an engine that differs is reported and not timed. Prints one JSON line per row as it is
measured, then a table.
"""
import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# `rollout` is popsd's, not this
sys.path = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
import rollout  # noqa: E402
from engines.hf import generate  # noqa: E402
from plumbing.models import kv_bytes_per_token, quantization_config  # noqa: E402

ENGINES = ("dynamic", "static", "compile", "continuous", "graph", "graph-drop", "vllm")
GRAPH = {}  # (engine, rows) → its GraphSampler, kept across calls (caches and graphs are made once per shape)


class ForceLengths:
    """A logits processor: row i may not end before lengths[i] tokens and ends exactly there (EOS forced)."""

    def __init__(self, lengths: list[int], prompt_width: int, eos: int):
        self.lengths, self.width, self.eos = torch.tensor(lengths), prompt_width, eos

    def __call__(self, input_ids, scores):  # scores [B, V]
        # HF's output_logits holds this very tensor: keep it raw (a trained model's EOS mass)
        scores = scores.clone()
        t = input_ids.shape[1] - self.width  # tokens generated so far
        scores[:, self.eos] = float("-inf")
        last = (self.lengths.to(scores.device) - 1 == t)  # [B] rows whose next token is their last
        scores[last] = float("-inf")
        scores[last, self.eos] = 0.0
        return scores


def lengths_for(kind: str, n: int, max_new: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    if kind == "fixed":
        return [max_new] * n
    short = (max_new * (0.05 + 0.25 * torch.rand(n, generator=g))).long().clamp_min(2).tolist()
    return [max_new if i % 8 == 0 else short[i] for i in range(n)]


def bandwidth(device: torch.device, mb: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write), best of five."""
    x = torch.empty(mb * 2 ** 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_seconds(weight_bytes: int, kv_per_token: int, prompt: int, lengths: list[int], bw: float) -> float:
    """Σ over decoding steps t of (weights + KV cache of the sequences still running at t) / bandwidth."""
    total = 0.0
    for t in range(1, max(lengths) + 1):
        live = [length for length in lengths if length >= t]
        total += weight_bytes + len(live) * (prompt + t) * kv_per_token
    return total / bw


def build(args, device, where: Path):
    """Tokenizer and LoRA model of the chosen architecture with random weights (bench/gpu_memory.py's
    build)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_memory", HERE / "gpu_memory.py")
    gpu_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_memory)
    # one builder of random-weight architectures (--cpu-test: its scaled-down sizes)
    build_arch = gpu_memory.build
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    overrides = {"head_dim": 32} if args.cpu_test and "vllm" in args.engines.split(",") else None
    path = ROOT / "data/toyworld/base" if args.model == "toy" else build_arch(args.model,
                                                                              Path(args.build_dir or where),
                                                                                args.cpu_test, device,
                                                                              overrides)
    kwargs = {"dtype": torch.float32 if args.dtype == "fp32" else torch.bfloat16}
    if args.dtype == "nf4":
        kwargs |= {"quantization_config": quantization_config(), "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if args.dtype != "nf4":
        model.to(device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                             target_modules="all-linear",
                                             # non-zero: the adapter changes outputs
                                             init_lora_weights=False))
    model.eval()
    model.save_pretrained(where / "adapter")  # the same adapter for vLLM
    model.base_path = str(path)
    return AutoTokenizer.from_pretrained(path), model


class VLLM:
    """vLLM in this process on the same base and adapter (what rollout_engine=vllm runs), started on first
    use."""
    llm = None

    @classmethod
    def run(cls, model, prompts, lengths, eos, device, greedy, dtype, lora_r, where):
        import os
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        if cls.llm is None:
            kw = dict(model=model.base_path, dtype="float32" if dtype == "fp32" else "bfloat16",
                      enable_lora=True, max_lora_rank=lora_r, max_loras=1,
                      max_model_len=max(map(len, prompts)) + max(lengths) + 64,
                      generation_config="vllm", logprobs_mode="raw_logprobs", seed=0,
                      enforce_eager=device.type == "cpu")
            longest = kw["max_model_len"]
            kw |= dict(max_num_seqs=len(prompts), max_num_batched_tokens=max(longest, len(prompts) * longest))
            # its start-up profile otherwise takes ~9 GB for a 151,936-token vocabulary
            if device.type == "cpu":
                kw |= dict(kv_cache_memory_bytes=1 << 30, enable_chunked_prefill=False,
                           max_num_batched_tokens=max(longest, sum(map(len, prompts))))
            else:
                kw |= dict(gpu_memory_utilization=0.5) | ({"quantization": "bitsandbytes"} if dtype == "nf4"
                                                          else {})
            cls.llm = LLM(**kw)
        params = [SamplingParams(temperature=0.0 if greedy else 1.0, top_p=1.0, top_k=0, max_tokens=n,
                                 ignore_eos=True, seed=i, logprobs=0 if greedy else None,
                                 logit_bias={eos: -1e4}, detokenize=False)
                  for i, n in enumerate(lengths)]  # EOS banned and the length imposed: the others' work
        outs = cls.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                lora_request=LoRARequest("bench", 1, str(where / "adapter")), use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, ts)] for o,
                    ts in zip(outs, tokens)] \
            if greedy else None
        return tokens, logprobs


def run(engine, model, tok, prompts, lengths, eos, device, greedy=False, logits=False, ctx=None,
        horizon=None):
    """Completions (token lists) of `prompts` with the given lengths; optionally the per-step raw logits
    (graph: the raw log-probs of its tokens). horizon: the graph engines' cache length in new tokens (default
    the longest length), so a short warm-up builds the caches and graphs the timed run uses."""
    if engine.startswith("graph"):
        from engines.graph import GraphSampler
        key = (engine, len(prompts))
        if key not in GRAPH:
            GRAPH[key] = GraphSampler(model, tok, batch_size=len(prompts), device=device, eos_ids=[eos],
                                      keep_rows=engine == "graph")
        out = GRAPH[key].generate(prompts, n=1, max_new_tokens=horizon or max(lengths),
                                  temperature=0 if greedy else 1.0, top_p=1.0, top_k=0, lengths=lengths)
        completions, mask, lp = out.completions, out.mask, out.logprobs
        return [c[m].tolist() for c, m in zip(completions, mask)], [x[m].tolist() for x, m in zip(lp, mask)]
    if engine == "continuous":
        return continuous(model, prompts, lengths, eos, greedy), None
    if engine == "vllm":
        tokens, lp = VLLM.run(model, prompts, lengths, eos, device, greedy, **ctx)
        return tokens, lp
    width = max(len(p) for p in prompts)
    force = ForceLengths(lengths, width, eos)
    if logits:  # the exactness check: HF generate itself, with the per-step logits
        ids, attn = rollout.pad_left(prompts, tok.pad_token_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=not greedy,
                             max_new_tokens=max(lengths), eos_token_id=[eos], pad_token_id=tok.pad_token_id,
                             logits_processor=[force], output_logits=True, return_dict_in_generate=True,
                             **({"cache_implementation": "static"} if engine != "dynamic" else {}))
        seqs = out.sequences[:, width:].cpu()
        return [s[:n].tolist() for s, n in zip(seqs, lengths)], torch.stack(out.logits, 1).float().cpu()
    out = generate(
        model, tok, prompts, n=1, max_new_tokens=max(lengths), temperature=1.0, top_p=1.0, top_k=0,
                   eos_ids=[eos],
        batch_size=len(prompts), device=device, engine="dynamic" if engine == "dynamic" else "static",
        do_sample=not greedy, logits_processor=[force])
    return [c[m].tolist() for c, m in zip(out.completions, out.mask)], None


def continuous(model, prompts, lengths, eos, greedy):
    """Continuous batching (transformers' manager), one request per prompt with its own max_new_tokens."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints
    config = GenerationConfig(do_sample=not greedy, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos,
                              suppress_tokens=[eos], max_new_tokens=max(lengths), pad_token_id=0)
    longest = max(map(len, prompts)) + max(lengths)
    hints = WorkloadHints(max_prompt_length=max(map(len, prompts)), max_generated_length=max(lengths),
                          num_requests=len(prompts))
    block = 32  # a paged cache for this workload: left to itself it takes a share of all free memory, and
    cache = ContinuousBatchingConfig(block_size=block, num_blocks=len(prompts) * -(-longest // block) + 1,
                                     # fills it every call
                                     max_batch_tokens=max(longest, sum(map(len, prompts))))
    got = {}
    with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=5,
                                                   warmup=True, workload_hints=hints,
                                                   continuous_batching_config=cache) as manager:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=n - 1)  # + EOS below = n, as elsewhere
        while len(got) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                got[result.request_id] = list(result.generated_tokens)
    return [got[f"r{i}"] + [eos] for i in range(len(prompts))]


def exactness(engine, model, tok, prompts, eos, device, reference, ctx=None) -> str:
    """'' when the engine samples what dynamic samples (compare_greedy); else what differs. vLLM and graph
    (they report log-probs): their greedy tokens before the forced EOS and those log-probs against dynamic's
    (reported)."""
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    if engine.startswith("graph"):  # the forced EOS left out (not a greedy choice)
        tokens, lp = run(engine, model, tok, prompts, [len(t) for t in reference[0]], eos, device,
                         greedy=True)
        return reported([t[:-1] for t in tokens], [v[:-1] for v in lp], reference, eos, tol)
    if engine == "vllm":  # EOS banned: it stops just before the forced EOS
        tokens, lp = run(engine, model, tok, prompts, [len(t) - 1 for t in reference[0]], eos, device,
                         greedy=True, ctx=ctx)
        return reported(tokens, lp, reference, eos, tol)
    tokens, logits = run(engine, model, tok, prompts, [len(t) for t in reference[0]], eos, device,
                         greedy=True, logits=engine != "continuous")
    return compare_greedy(tokens, logits, *reference, eos, tol)


def reported(tokens, logprobs, reference, eos: int, tol: float) -> str:
    """An engine that reports log-probs: its greedy tokens before the forced EOS against dynamic's
    (compare_greedy), and its raw log-probs against dynamic's wherever the two rows still agree."""
    ref_tokens = [t[:-1] for t in reference[0]]
    problem = compare_greedy(tokens, None, ref_tokens, reference[1], eos, tol)
    ref_lp = torch.log_softmax(reference[1], -1)  # [B, T, V]
    worst = max((abs(v - ref_lp[i, t, tok_id].item()) for i, (ts, vs) in enumerate(zip(tokens, logprobs))
                 for t, (tok_id, v) in enumerate(zip(ts, vs)) if ts[:t + 1] == ref_tokens[i][:t + 1]),
                default=0.0)
    return problem or (f"log-probs differ by {worst:.2g} (tolerance {tol})" if worst > tol else "")


def compare_greedy(tokens, logits, ref_tokens, ref_logits, eos: int, tol: float) -> str:
    """'' when greedy completions equal the reference's and (logits given, [B, T, V]) the per-step log-probs
    agree within tol; else what differs. A row may part from the reference's tokens only where the reference's
    own top two log-probs are within tol (a near-tie that another kernel order may break the other way: random
    weights give many in bf16); the log-probs are compared over the steps before each row parts."""
    ref_lp = torch.log_softmax(ref_logits, -1)  # [B, T, V]
    worst = 0.0
    for i, (got, want) in enumerate(zip(tokens, ref_tokens)):
        part = next((t for t, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        if part < len(want):
            lp = ref_lp[i, part].clone()
            lp[eos] = float("-inf")  # banned before the last step, as in the runs compared
            top2 = lp.topk(2).values
            if top2[0] - top2[1] > tol:
                return f"greedy tokens differ from dynamic's (row {i}, step {part}: no near-tie there)"
        if logits is not None and part:
            diff = (torch.log_softmax(logits[i, :part], -1) - ref_lp[i, :part]).abs()
            worst = max(worst, diff[torch.isfinite(diff)].max().item())
    return f"log-probs differ by {worst:.2g} (tolerance {tol})" if worst > tol else ""


def measure(engine, model, tok, prompts, lengths, eos, device, ctx=None) -> tuple[float, float | None]:
    # warm-up at the measured batch (graph-drop: rows ending one by one, so every halved batch is made)
    warm = list(range(2, len(prompts) + 2)) if engine == "graph-drop" else [4] * len(prompts)
    run(engine, model, tok, prompts, warm, eos, device, ctx=ctx, horizon=max(lengths))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    run(engine, model, tok, prompts, lengths, eos, device, ctx=ctx)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return seconds, peak


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3_8b",
                   help="an architecture in bench/configs/, or toy (the shipped toy base)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "nf4"), default=None,
                   help="default: nf4 on CUDA, fp32 on CPU")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--workloads", default="fixed,longtail")
    p.add_argument("--batch", type=int, help="default 16 (--cpu-test: 8)")
    p.add_argument("--prompt-len", type=int, help="default 128 (--cpu-test: 16)")
    p.add_argument("--max-new-tokens", type=int, help="default 512 (--cpu-test: 48)")
    p.add_argument("--lora-r", type=int, help="default 64 (--cpu-test: 8)")
    p.add_argument("--cpu-test", action="store_true", help="scaled-down architecture and sizes on the CPU")
    p.add_argument("--out", default="bench/results/rollout.jsonl", help="JSON lines appended here")
    p.add_argument("--build-dir", help="reuse architectures built here (bench/gpu_memory.py --build-dir)")
    p.add_argument("--check-args", action="store_true",
                   help="parse the arguments, print them, stop (gpu_check.sh --dry-run)")
    args = p.parse_args(argv)
    if args.check_args:
        unknown = set(args.engines.split(",")) - set(ENGINES) or set(args.workloads.split(",")) - {"fixed",
                                                                                                   "longtail"}
        if unknown or not (ROOT / "bench/configs" / f"{args.model}.json").exists() and args.model != "toy":
            p.error(f"unknown engine, workload or model: {sorted(unknown) or args.model}")
        print(f"arguments ok: {vars(args)}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_test else "cpu")
    args.dtype = args.dtype or ("nf4" if device.type == "cuda" else "fp32")
    for key, full, small in (("batch", 16, 8), ("prompt_len", 128, 16), ("max_new_tokens", 512, 48),
                             ("lora_r", 64, 8)):
        if getattr(args, key) is None:  # a flag given wins, also under --cpu-test
            setattr(args, key, small if args.cpu_test else full)
    if args.dtype == "nf4" and device.type != "cuda":
        p.error("--dtype nf4 is measured on CUDA (on a CPU bitsandbytes has no fast 4-bit path)")
    engines = [e for e in args.engines.split(",") if e]
    if "vllm" in engines:
        # last: on a CPU it binds this process's threads
        engines = [e for e in engines if e != "vllm"] + ["vllm"]
        if importlib.util.find_spec("vllm") is None:
            print("vllm: not installed (bash install_vllm.sh cpu|cuda), its row is skipped")
    bw = bandwidth(device, 256 if device.type == "cpu" else 2048)
    with tempfile.TemporaryDirectory() as where:
        tok, model = build(args, device, Path(where))
        eos = model.config.eos_token_id if isinstance(model.config.eos_token_id,
                                                      int) else model.config.eos_token_id[0]
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(10, min(400, len(tok)), (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.batch)]
        weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
        kv = kv_bytes_per_token(model.config, 4 if args.dtype == "fp32" else 2)
        greedy_ref = run("dynamic", model, tok, prompts[:4], [12] * 4, eos, device, greedy=True, logits=True)
        ctx = {"dtype": args.dtype, "lora_r": args.lora_r, "where": Path(where)}
        rows, plain, compiled = [], model.base_model.model.forward, None
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)

        def emit(row):  # written as it comes: a run cut short keeps its finished rows
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        device_name = (torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
                       or platform.machine())
        # engine by engine: a run cut short has every workload of the engines it finished
        for engine in engines:
            problem = ""
            if engine == "compile" and device.type == "cpu":
                problem = "compile is measured on CUDA only"
            elif engine == "vllm" and importlib.util.find_spec("vllm") is None:
                problem = "vLLM is not installed"
            elif engine == "compile" and compiled is None:
                compiled = torch.compile(plain)
            # only "compile" compiled
            model.base_model.model.forward = compiled if engine == "compile" else plain
            if engine != "dynamic" and not problem:
                try:
                    problem = exactness(engine, model, tok, prompts[:4], eos, device, greedy_ref, ctx)
                    problem = problem and f"not exact: {problem}"
                except Exception as e:  # an engine that fails is a row, not the end of the benchmark
                    problem = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            for workload in args.workloads.split(","):
                lengths = lengths_for(workload, args.batch, args.max_new_tokens)
                floor = floor_seconds(weight_bytes, kv, args.prompt_len, lengths, bw)
                row = {"bench": "rollout", "engine": engine, "workload": workload, "model": args.model,
                       "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
                       "max_new_tokens": args.max_new_tokens, "tokens": sum(lengths),
                       "floor_s": round(floor, 4), "bandwidth_gbs": round(bw / 1e9, 1), "device": device_name}
                if problem:
                    emit(row | {"skipped": problem})
                    continue
                try:
                    seconds, peak = measure(engine, model, tok, prompts, lengths, eos, device, ctx)
                except Exception as e:
                    emit(row | {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                    continue
                emit(row | {"seconds": round(seconds, 3), "tokens_per_s": round(sum(lengths) / seconds, 1),
                            "floor_fraction": round(floor / seconds, 4), "peak_gib": peak and round(peak, 2)})
    print_rows(rows)
    return rows


def print_rows(rows):
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"rollout throughput, {rows[0]['model']} {rows[0]['dtype']} on {rows[0]['device']} "
                        f"({rows[0]['bandwidth_gbs']} GB/s copy bandwidth)")
    for c in ("workload", "engine", "tokens", "seconds", "tokens/s", "% of floor", "peak GiB"):
        table.add_column(c, justify="left" if c in ("workload", "engine") else "right")
    for r in rows:
        if "skipped" in r:
            table.add_row(r["workload"], r["engine"], str(r["tokens"]), r["skipped"], "", "", "")
        else:
            table.add_row(r["workload"], r["engine"], str(r["tokens"]), f"{r['seconds']:.2f}",
                          f"{r['tokens_per_s']:.0f}", f"{100 * r['floor_fraction']:.1f}%",
                          "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
