#!/usr/bin/env bash
# Install inkpipe with its test extras into ./.venv and run lint, types, dependencies and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/ruff check pipeline numerics train infer cli tests benchmarks
.venv/bin/mypy
.venv/bin/deptry .  # imports and declared dependencies match ([tool.deptry])
.venv/bin/python -m pytest -q "$@"
