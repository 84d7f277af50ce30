#!/usr/bin/env bash
# What tests/browser needs: Debian's chromium + chromium-driver (apt) and selenium (pip, the test extra), installed
# only when missing. Usage: bash scripts/browser.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
"$PY" -c "import selenium" 2>/dev/null || "$PY" -m pip install -q "selenium>=4.20"
echo "browser: $(chromium --version 2>/dev/null | head -n1), $(chromedriver --version | cut -d' ' -f1-2), selenium $("$PY" -c 'import selenium; print(selenium.__version__)')"
