#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite: ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k schedule`. Tests run in
# TEST_WORKERS (default 2) pytest-xdist processes, one test file per worker at a time (module
# fixtures such as the reproduction-script runs are built once); TEST_WORKERS=0: one process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
ruff check dsq_fairseq tests benchmarks
python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
