#!/usr/bin/env bash
# The test suite: set-up, then pytest. Extra arguments go to pytest (e.g. -k fitnet, -m "not slurm").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: no thread contention in subprocesses
exec .venv/bin/python -m pytest -q "$@"
