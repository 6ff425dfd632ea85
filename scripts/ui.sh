#!/usr/bin/env bash
# The inspector page in a real browser: headless Chromium (Debian's `chromium` and
# `chromium-driver`, installed here when missing) driven over WebDriver by Selenium (pinned, in
# the git-ignored .venv-ui/) against the real server on the default model, with an API key.
# Screenshots: target/ui-screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."

SELENIUM_VERSION=4.27.1
. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-ui"
cache_lock "$(basename "$VENV")"
KEY="ui-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"
SHOTS="${CARGO_TARGET_DIR:-target}/ui-screenshots"

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "ui: installing chromium and chromium-driver (apt) ..."
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
fi
if ! "$VENV/bin/python" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
  echo "ui: installing selenium $SELENIUM_VERSION into $VENV/ ..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "selenium==$SELENIUM_VERSION"
fi

# axe-core (npm) for the accessibility checks, kept in the cache, checksum-verified.
AXE_VERSION=4.10.3
AXE_SHA256=0f2b4d7dcdf7d1219df8d1959ad68e565f51d14c3f0d88bb71cd59abeb956292
AXE_DIR="$TOKENSCOPE_CACHE/axe-core-$AXE_VERSION"
if [ ! -s "$AXE_DIR/axe.min.js" ]; then
  echo "ui: fetching axe-core $AXE_VERSION (npm) ..."
  work="$(mktemp -d)"
  (cd "$work" && npm pack --silent "axe-core@$AXE_VERSION" >/dev/null)
  got="$(sha256sum "$work/axe-core-$AXE_VERSION.tgz" | cut -d' ' -f1)"
  if [ "$got" != "$AXE_SHA256" ]; then
    echo "ui: checksum mismatch for axe-core-$AXE_VERSION.tgz ($got)" >&2
    exit 1
  fi
  tar -xzf "$work/axe-core-$AXE_VERSION.tgz" -C "$work" package/axe.min.js
  mkdir -p "$AXE_DIR"
  mv "$work/package/axe.min.js" "$AXE_DIR/axe.min.js"
  rm -rf "$work"
fi
export AXE_JS="$AXE_DIR/axe.min.js"

./scripts/setup.sh >/dev/null
# shellcheck source=lib/test-server.sh
. scripts/lib/test-server.sh
# An admin key (the page loads models with it) and two models: the default and Gemma 3 (a
# --test-assets file), so that the model picker has something to switch to; and a tiny base
# with a PEFT adapter on it (scripts/peft.sh), which the picker lists under its base.
start_test_server ui --admin-key "$KEY" --model models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --model models/gemma-3-270m-q4_k_m.gguf --model target/peft/base --model target/peft/all-modules
# No proxy for the loopback server, and Selenium Manager never downloads anything.
export NO_PROXY="127.0.0.1,localhost" SE_OFFLINE=true
"$VENV/bin/python" tests/ui/inspector.py "http://127.0.0.1:$PORT" "$KEY" "$SHOTS"
# Swagger UI's Try it out on several operations, on the same server.
"$VENV/bin/python" tests/ui/swagger.py "http://127.0.0.1:$PORT" "$KEY" "$SHOTS"
check_test_server_survived ui
