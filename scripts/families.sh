#!/usr/bin/env bash
# The reference for the family tests (tests/families.rs): builds llama-cpp-python into the
# machine's cache (scripts/lib/cache.sh: once, ~4 min on 2 cores, reused by every clone), then
# runs scripts/families/generate.py, which writes a tiny random-weight model per family (GGUF
# + HF directory) and llama.cpp's log-probs for it
# into target/families/. Re-run only when the script, the vocabularies or llama.cpp change.
#
# One patch to llama.cpp, and why: its CPU backend evaluates GELU through an f16 lookup
# table (`#define GGML_GELU_FP16` in ggml/src/ggml-cpu/vec.h: the input is rounded to f16
# and so is the result), which moves Gemma 2's and GPT-2's log-probs by up to 1e-2 on these
# models. The patch makes the table a run-time choice: with GGML_GELU_F32 in the environment
# (scripts/families/generate.py sets it) llama.cpp computes the same tanh GELU in f32
# (`ggml_gelu_f32`) and is an f32 reference for every family; without it, it is stock
# llama.cpp, the reference of `--activations q8` (scripts/llamacpp-q8/generate.py). Nothing
# else is changed, and the build has native CPU detection off.
set -euo pipefail
cd "$(dirname "$0")/.."

LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
. scripts/lib/cache.sh
VENV="$TOKENSCOPE_CACHE/venv-ref"
cache_lock "$(basename "$VENV")"
OUT=target/families
STAMP="$OUT/.stamp"

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

# The stamp names the llama.cpp build, so that a changed pin rebuilds the cached venv.
BUILD="llama-cpp-python $LCP_VERSION $LCP_SHA256, GELU table unless GGML_GELU_F32"
if ! "$VENV/bin/python" -c "import llama_cpp, gguf, numpy, safetensors" 2>/dev/null ||
   [ "$(cat "$VENV/.gelu-f32" 2>/dev/null)" != "$BUILD" ]; then
  echo "families: building llama-cpp-python $LCP_VERSION (GELU switch) into $VENV ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "gguf==0.19.0" "numpy>=1.26,<3" "safetensors==0.8.0"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$VENV/bin/python" - "$work" "$LCP_VERSION" <<'PY'
import re, sys, urllib.request
folder, version = sys.argv[1], sys.argv[2]
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(u for u in re.findall(r'href="([^"#]+)', index) if u.endswith("/" + name))
open(f"{folder}/{name}", "wb").write(urllib.request.urlopen(url, timeout=300).read())
PY
  sdist="$work/llama_cpp_python-$LCP_VERSION.tar.gz"
  got="$(sha256 "$sdist")"
  if [ "$got" != "$LCP_SHA256" ]; then
    echo "families: checksum mismatch for $sdist ($got)" >&2
    exit 1
  fi
  tar -xzf "$sdist" -C "$work"
  src="$work/llama_cpp_python-$LCP_VERSION"
  vec="$src/vendor/llama.cpp/ggml/src/ggml-cpu/vec.h"
  "$VENV/bin/python" - "$vec" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
table = "GGML_CPU_FP16_TO_FP32(ggml_table_gelu_f16[t])"
if src.count(table) != 2 or src.count("#define GGML_GELU_QUICK_FP16\n") != 1:
    sys.exit(f"families: the GELU table lookups were not found in {path}")
src = src.replace(table, f"(ggml_gelu_f32_env() ? ggml_gelu_f32(x[i]) : {table})")
src = src.replace("#define GGML_GELU_QUICK_FP16\n", "#define GGML_GELU_QUICK_FP16\n"
    "#include <stdlib.h>\n"
    "static inline int ggml_gelu_f32_env(void) {\n"
    "    static int on = -1;\n"
    "    if (on < 0) on = getenv(\"GGML_GELU_F32\") != NULL;\n"
    "    return on;\n"
    "}\n")
open(path, "w").write(src)
PY
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install --quiet "$src"
  echo "$BUILD" > "$VENV/.gelu-f32"
fi

want="$(cat scripts/families/generate.py models/vocab/*.gguf "$VENV/.gelu-f32" | sha256 /dev/stdin)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "families: reference models present: $OUT"
  exit 0
fi
rm -rf "$OUT"
"$VENV/bin/python" scripts/families/generate.py "$OUT" models/vocab
echo "$want" > "$STAMP"
