#!/usr/bin/env bash
# The reference for tests/nanogpt.rs: CPU PyTorch, transformers and tiktoken from PyPI in a venv
# in the machine's cache (scripts/lib/cache.sh: installed once, ~3 min, reused by every clone),
# then scripts/nanogpt/generate.py, which saves random-weight nanoGPT checkpoints with
# torch.save (as nanoGPT's train.py does), a meta.pkl, a few malformed files, and transformers'
# GPT2LMHeadModel's log-probs for the same weights into target/nanogpt/. Needs GPT-2's BPE in
# models/gpt2-tokenizer/ (./scripts/setup.sh). Re-runs only when the script or pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-torch"
cache_lock "$(basename "$VENV")"
OUT=target/nanogpt
STAMP="$OUT/.stamp"
PINS="torch==2.9.1 transformers==4.57.1 tiktoken==0.12.0 numpy==2.4.6"

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if ! "$VENV/bin/python" -c "import torch, transformers, tiktoken, numpy" 2>/dev/null ||
   [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
  echo "nanogpt: installing $PINS into $VENV (once per machine) ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet $PINS
  echo "$PINS" > "$VENV/.pins"
fi

want="$(cat scripts/nanogpt/generate.py "$VENV/.pins" | sha256 /dev/stdin)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "nanogpt: reference checkpoints present: $OUT"
  exit 0
fi
rm -rf "$OUT"
"$VENV/bin/python" scripts/nanogpt/generate.py "$OUT" models/gpt2-tokenizer
echo "$want" > "$STAMP"
echo "nanogpt: reference checkpoints ready: $OUT"
