#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and the package registries, from a checkout.
# Installs as the README's GPU section says (the CUDA wheel of torch first, then the project) into
# .venv-gpu, then runs python -m bench.gpu_check, which prints one line per check and writes
# bench_out/gpu_check.json. Usage: [TORCH_CUDA=cu128] bench/gpu_check.sh [bench.gpu_check options]
set -euo pipefail
cd "$(dirname "$0")/.."
INDEX="${TORCH_CUDA:-cu128}"
nvidia-smi -L || { echo "FAIL environment: nvidia-smi found no GPU"; exit 1; }
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --upgrade pip
  .venv-gpu/bin/pip install -q torch==2.13.0 --index-url "https://download.pytorch.org/whl/${INDEX}"
  .venv-gpu/bin/pip install -q -e .
fi
export PATH="$PWD/.venv-gpu/bin:$PATH"
exec .venv-gpu/bin/python -m bench.gpu_check "$@"
