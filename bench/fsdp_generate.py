"""bench/fsdp_generate.py: decoding-step time of a sharded model, weights gathered at every step vs once per
call.

    torchrun --nproc_per_node 2 bench/fsdp_generate.py                 # CPU, gloo: the toy base, LoRA r16
    torchrun --nproc_per_node 8 bench/fsdp_generate.py --model qwen3_8b --device cuda --tokens 256

The model is sharded as popsd shards it (distributed.shard_model: fully_shard per decoder layer and on
the body). Each rank samples a batch with engines.hf.generate, once with gather=False (FSDP all-gathers every
layer's weights at every decoding step) and once with gather=True (distributed.gathered: once per call),
the same seed, and checks that both give the same tokens. Rank 0 prints a table and one JSON line per row.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import distributed  # noqa: E402
from engines.hf import generate  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy",
                   help="toy (the shipped toy base) or an architecture in bench/configs/")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (EOS banned until then)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/fsdp_generate.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rank, world, device = distributed.setup(torch.device(args.device))
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    where = (Path(tempfile.gettempdir())
             / f"popsd_fsdp_generate_{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}")
    try:  # one folder every rank sees: rank 0 builds the model, the others load it
        if args.model == "toy":
            path = ROOT / "data/toyworld/base"
        else:
            import gpu_memory  # bench/, this script's folder, is on sys.path behind ROOT
            path = where / args.model
            if rank == 0:
                gpu_memory.build(args.model, where, device.type == "cpu", device)
            distributed.barrier()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if device.type == "cpu"
                                                     else torch.bfloat16)
        distributed.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(where, ignore_errors=True)
    model.to(device)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    distributed.shard_model(model, device, bf16=device.type == "cuda")
    g = torch.Generator().manual_seed(rank)
    prompts = [torch.randint(10, min(400, len(tok)), (16,), generator=g).tolist() for _ in range(args.batch)]
    eos = tok.eos_token_id

    def sample(gather):
        torch.manual_seed(100 + rank)
        return generate(model, tok, prompts, n=1, max_new_tokens=args.tokens, temperature=1.0, top_p=1.0,
                        top_k=0, eos_ids=[eos], batch_size=args.batch, device=device,
                        min_new_tokens=args.tokens, gather=gather).completions

    rows, outputs = [], {}
    for gather in (False, True) * args.repeats:
        distributed.barrier()
        t0 = time.perf_counter()
        outputs[gather] = sample(gather)
        distributed.barrier()
        seconds = time.perf_counter() - t0
        rows.append({"gather": gather, "seconds": seconds})
    same = all(distributed.gather(torch.equal(outputs[False], outputs[True])))
    best = {g: min(r["seconds"] for r in rows if r["gather"] == g) for g in (False, True)}
    if rank == 0:
        print(f"{'weights gathered':<28}{'seconds':>10}{'ms / decoding step':>22}")
        out_rows = []
        for g in (False, True):
            row = {"bench": "fsdp_generate", "model": args.model, "device": str(device), "ranks": world,
                   "batch_per_rank": args.batch, "tokens": args.tokens, "gather_once": g,
                   "seconds": round(best[g], 3), "ms_per_step": round(1000 * best[g] / args.tokens, 2),
                   "same_tokens": same}
            out_rows.append(row)
            mode = 'once per call' if g else 'at every step'
            print(f"{mode:<28}{best[g]:>10.2f}{1000 * best[g] / args.tokens:>22.1f}")
        print(f"speed-up {best[False] / best[True]:.2f}x; same tokens with and without: {same}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in out_rows:
                print(json.dumps(row))
                f.write(json.dumps(row) + "\n")
    distributed.finish()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
    sys.stdout.flush()
    # every row is out: skip interpreter teardown, where gloo once aborted rank 0 ("terminate called
    os._exit(0)
    # without an active exception", after destroy_process_group; 1 of 3 suite runs on 2026-12-01)
