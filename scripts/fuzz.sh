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
. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-fuzz"
cache_lock "$(basename "$VENV")"
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

# shellcheck source=lib/test-server.sh
. scripts/lib/test-server.sh
# The queue holds what the fuzzer's two workers can send at once (64 prompts × 16 choices
# each): a full queue's 503 is load shedding, tested in tests/api.rs, not a contract finding.
# Choices decode one after another (no batched decoding yet); the largest valid completion
# request (64 prompts × n 4, each scored with echo) takes tens of seconds on 2 cores, so the
# fuzz server caps new tokens per choice at 4 and allows 120 s (the response-time check below
# uses the same bound). Other requests are not held up behind such a request (a request
# queues at most 8 jobs at once; tests/openai.rs).
start_test_server fuzz --api-key "$KEY" --request-timeout 120 --max-new-tokens 4 \
  --max-queue 2048 --log-format json

echo "fuzz: schemathesis $SCHEMATHESIS_VERSION against http://127.0.0.1:$PORT (seed $SEED, " \
     "≤ $MAX_EXAMPLES examples per operation, ≤ ${MAX_TIME}s)"
# Responses may take as long as the server's own --request-timeout (120 s; beyond it the
# server answers 504, which the server-error check reports): on 2 CPU cores shared with the
# fuzzer's 2 workers, a request with many prompts and choices legitimately takes a while.
# Loading and unloading models is left out: unloading the one model this server runs makes
# every later request a documented 409/503 that the server-error check counts as a finding.
# tests/jobs.rs drives both routes with the real binary (status, memory, LRU, 507).
status=0
REPORT="$(mktemp -t tokenscope-fuzz-report.XXXXXX.txt)"
"$VENV/bin/st" --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks all \
  --seed "$SEED" \
  --max-examples "$MAX_EXAMPLES" \
  --max-time "$MAX_TIME" \
  --workers 2 \
  --request-timeout 150 \
  --max-response-time 120 \
  --exclude-path-regex '^/models/\{id\}/(load|unload)$' \
  --no-color 2>&1 | tee "$REPORT" || status=$?

# The server must have survived everything it was sent, and never logged a panic.
check_test_server_survived fuzz
if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED: schemathesis reported findings (exit $status)" >&2
  exit "$status"
fi
cases="$(grep -Eo '[0-9]+ generated' "$REPORT" | tail -1 | grep -Eo '[0-9]+' || echo 0)"
echo "fuzz: no findings"
echo "fuzz: $cases passed, 0 failed"
