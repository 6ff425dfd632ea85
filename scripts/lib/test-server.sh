# Sourced by the scripts that test the real service from outside (fuzz.sh, clients.sh):
# builds the test profile's binary and starts it on the default model on a free loopback port.
#
#   start_test_server NAME [serve args...]   # sets PORT, SERVER (pid) and LOG; stops it on exit

start_test_server() {
  local name="$1"
  shift
  # The test profile's binary (the test suite builds it too, so this is quick after it).
  cargo build --quiet --bin tokenscope
  local bin="${CARGO_TARGET_DIR:-target}/debug/tokenscope"
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  LOG="$(mktemp -t "tokenscope-$name.XXXXXX.log")"
  # Its own job database and uploads, gone with it.
  STATE_DIR="$(mktemp -d -t "tokenscope-$name-state.XXXXXX")"
  "$bin" serve --host 127.0.0.1 --port "$PORT" --state-dir "$STATE_DIR" "$@" >"$LOG" 2>&1 &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; rm -rf "$STATE_DIR"' EXIT
  for _ in $(seq 1 600); do
    if test_server_healthy; then return 0; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
      echo "$name: the server exited during start-up:" >&2
      cat "$LOG" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "$name: the server never became healthy:" >&2
  tail -20 "$LOG" >&2
  exit 1
}

test_server_healthy() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$PORT/health" >/dev/null 2>&1
}

# Fails when the server died or logged a panic.
check_test_server_survived() {
  local name="$1"
  if ! kill -0 "$SERVER" 2>/dev/null; then
    echo "$name: FAILED: the server died; its log:" >&2
    tail -50 "$LOG" >&2
    exit 1
  fi
  if grep -qi "panicked" "$LOG"; then
    echo "$name: FAILED: the server log records a panic:" >&2
    grep -i -m5 "panicked" "$LOG" >&2
    exit 1
  fi
}
