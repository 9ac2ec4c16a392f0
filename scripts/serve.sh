#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then serves the built-in demo model.
# Extra arguments go to `spillover serve` (or to `spillover chat` until the server lands).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if spillover serve --help >/dev/null 2>&1; then
    exec spillover serve "$@"
else
    exec spillover chat "$@"
fi
