#!/usr/bin/env bash
# The reference for the nanochat tests: CPU PyTorch and tiktoken from PyPI in the venv that
# scripts/nanogpt.sh also uses, in the machine's cache (scripts/lib/cache.sh: installed once,
# ~3 min, reused by every clone), then scripts/nanochat/generate.py, which trains a small
# byte-level BPE and pickles its tiktoken Encoding (as nanochat's tokenizer.py saves it), saves
# random-weight nanochat checkpoints (model_<step>.pt + meta_<step>.json, as base_train.py
# does), a few malformed folders, and a float64 transcription of upstream's GPT.forward's
# log-probs into target/nanochat/. Needs nothing else. Re-runs only when the script or pins
# change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-torch"
cache_lock "$(basename "$VENV")"
OUT=target/nanochat
STAMP="$OUT/.stamp"
PINS="torch==2.9.1 transformers==4.57.1 tiktoken==0.12.0 numpy==2.4.6"

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if ! "$VENV/bin/python" -c "import torch, transformers, tiktoken, numpy" 2>/dev/null ||
   [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "nanochat: installing $PINS into $VENV (once per machine) ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet $PINS
  echo "$PINS" > "$VENV/.pins"
fi

want="$(cat scripts/nanochat/generate.py "$VENV/.pins" | sha256 /dev/stdin)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "nanochat: reference checkpoints present: $OUT"
  exit 0
fi
rm -rf "$OUT"
"$VENV/bin/python" scripts/nanochat/generate.py "$OUT"
echo "$want" > "$STAMP"
echo "nanochat: reference checkpoints ready: $OUT"
