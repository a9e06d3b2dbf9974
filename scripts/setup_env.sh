#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install everything into it.
# Usage: source scripts/setup_env.sh    (or: bash scripts/setup_env.sh)
# Idempotent: a second call only re-checks the installs. VENV overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import fairseq, dsq_fairseq, sacrebleu, sentencepiece, pytest, xdist" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # torch first, pinned to the CPU build on disk (a bare `torch` pulls a multi-GB CUDA build);
  # numpy and cython so fairseq's extensions build against this torch (--no-build-isolation).
  python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" numpy cython setuptools wheel
  python -m pip install -q --no-build-isolation -e "$ROOT[dev]"
fi
