#!/usr/bin/env bash
# The checks that need a CUDA device, in one go (< 8 min on one GPU): the gpu-marked tests (latency with CUDA
# synchronisation; a short fit + test + deployable of every technique with --trainer.accelerator=gpu), then the
# nvidia-smi line of the device. Run from the repository root: bash tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { make install >/dev/null; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
start=$(date +%s)
"$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider "$@"
echo "gpu checks: $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
