#!/usr/bin/env bash
# The whole test suite: fetch what the tests need (idempotent), then every test target.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --all-targets "$@"
