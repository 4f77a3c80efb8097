#!/usr/bin/env bash
# The whole test suite: installs the Python and npm clients it drives, then runs every Rust
# test (unit, turmoil, real-process, real-client). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
./tests/clients/install.sh
export SQLD_TEST_PYTHON="$PWD/tests/clients/.venv/bin/python"
export SQLD_TEST_CLIENTS_DIR="$PWD/tests/clients"
cargo test --workspace "$@"
