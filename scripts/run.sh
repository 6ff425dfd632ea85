#!/usr/bin/env bash
# Start the tokenscope service on the default model (fetched on first use) at
# http://127.0.0.1:8000 (docs at /docs). Extra arguments go to `tokenscope serve`,
# e.g. ./scripts/run.sh --port 9000 --api-key SECRET
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo "run: building tokenscope (release) ..."
cargo build --release --quiet
exec "${CARGO_TARGET_DIR:-target}/release/tokenscope" serve "$@"
