#!/usr/bin/env bash
# The reference for tests/activations_q8.rs: stock llama.cpp's log-probs for the real test
# models (scripts/q8/generate.py), from the llama-cpp-python scripts/families.sh builds (run
# first; its one patch is off unless GGML_GELU_F32 is set). Re-runs only when the script, the
# models or llama.cpp change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-ref"
OUT=target/q8
STAMP="$OUT/.stamp"
MODELS=(models/SmolLM2-135M-Instruct.Q4_1.gguf
        models/gemma-3-270m-q4_k_m.gguf
        models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "q8: $VENV is missing; run ./scripts/families.sh first" >&2
  exit 1
fi
want="$( (cat scripts/q8/generate.py "$VENV/.gelu-f32"; for m in "${MODELS[@]}"; do stat -c '%n %s' "$m"; done) | sha256 /dev/stdin)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "q8: llama.cpp's log-probs present: $OUT"
  exit 0
fi
rm -rf "$OUT"
env -u GGML_GELU_F32 "$VENV/bin/python" scripts/q8/generate.py "$OUT" "${MODELS[@]}"
echo "$want" > "$STAMP"
echo "q8: llama.cpp's log-probs ready: $OUT"
