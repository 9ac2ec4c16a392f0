#!/usr/bin/env bash
# Creates .venv and installs spillover with everything it needs, including the built-in demo model.
# Idempotent: a second run only checks what is there. The install commands themselves live in
# scripts/install.sh, which the Dockerfile runs too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
bash scripts/install.sh "server,test"
