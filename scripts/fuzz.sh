#!/usr/bin/env bash
# Fuzzes the real service from its own /openapi.json with schemathesis: builds the binary,
# starts it on the default model on a free loopback port with an API key, runs every
# schemathesis check (server errors, status codes, content types, response schemas, negative
# data, ignored auth, ...) with a fixed seed and a time bound, and fails on any finding.
#
#   ./scripts/fuzz.sh                  # the CI run (a few minutes)
#   FUZZ_MAX_EXAMPLES=500 FUZZ_MAX_TIME=1200 ./scripts/fuzz.sh   # a longer local run
#
# schemathesis goes into the git-ignored .venv-fuzz/ (pinned, so findings are reproducible).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VENV=.venv-fuzz
SEED="${FUZZ_SEED:-20261123}"
MAX_EXAMPLES="${FUZZ_MAX_EXAMPLES:-60}"
MAX_TIME="${FUZZ_MAX_TIME:-240}"
KEY="fuzz-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"

./scripts/setup.sh >/dev/null
if ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  echo "fuzz: installing schemathesis $SCHEMATHESIS_VERSION into $VENV/ ..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

# The test profile's binary (the test suite builds it too, so this is quick after it).
cargo build --quiet --bin tokenscope
BIN="${CARGO_TARGET_DIR:-target}/debug/tokenscope"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$(mktemp -t tokenscope-fuzz.XXXXXX.log)"
"$BIN" serve --host 127.0.0.1 --port "$PORT" --api-key "$KEY" \
  --request-timeout 30 --log-format json >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT

healthy() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$PORT/health" >/dev/null 2>&1
}
for _ in $(seq 1 600); do
  if healthy; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "fuzz: the server exited during start-up:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  sleep 0.2
done
healthy || { echo "fuzz: the server never became healthy:" >&2; tail -20 "$LOG" >&2; exit 1; }

echo "fuzz: schemathesis $SCHEMATHESIS_VERSION against http://127.0.0.1:$PORT (seed $SEED, " \
     "≤ $MAX_EXAMPLES examples per operation, ≤ ${MAX_TIME}s)"
status=0
REPORT="$(mktemp -t tokenscope-fuzz-report.XXXXXX.txt)"
"$VENV/bin/st" run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks all \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --max-time "$MAX_TIME" \
  --workers 2 \
  --request-timeout 60 \
  --no-color 2>&1 | tee "$REPORT" || status=$?

# The server must have survived everything it was sent, and never logged a panic.
if ! kill -0 "$SERVER" 2>/dev/null; then
  echo "fuzz: FAILED: the server died during fuzzing; its log:" >&2
  tail -50 "$LOG" >&2
  exit 1
fi
if grep -qi "panicked" "$LOG"; then
  echo "fuzz: FAILED: the server log records a panic:" >&2
  grep -i -m5 "panicked" "$LOG" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED: schemathesis reported findings (exit $status)" >&2
  exit "$status"
fi
cases="$(grep -Eo '[0-9]+ generated' "$REPORT" | tail -1 | grep -Eo '[0-9]+' || echo 0)"
echo "fuzz: no findings"
echo "fuzz: $cases passed, 0 failed"
