#!/usr/bin/env bash
# The reference for tests/nanogpt.rs: CPU PyTorch, transformers and tiktoken from PyPI in the venv
# of scripts/lib/torch-reference.sh (installed once per machine, reused by every clone),
# then scripts/nanogpt/generate.py, which saves random-weight nanoGPT checkpoints with
# torch.save (as nanoGPT's train.py does), a meta.pkl, a few malformed files, and transformers'
# GPT2LMHeadModel's log-probs for the same weights into target/nanogpt/. Needs GPT-2's BPE in
# models/gpt2-tokenizer/ (./scripts/setup.sh). Re-runs only when the script or pins change.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/lib/torch-reference.sh
torch_reference nanogpt models/gpt2-tokenizer
