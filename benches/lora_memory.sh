#!/usr/bin/env bash
# Peak resident memory and checkpoint size of a full fine-tune against a LoRA run on the same
# model, batch and sequence length (issue 27's memory goal: LoRA ≤ 0.5× the full job's peak).
# Each run is its own `tokenscope train` process, measured by GNU time's maximum resident set.
#
#   benches/lora_memory.sh [MODEL] [STEPS]     (default: the default model, 4 steps)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
STEPS="${2:-4}"
BIN="${BIN:-target/release/tokenscope}"
[ -x "$BIN" ] || cargo build --release --quiet
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 scripts/make_demo_corpus.py "$work/corpus.txt" >/dev/null
echo "model $MODEL · batch 4 · seq_len 128 · $STEPS steps · $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for method in full lora; do
  extra=()
  [ "$method" = lora ] && extra=(--lora-r 8 --lora-alpha 32)
  out="$work/$method"
  /usr/bin/time -f "%M" -o "$work/$method.rss" "$BIN" train --model "$MODEL" --data "$work/corpus.txt" \
    --output "$out" --steps "$STEPS" --batch-size 4 --seq-len 128 --save-every "$STEPS" \
    --eval-every 0 "${extra[@]}" >/dev/null 2>&1
  peak_kib="$(cat "$work/$method.rss")"
  ck="$(du -sk "$out/checkpoints" | cut -f1)"
  printf '%-5s peak RSS %6d MiB · checkpoint %8d KiB\n' "$method" $((peak_kib / 1024)) "$ck"
done
