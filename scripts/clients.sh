#!/usr/bin/env bash
# Real OpenAI-ecosystem clients against the real service: the official `openai` Python SDK
# (tests/clients/openai_sdk.py) and EleutherAI's lm-evaluation-harness on two offline tasks
# (benches/lm_eval/check.py: every logged log-likelihood must equal tokenscope's own per-token
# log-probs, and a server that ignores `echo`, like llama.cpp's, must be caught).
#
# Both go into the git-ignored .venv-clients/, pinned (no torch: lm_eval's API models need none).
set -euo pipefail
cd "$(dirname "$0")/.."

LM_EVAL_VERSION=0.4.13
OPENAI_VERSION=3.54.0
. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-clients"
cache_lock "$(basename "$VENV")"
KEY="clients-$(python3 -c 'import secrets; print(secrets.token_hex(8))')"

./scripts/setup.sh >/dev/null
if ! "$VENV/bin/python" -c "import lm_eval, openai, sys; sys.exit(lm_eval.__version__ != '$LM_EVAL_VERSION' or openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "clients: installing lm_eval $LM_EVAL_VERSION and openai $OPENAI_VERSION into $VENV/ ..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "lm_eval[api]==$LM_EVAL_VERSION" "openai==$OPENAI_VERSION"
fi

# shellcheck source=lib/test-server.sh
. scripts/lib/test-server.sh
start_test_server clients --api-key "$KEY" --request-timeout 120
BASE="http://127.0.0.1:$PORT"

"$VENV/bin/python" tests/clients/openai_sdk.py "$BASE" "$KEY"
"$VENV/bin/python" benches/lm_eval/check.py --base-url "$BASE" --api-key "$KEY" \
  --lm-eval "$VENV/bin/lm_eval"
if "$VENV/bin/python" benches/lm_eval/check.py --base-url "$BASE" --api-key "$KEY" \
  --lm-eval "$VENV/bin/lm_eval" --break-echo >/dev/null 2>&1; then
  echo "clients: FAILED: the checker accepted a server that ignores echo" >&2
  exit 1
fi
echo "clients: the checker rejects a server that ignores echo (as it must)"
check_test_server_survived clients
