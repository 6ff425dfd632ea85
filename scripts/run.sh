#!/usr/bin/env bash
# Start tokenscope on the default model (fetched on first use). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --quiet
exec ./target/release/tokenscope inspect "${@:-The capital of France is}"
