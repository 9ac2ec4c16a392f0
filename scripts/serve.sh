#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then serves the built-in demo model.
# Extra arguments go to `spillover serve`. A second start skips the install (setup.sh keeps a stamp
# of pyproject.toml), so it takes only the model load.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec spillover serve "$@"
