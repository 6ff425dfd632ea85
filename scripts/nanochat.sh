#!/usr/bin/env bash
# The reference for tests/nanochat.rs: CPU PyTorch and tiktoken from PyPI in the venv of
# scripts/lib/torch-reference.sh (installed once per machine, reused by every clone), then
# scripts/nanochat/generate.py, which trains a small byte-level BPE and pickles its tiktoken
# Encoding (as nanochat's tokenizer.py saves it), saves random-weight nanochat checkpoints
# (model_<step>.pt + meta_<step>.json, as base_train.py does), a few malformed folders, and a
# float64 transcription of upstream's GPT.forward's log-probs into target/nanochat/. Needs
# nothing else. Re-runs only when the script or pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/torch-reference.sh
torch_reference nanochat
