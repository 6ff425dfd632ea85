#!/usr/bin/env bash
# The whole test suite: fetch what the tests need (idempotent), then every test target, then
# the exactness tests again on every lower SIMD level this CPU can run, then the real clients,
# the browser and the fuzzer. A failing step does not stop the ones after it (one failure must
# not hide the rest); the script still exits non-zero and names every step that failed.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# Without these nothing else can run: a failure here ends the run at once.
./scripts/setup.sh --test-assets
# Generated-weight models of every family and llama.cpp's log-probs for them (tests/families.rs).
./scripts/families.sh
# Stock llama.cpp's kernels and log-probs on the real models (tests/activations_q8.rs).
./scripts/q8.sh
# nanoGPT checkpoints saved by PyTorch and transformers' log-probs for them (tests/nanogpt.rs).
./scripts/nanogpt.sh
# nanochat checkpoints and tokenizer saved as nanochat saves them, and a PyTorch transcription
# of its GPT.forward's log-probs for them (tests/nanochat.rs).
./scripts/nanochat.sh
./scripts/peft.sh
./scripts/evaluations.sh

failed=()
# step NAME COMMAND...: runs COMMAND, records NAME when it fails, and carries on.
step() {
  local name="$1"
  shift
  echo "test.sh: == $name"
  if ! "$@"; then
    failed+=("$name")
    echo "test.sh: -- $name FAILED (carrying on with the other steps)" >&2
  fi
}

step "cargo test" cargo test --all-targets --no-fail-fast "$@"

# The kernels dispatch on the CPU (src/model/simd.rs): the run above used the best level this
# CPU has. The exactness and batch-invariance tests run again on every lower level it can run
# (TOKENSCOPE_SIMD caps the level), so that a user on an AVX2-only laptop or an ARM machine
# (the portable path) gets what the tests promise. With arguments (a focused local run) and
# with TOKENSCOPE_SKIP_LEVELS=1 they are left out.
cpu_levels() {
  local flags
  flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)"
  has() { for f in "$@"; do [[ " $flags " == *" $f "* ]] || return 1; done; }
  echo portable
  if has avx2 fma f16c; then
    echo avx2
    if has avx512f avx512bw avx512vl; then echo avx512; fi
  fi
}
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_LEVELS:-}" ]; then
  levels=($(cpu_levels))
  best="${levels[-1]}"
  for level in "${levels[@]}"; do
    [ "$level" = "$best" ] && continue
    step "exactness at TOKENSCOPE_SIMD=$level" env TOKENSCOPE_SIMD="$level" \
      cargo test --no-fail-fast --lib --test families --test gemma3 --test qwen2 \
      --test cross_check --test engine -- --skip trains
  done
fi

# The whole suite (no arguments) also runs real OpenAI-ecosystem clients (the openai SDK,
# lm-evaluation-harness) and fuzzes the real server from its OpenAPI document;
# TOKENSCOPE_SKIP_CLIENTS=1 / TOKENSCOPE_SKIP_FUZZ=1 leave them out of a quick local run.
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_CLIENTS:-}" ]; then
  step "clients" ./scripts/clients.sh
fi
# The inspector page in headless Chromium (TOKENSCOPE_SKIP_UI=1 leaves it out).
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_UI:-}" ]; then
  step "ui" ./scripts/ui.sh
fi
if [ "$#" -eq 0 ] && [ -z "${TOKENSCOPE_SKIP_FUZZ:-}" ]; then
  step "fuzz" ./scripts/fuzz.sh
fi

elapsed=$((SECONDS - start))
if [ "${#failed[@]}" -gt 0 ]; then
  echo "test.sh: FAILED after ${elapsed}s: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: every step passed in ${elapsed}s"
