#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py says what it measures):
#   bash benchmarks/gpu.sh OUT                      # the visible CUDA device, the paper's pair at real size
#   bash benchmarks/gpu.sh OUT --device cpu --tiny  # the same code on toy models (what the tests run)
# Installs this checkout (editable, no torch change) when llm_modules is not importable.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! python -c "import llm_modules" 2>/dev/null; then
  pip install -q -e "$here/.."
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec python "$here/gpu.py" "$@"
