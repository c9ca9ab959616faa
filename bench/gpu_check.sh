#!/usr/bin/env bash
# bench/gpu_check.sh: what an hour with a GPU should measure first, in one run (≤ 5 min on one H100/H200).
#
#   bash bench/gpu_check.sh            # on a GPU: logs, results.jsonl and summary.txt in bench/results/gpu/
#   bash bench/gpu_check.sh --dry-run  # anywhere: every command exists and takes its arguments; nothing runs
#   bash bench/gpu_check.sh --long     # also step 6: sampled memory rows at 1,024 and 4,096 tokens (~20 min)
#   GPU_CHECK_OUT=/some/dir PYTHON=python bash bench/gpu_check.sh   # another output folder or interpreter
#
# 1. the CUDA tests (the tiny recipe in bf16 and in nf4 with paged 8-bit AdamW; the fused loss in bf16 against
#    the fp32 reference at V = 151,936, H = 4096, value and gradient; the graph engine's replay against eager,
#    before and after an in-place weight update), which skip on a CPU;
# 2. bench/loss.py: the fused loss in bf16, fwd+bwd, at N = 8192, V = 151,936, H = 4096, against the bf16
#    matmul floor, the eager chunk and the compiled one (compile="on", the CUDA default; goal ≤ 1.3× the
#    floor), and Purified on the top-k and sampled-token supports;
# 3. build: the Qwen3-8B architecture with random weights (16 GB on disk), for the benches below;
# 4. bench/rollout.py: sampling on the Qwen3-8B architecture in nf4 (16 sequences, 32 new tokens, LoRA r64):
#    dynamic (HF generate, ~170 ms a step in nf4 on the H200), graph and graph-drop (engines/graph.py), each
#    checked against dynamic first, fixed and long-tailed lengths, as a fraction of the decode floor; then
#    bf16, fixed lengths, dynamic and graph (a step's time is what is compared: 32 steps measure it);
# 5. memory-update: the single_gpu recipe's update phase alone (three frozen passes, student pass, backward,
#    optimizer step) on synthetic completions of 1k-16k tokens, one sequence, the card capped at 24 GiB;
# 6. with --long only: bench/gpu_memory.py, the single_gpu recipe on the Qwen3-8B architecture sampling 1,024
#    and 4,096 new tokens first (peak allocated/reserved GiB, seconds per phase; one step each, no warm-up).
#    On the H200 HF generate took ~170 ms per decoding step of 8B nf4 + LoRA (bench/results/gpu/), so 1,024
#    tokens cost ~3 min of sampling and 4,096 ~12: more than a device call of 10 min allows after the rest.
# Each step has a time limit (seconds, after its name; 5 min together without --long, sized from the H200 run
# where one was measured: tests 73 s, loss 18 s for four cases, build 30 s, ~170/133 ms a dynamic nf4/bf16
# step; estimated for the graph engine and memory-update, which have not run on a GPU); a step that fails or
# runs out of time is reported and the next one runs. Rows are written as they come, so a step cut short
# keeps its finished rows. The device is named in every JSON line.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
BUILD=${TMPDIR:-/tmp}/popsd_gpu_check  # Qwen3-8B's random weights, built once (16 GB) for both benches
DRY=0 LENGTHS=1024 MEMORY_S=240 SAMPLED_MEMORY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --long) LENGTHS=1024,4096 MEMORY_S=1200 SAMPLED_MEMORY=1 ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run] [--long]" >&2; exit 2 ;;
  esac
done

LOSS_SHAPE="--n 8192 --h 4096 --v 151936 --dtype bf16 --device cuda"
LOSS_CASES=floor-opsd,floor-purified,fused-opsd,fused-purified,fused-opsd-compiled,fused-purified-compiled
LOSS_CASES=$LOSS_CASES,fused-purified-topk,fused-purified-sampled
ROLLOUT="bench/rollout.py --model qwen3_8b --batch 16 --prompt-len 128 --max-new-tokens 32 --build-dir $BUILD"
ROLLOUT="$ROLLOUT --out $BUILD/rollout.jsonl"
MEMORY="bench/gpu_memory.py --models qwen3_8b --steps 1 --build-dir $BUILD"
STEPS=(  # name|seconds|command
  "cuda-tests|75|$PY -m pytest -q -k cuda tests/test_loss.py tests/test_scale.py tests/test_graph_engine.py"
  "loss-bf16|45|$PY bench/loss.py $LOSS_SHAPE --cases $LOSS_CASES"
  "build|35|$PY bench/gpu_memory.py --models qwen3_8b --build-only --build-dir $BUILD"
  "rollout-nf4|55|$PY $ROLLOUT --dtype nf4 --engines dynamic,graph,graph-drop"
  "rollout-bf16|30|$PY $ROLLOUT --dtype bf16 --engines dynamic,graph --workloads fixed"
  "memory-update|60|$PY $MEMORY --lengths 1024,4096,8192,16384 --batch 1 --synthetic --cap-gib 24"
  "gpu-memory|$MEMORY_S|$PY $MEMORY --lengths $LENGTHS"
)

if [ $DRY = 1 ]; then
  status=0
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    if [ "$name" = cuda-tests ]; then
      check="$cmd --collect-only"
    else
      check="$cmd --check-args"
    fi
    if out=$($check 2>&1); then
      echo "ok      $name: $cmd"
    else
      echo "FAILED  $name: $cmd"; echo "$out" | tail -5; status=1
    fi
  done
  exit $status
fi

$PY -c "import torch, sys
sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU (or --dry-run)')" || exit 2
mkdir -p "$OUT" "$BUILD"
device=$($PY -c "import torch; print(torch.cuda.get_device_name())")
summary="$OUT/summary.txt"
commit=$(git rev-parse --short HEAD 2>/dev/null)
echo "gpu_check on $device, $(date -u +%Y-%m-%dT%H:%MZ), commit $commit" > "$summary"
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  if [ "$name" = gpu-memory ] && [ $SAMPLED_MEMORY = 0 ]; then
    echo "gpu-memory: skipped (memory-update measured the update phase; --long samples 1,024 and 4,096" \
         "tokens first)" | tee -a "$summary"
    continue
  fi
  start=$(date +%s)
  echo "=== $name (limit $limit s): $cmd"
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" $cmd > "$OUT/$name.log" 2>&1
  rc=$?
  [ $rc = 124 ] && rc="124 (out of time)"
  grep '^{' "$OUT/$name.log" | $PY -c "
import json, sys
for line in sys.stdin:
    row = json.loads(line)
    row.setdefault('device', '$device')
    print(json.dumps(row | {'step': '$name'}))" >> "$OUT/results.jsonl"
  tail -25 "$OUT/$name.log"
  rows=$(grep -c '^{' "$OUT/$name.log")
  echo "$name: rc $rc, $(( $(date +%s) - start )) s, $rows JSON lines" | tee -a "$summary"
done
rm -rf "$BUILD"
echo; cat "$summary"
