#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs lint, type checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check spillover tests bench
mypy
python -m pytest -q -p no:cacheprovider "$@"
