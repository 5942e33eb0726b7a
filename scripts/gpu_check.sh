#!/usr/bin/env bash
# GPU readiness of this machine in under 8 minutes: the CUDA-marked tests, a bf16 SIMT step with its
# peak memory, `gppf bench lego` on CUDA (where supported), and with >= 2 GPUs a 20-step NCCL run of the
# built-in recipe under torchrun. Prints ONE JSON object on stdout (logs go to stderr); without CUDA it
# says so ("cuda": false, every check skipped) and exits 0. Exit 1 when a check that ran failed.
#   scripts/gpu_check.sh [--quick] [--steps N] [--skip CHECK ...]
# Run from the source tree (the CUDA tests live in tests/); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
py="${PYTHON:-python}"
if ! "$py" -c "import torch, gppf" 2>/dev/null; then  # still one JSON object, naming the problem
  printf '{"bench": "gpu", "cuda": null, "ok": false, "reason": "%s cannot import torch and gppf: set PYTHON to the environment'"'"'s interpreter"}\n' "$py"
  exit 1
fi
exec timeout 600 "$py" -m gppf.bench.gpu --json "$@"
