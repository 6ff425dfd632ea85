#!/usr/bin/env bash
# The reference for tests/evaluations.rs: sacreBLEU and Google's rouge-score from PyPI in a
# venv in the machine's cache (scripts/lib/cache.sh: installed once, reused by every clone).
# The tests run scripts/evaluations/reference.py with it on the strings they compare.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-metrics"
cache_lock "$(basename "$VENV")"
PINS="sacrebleu==2.6.0 rouge-score==0.1.2"

if ! "$VENV/bin/python" -c "import sacrebleu, rouge_score" 2>/dev/null ||
   [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "evaluations: installing $PINS into $VENV (once per machine) ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet $PINS
  echo "$PINS" > "$VENV/.pins"
fi
echo "evaluations: sacreBLEU and rouge-score ready in $VENV"
