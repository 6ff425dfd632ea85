#!/usr/bin/env bash
# The whole test suite: fetch what the tests need (idempotent), then every test target.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test-assets
# Generated-weight models of every family and llama.cpp's log-probs for them (tests/families.rs).
./scripts/families.sh
cargo test --all-targets "$@"
# The whole suite (no arguments) also runs real OpenAI-ecosystem clients (the openai SDK,
# lm-evaluation-harness) and fuzzes the real server from its OpenAPI document;
# TOKENSCOPE_SKIP_CLIENTS=1 / TOKENSCOPE_SKIP_FUZZ=1 leave them out of a quick local run.
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_CLIENTS:-}" ]; then
  ./scripts/clients.sh
fi
# The inspector page in headless Chromium (TOKENSCOPE_SKIP_UI=1 leaves it out).
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_UI:-}" ]; then
  ./scripts/ui.sh
fi
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_FUZZ:-}" ]; then
  ./scripts/fuzz.sh
fi
