#!/usr/bin/env bash
# Regenerates results/ on this machine, as committed: the demo preset sweep in cohorts (every run already in
# results/runs is skipped, so on a fresh clone this only re-runs what is missing), the overhead benchmark for one pair
# per teacher family, then the report. Pass --report-only to redo just the tables and figures from the stored runs (~1 min).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
hkdbench=.venv/bin/hkdbench
if [[ "${1:-}" != "--report-only" ]]; then
  # one thread per run, two runs at a time: the fastest use of a 2-core CPU (see docs/reference/tests.md)
  "$hkdbench" sweep demo --cohort --executor local --parallel 2 --runs-dir results/runs
  for pair in "resnet_mini vit_mini" "vit_mini mixer_mini" "mixer_mini resnet_mini"; do
    read -r teacher student <<<"$pair"
    "$hkdbench" overhead --teacher "$teacher" --student "$student" --batch-size 128 --img-size 32 --num-classes 10 \
      --warmup 2 --repeats 5 --runs-dir results/runs
  done
fi
"$hkdbench" report --runs-dir results/runs --out results
