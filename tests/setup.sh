#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine: the Python stack and Debian's
# chromium for the browser tests (Playwright's own browser download is not used).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "tests/setup.sh: install Chromium (the browser tests drive /usr/bin/chromium)" >&2
    exit 1
  fi
fi
python -m pip install -q -r requirements.txt -r requirements-test.txt
