"""bench/engine_sync.py: how the student's weights reach vLLM after an optimizer step, measured two ways.

    python bench/engine_sync.py                       # CPU: the toy base and a scaled-down Qwen3-8B (head 32)
    python bench/engine_sync.py --models qwen3_8b     # a GPU: the real architecture, random weights, bf16

  adapter  what rollout_engine=vllm does: the LoRA adapter written to a RAM folder (/dev/shm) in PEFT format,
           then the first request naming it as a new LoRARequest (loads it) for one token
  merged   base + LoRA merged in the training model, every weight pushed into vLLM in place
           (collective_rpc("reload_weights")), then a plain request for one token
Each row: seconds per sync, best of --repeats, minus a one-token request with nothing new (the request's own
cost); then the raw log-probs of a greedy completion after the sync against HF + peft's, to show the route
delivers the same model. Prints a table and one JSON line per row (appended to --out).
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
import gpu_memory  # noqa: E402  (bench/: its architecture builder)
from plumbing.checkpoints import save_adapter, trainable_state  # noqa: E402
from engines.vllm_engine import ram_folder  # noqa: E402


def hf_logprobs(model, prompt, tokens):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens], device=model.device)).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
    return lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].cpu()


def one(llm, prompt, lora=None, n=1, logprobs=False):
    from vllm import SamplingParams
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=n,
                                                                      logprobs=0 if
                       logprobs else None, ignore_eos=True), lora_request=lora, use_tqdm=False)[0].outputs[0]
    return list(out.token_ids), [d[t].logprob for d,
                                 t in zip(out.logprobs, out.token_ids)] if logprobs else None


def merged_weights(model):
    """The base's weights with the adapter merged in, under the base model's own names."""
    model.merge_adapter()
    out = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
           for n, p in model.named_parameters() if "lora_" not in n}
    model.unmerge_adapter()
    return out


def measure(name, path, args, device, where):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm import LLM
    from vllm.lora.request import LoRARequest
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                             target_modules="all-linear", init_lora_weights=False)).eval()
    kw = dict(model=str(path), dtype="float32" if dtype == torch.float32 else "bfloat16", enable_lora=True,
              max_lora_rank=args.lora_r, max_loras=1, max_model_len=256, generation_config="vllm", seed=0,
              logprobs_mode="raw_logprobs", enforce_eager=device.type == "cpu")
    kw |= dict(kv_cache_memory_bytes=256 << 20, enable_chunked_prefill=False) if device.type == "cpu" else \
        dict(gpu_memory_utilization=0.4)
    llm = LLM(**kw)
    prompt = list(range(10, 26))
    rows, folder = [], ram_folder()  # where rollout_engine=vllm writes its adapters
    weights = trainable_state(model)
    adapter_mb = sum(w.numel() * w.element_size() for w in weights.values()) / 2 ** 20
    base_mb = sum(p.numel() * p.element_size() for n,
                  p in model.named_parameters() if "lora_" not in n) / 2 ** 20
    # adapter route: a new folder and id each time, as each step
    lora = None
    times, plain = [], []
    for k in range(args.repeats):
        if lora is not None:
            t0 = time.perf_counter()
            one(llm, prompt, lora)
            plain.append(time.perf_counter() - t0)  # a request with nothing new
            llm.llm_engine.remove_lora(lora.lora_int_id)
        t0 = time.perf_counter()
        save_adapter(model, weights, folder / f"step{k}")
        lora = LoRARequest(f"step{k}", k + 1, str(folder / f"step{k}"))
        one(llm, prompt, lora)
        times.append(time.perf_counter() - t0)
    tokens, lp = one(llm, prompt, lora, n=16, logprobs=True)
    gap = (hf_logprobs(model, prompt, tokens) - torch.tensor(lp)).abs().max().item()
    rows.append({"route": "adapter", "seconds": min(times) - min(plain), "mb_moved": round(adapter_mb, 1),
                 "gap": gap})
    # merged route: every base weight pushed in place
    times, plain = [], []
    for k in range(args.repeats):
        t0 = time.perf_counter()
        one(llm, prompt)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        items = merged_weights(model)
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items.items())})
        one(llm, prompt)
        times.append(time.perf_counter() - t0)
    tokens, lp = one(llm, prompt, n=16, logprobs=True)
    gap = (hf_logprobs(model, prompt, tokens) - torch.tensor(lp)).abs().max().item()
    rows.append({"route": "merged", "seconds": min(times) - min(plain), "mb_moved": round(base_mb, 1),
                 "gap": gap})
    dev = (torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
           or platform.machine())
    return [{"bench": "engine_sync", "model": name, "lora_r": args.lora_r, "device": dev, **r} for r in rows]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="toy,qwen3_8b", help="toy and/or architectures in bench/configs/")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/engine_sync.jsonl")
    args = p.parse_args(argv)
    if args.repeats < 2:
        p.error("--repeats must be at least 2 (a plain request is timed between syncs)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as where:
        for name in args.models.split(","):
            path = ROOT / "data/toyworld/base" if name == "toy" else gpu_memory.build(
                name, Path(where), device.type == "cpu", device, {"head_dim": 32} if device.type == "cpu"
                                                                                      else None)
            for row in measure(name, path, args, device, Path(where)):
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"weights into vLLM after a step, on {rows[0]['device']} (LoRA r{args.lora_r})")
    for c in ("model", "route", "MB moved", "seconds per sync", "max |Δ log p| vs HF"):
        table.add_column(c, justify="left" if c in ("model", "route") else "right")
    for r in rows:
        table.add_row(r["model"], r["route"], f"{r['mb_moved']:.1f}", f"{r['seconds']:.3f}",
                      f"{r['gap']:.1e}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
