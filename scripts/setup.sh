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
