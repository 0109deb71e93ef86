#!/usr/bin/env bash
# The test suite: set-up, the linter (ruff, configured in pyproject.toml), then pytest. Extra arguments go to
# pytest (e.g. -k fitnet, -m "not slurm").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
echo "[lint] ruff check"
.venv/bin/ruff check .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: no thread contention in subprocesses
exec .venv/bin/python -m pytest -q "$@"
