#!/usr/bin/env bash
# The reference for tests/peft.rs: PEFT (pinned) added to the PyTorch venv of
# scripts/nanogpt.sh (run first), then scripts/peft/generate.py, which writes a tiny random
# Llama (transformers), LoRA adapters made by PEFT on it, and PEFT's own log-probs for them
# into target/peft/. Re-runs only when the script or the pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-torch"
cache_lock "$(basename "$VENV")"
OUT=target/peft
STAMP="$OUT/.stamp"
PEFT_PIN="peft==0.17.1 gguf==0.19.0"

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "peft: $VENV is missing; run ./scripts/nanogpt.sh first" >&2
  exit 1
fi
if [ "$(cat "$VENV/.peft" 2>/dev/null)" != "$PEFT_PIN" ] || ! "$VENV/bin/python" -c "import peft, gguf" 2>/dev/null; then
  echo "peft: installing $PEFT_PIN into $VENV (once per machine) ..."
  # --no-deps: their dependencies (torch, transformers, safetensors, numpy, ...) are the venv's
  # pinned ones. gguf lets transformers read a GGUF base (tests/peft.rs).
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --no-deps $PEFT_PIN
  "$VENV/bin/pip" install --quiet "accelerate==1.11.0" "psutil" "pyyaml" "tqdm"
  echo "$PEFT_PIN" > "$VENV/.peft"
fi

want="$(cat scripts/peft/generate.py "$VENV/.pins" "$VENV/.peft" | sha256 /dev/stdin)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "peft: reference adapters present: $OUT"
  exit 0
fi
rm -rf "$OUT"
"$VENV/bin/python" scripts/peft/generate.py "$OUT" models/gpt2-tokenizer
echo "$want" > "$STAMP"
echo "peft: reference adapters ready: $OUT"
