#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite: ruff, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k schedule`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup_env.sh
source scripts/setup_env.sh
ruff check dsq_fairseq tests benchmarks
python -m pytest -q -p no:cacheprovider "$@"
