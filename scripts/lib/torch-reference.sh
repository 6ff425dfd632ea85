# Sourced by scripts/nanogpt.sh and scripts/nanochat.sh: the CPU PyTorch venv they share in the
# machine's cache (scripts/lib/cache.sh: installed once, ~3 min, reused by every clone; PEFT
# and gguf are added to it by scripts/peft.sh), and the run of a reference generator.
#
# torch_reference NAME [ARGS...]: runs scripts/NAME/generate.py target/NAME ARGS... with the
# venv's Python, unless target/NAME was made by the same generate.py and pins already.

. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-torch"
PINS="torch==2.9.1 transformers==4.57.1 tiktoken==0.12.0 numpy==2.4.6"

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

torch_reference() {
  local name="$1"
  shift
  cache_lock "$(basename "$VENV")"
  if ! "$VENV/bin/python" -c "import torch, transformers, tiktoken, numpy" 2>/dev/null ||
     [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$PINS" ]; then
    echo "$name: installing $PINS into $VENV (once per machine) ..."
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install --quiet $PINS
    echo "$PINS" > "$VENV/.pins"
  fi
  local out="target/$name" want
  want="$(cat "scripts/$name/generate.py" "$VENV/.pins" | sha256 /dev/stdin)"
  if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$want" ]; then
    echo "$name: reference checkpoints present: $out"
    return 0
  fi
  rm -rf "$out"
  "$VENV/bin/python" "scripts/$name/generate.py" "$out" "$@"
  echo "$want" > "$out/.stamp"
  echo "$name: reference checkpoints ready: $out"
}
