#!/usr/bin/env bash
# Everything the test suite needs: the pinned Python stack and test tools, and a Chromium for the
# browser tests. With apt (Debian, Ubuntu, CI) Debian's chromium is installed; without apt this says
# how to get one, and every other test still runs (the browser tests are then skipped, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r requirements-test.txt
has() { command -v "$1" >/dev/null 2>&1; }
# the COCO caption toolkit's own PTB tokenizer and METEOR are Java programs (without Java, the tests of that path skip)
if ! has java && has apt-get; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
fi
if [ -n "${EPALM_CHROMIUM:-}" ] || has chromium || has chromium-browser; then
  :
elif has apt-get; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
  cat >&2 <<'MSG'
tests/setup.sh: no Chromium found and no apt-get to install it. The browser tests will be skipped
unless you install one:
  python -m playwright install chromium      # Playwright's own build (macOS, other Linux, Windows)
or point EPALM_CHROMIUM at a Chromium or Chrome executable. Every other test runs without it.
MSG
fi
