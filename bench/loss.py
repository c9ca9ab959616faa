"""bench/loss.py: full-vocabulary loss, fwd+bwd time and peak memory, popsd vs TRL vs the matmul floor.

    pip install -r bench/requirements.txt && python bench/loss.py    # CPU, V=151,936, H=1024, fp32
    python bench/loss.py --n 512,2048 --dtype bf16 --device cuda                  # on a GPU

Each case runs in its own subprocess, so its peak memory is its own: peak resident memory (CPU,
VmHWM after a reset) or peak allocated CUDA memory, above the baseline taken once the inputs exist.
Cases: reference (materialised logits; skipped where it would not fit), fused (loss_fused.fused_loss, the
eager in-place chunk; -compiled: compile="on", the chunk's elementwise chain torch.compile'd, the default on
CUDA; -topk: support=topk, k = 100; -sampled: support=sampled, reverse KL on the sampled token),
trl (trl.kernels.chunked_divergence.ChunkedDivergenceFunction, 2-distribution JSD, pure-torch path
on CPU), floor (only the matmuls the method needs: 2 or 4 projections + 1 gradient product).
Prints a table and one JSON line per row.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ["floor-opsd", "floor-purified", "reference-opsd", "reference-purified", "fused-opsd",
         "fused-purified", "trl-opsd", "fused-opsd-topk", "fused-purified-topk", "fused-opsd-sampled",
         "fused-purified-sampled", "fused-opsd-compiled", "fused-purified-compiled"]


def rss_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def run_case(case, n, h, v, dtype_name, device, chunk_mb):
    import torch
    sys.path.insert(0, str(ROOT))
    import loss
    from plumbing import loss_fused
    torch.manual_seed(0)
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype_name])
    impl, method, *support = case.split("-")
    compiled = support == ["compiled"]
    support = dict(support=support[0], divergence="reverse_kl" if support[0] == "sampled" else "jsd") \
        if support and not compiled else {}
    n_ctx = 4 if method == "purified" else 2
    w = (torch.randn(v, h, device=device) / h ** 0.5 * 4).to(dtype)
    hs = [torch.randn(n, h, device=device).to(dtype) for _ in range(n_ctx)]
    student = hs[0].clone().requires_grad_()
    args = (hs[1], hs[2], hs[3]) if method == "purified" else (hs[1], None, None)

    def step(k=n):  # fwd+bwd on the first k tokens
        student_k, rest = student[:k], [x[:k] if x is not None else None for x in args]
        if impl == "floor":  # the matmuls alone, chunked like the fused path
            wf = w.float() if device == "cpu" else w
            rows = max(1, (chunk_mb << 20) // (5 * v * 4))
            buf = torch.empty(rows, v, device=device)
            grad = torch.empty(n, h, device=device)
            for i in range(0, k, rows):
                c = min(rows, k - i)
                for x in [student] + list(hs[1:]):
                    if wf.dtype == torch.float32:
                        torch.mm(x[i:i + c].detach().float(), wf.T, out=buf[:c])
                    else:
                        torch.mm(x[i:i + c].detach(), wf.T, out_dtype=torch.float32, out=buf[:c])
                if wf.dtype == torch.float32:
                    torch.mm(buf[:c], wf, out=grad[i:i + c])
                else:
                    torch.mm(buf[:c].to(wf.dtype), wf, out_dtype=torch.float32, out=grad[i:i + c])
            return
        if impl == "trl":
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
            div, _ = ChunkedDivergenceFunction.apply(student_k, w, None, rest[0], w, None, 0.5, 1.0)
            loss_sum = div.sum()
        elif impl == "fused":
            kw = {} if not support else dict(support=support["support"], kind=support["divergence"], topk=100,
                                             tokens=torch.randint(0, v, (k,), device=device))
            loss_sum, _ = loss_fused.fused_loss(student_k, *rest, w, method=method, chunk_mb=chunk_mb,
                                                compile="on" if compiled else "off", **kw)
        else:
            loss_sum, _ = loss.reference_loss(student_k, *rest, w, method=method)
        loss_sum.backward()
        student.grad = None

    step(min(n, 16))  # warm-up: first-call costs (imports, allocator, kernels)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2 ** 20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size
        base = rss_mb("VmRSS")
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else rss_mb("VmHWM")
    return {"case": case, "n": n, "h": h, "v": v, "dtype": dtype_name, "device": device,
            "seconds": round(seconds, 3), "ms_per_token": round(1000 * seconds / n, 3),
            "peak_mb_above_baseline": round(peak - base, 1)}


def reference_fits(case, n, v, limit_gb):
    tensors = 12 if case.endswith("purified") else 7  # [N, V] float32 tensors alive at the peak, about
    return tensors * n * v * 4 / 2 ** 30 <= limit_gb


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="512,2048,8192")
    p.add_argument("--h", type=int, default=1024)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-mb", type=int, default=512)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--reference-limit-gb", type=float, default=16.0,
                   help="skip the reference path above this")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--check-args", action="store_true",
                   help="parse the arguments, print them, stop (gpu_check.sh --dry-run)")
    a = p.parse_args()
    if a.check_args:
        if set(a.cases.split(",")) - set(CASES):
            p.error(f"unknown cases {sorted(set(a.cases.split(',')) - set(CASES))}; known: {CASES}")
        print(f"arguments ok: {vars(a)}")
        return
    if a.child:
        case, n = a.child.split(":")
        print(json.dumps(run_case(case, int(n), a.h, a.v, a.dtype, a.device, a.chunk_mb)))
        return
    from rich.console import Console
    from rich.table import Table
    console, rows = Console(), []
    for n in [int(x) for x in a.n.split(",")]:
        floors = {}
        for case in a.cases.split(","):
            if case.startswith("reference") and not reference_fits(case, n, a.v, a.reference_limit_gb):
                row = {"case": case, "n": n, "skipped": f"needs > {a.reference_limit_gb:g} GB"}
            else:
                cmd = [sys.executable, __file__, f"--child={case}:{n}", f"--h={a.h}", f"--v={a.v}",
                       f"--dtype={a.dtype}", f"--device={a.device}", f"--chunk-mb={a.chunk_mb}"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    row = {"case": case, "n": n,
                           "skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-200:]}"}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
            method = case.split("-")[1]
            if case.startswith("floor") and "seconds" in row:
                floors[method] = row["seconds"]
            if "seconds" in row and method in floors:
                row["x_floor"] = round(row["seconds"] / floors[method], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = Table(title=f"fwd+bwd, V={a.v}, H={a.h}, {a.dtype}, {a.device}")
    for col in ("N", "case", "seconds", "ms/token", "× floor", "peak MB above baseline"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), r["case"], *(str(r.get(k, r.get("skipped", "")) if k == "seconds"
                                                    else r.get(k, ""))
                                                 for k in ("seconds", "ms_per_token", "x_floor",
                                                           "peak_mb_above_baseline")))
    console.print(table)


if __name__ == "__main__":
    main()
