#!/usr/bin/env bash
# Installs the real clients the test suite drives (Python `libsql`, npm `@libsql/client`)
# into tests/clients/, at the versions pinned beside this script. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
npm ci --silent --no-audit --no-fund
