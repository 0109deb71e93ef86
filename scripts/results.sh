#!/usr/bin/env bash
# Regenerates results/ on this machine from one clean commit: the `results` preset sweep in cohorts, the overhead
# benchmark for each of its pairs, then the report. Every run is trained in a build store outside git's view
# (build/results/runs: a store inside the tracked results/runs would mark each run's git sha -dirty while it
# changes), which then replaces results/runs. Run it again after a stop: finished runs are reused.
#   bash scripts/results.sh                 # the sweep (about 40 min on a 2-core CPU), then the report
#   bash scripts/results.sh --report-only   # just the tables and figures from results/runs (~1 min)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
hkdbench=.venv/bin/hkdbench
build=build/results/runs

if [[ "${1:-}" != "--report-only" ]]; then
  changed=$(git status --porcelain --untracked-files=no -- . ':(exclude)results')
  if [[ -n "$changed" ]]; then
    echo "results.sh: uncommitted changes outside results/; commit them first (every run must name one clean commit):" >&2
    echo "$changed" >&2
    exit 2
  fi
  sha=$(git rev-parse HEAD)
  # a build store of another commit is not resumed: its runs would name another code
  if [[ -d "$build" ]] && ! .venv/bin/python scripts/check_run_shas.py "$build" "$sha" --quiet; then
    echo "results.sh: $build holds runs of another commit; starting a fresh build store" >&2
    rm -rf "$build"
  fi
  mkdir -p "$build"
  # one thread per run, two runs at a time: the fastest use of a 2-core CPU (see docs/reference/tests.md)
  "$hkdbench" sweep results --cohort --executor local --parallel 2 --runs-dir "$build"
  for pair in "resnet_mini vit_mini" "vit_mini mixer_mini" "mixer_mini resnet_mini"; do
    read -r teacher student <<<"$pair"
    "$hkdbench" overhead --teacher "$teacher" --student "$student" --methods none,kd,dkd,dist,fitnet,ofa,spofa \
      --batch-size 128 --img-size 32 --num-classes 10 --warmup 2 --repeats 5 --runs-dir "$build"
  done
  .venv/bin/python scripts/check_run_shas.py "$build" "$sha"
  rm -rf results/runs
  cp -a "$build" results/runs
fi
"$hkdbench" report --runs-dir results/runs --out results
