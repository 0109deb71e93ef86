"""Checks that every run of a store was trained by one clean commit: each run's env.json names ``SHA`` as its git
sha, without ``-dirty``. Exit 0 when they all do; 1, listing the runs that do not, otherwise (``--quiet``: no list).
``scripts/results.sh`` runs it before it commits a store to results/.

    .venv/bin/python scripts/check_run_shas.py build/results/runs "$(git rev-parse HEAD)"
"""
import argparse
import sys
from collections import Counter

from hkdbench.benchmark.core.store import RunStore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="the run store")
    parser.add_argument("sha", help="the commit every run must name")
    parser.add_argument("--quiet", action="store_true", help="no list of the runs that differ")
    args = parser.parse_args(argv)
    shas = {}
    for run in RunStore(args.store).runs():
        try:
            shas[run.path.name] = run.env().get("git_sha")
        except (OSError, ValueError):
            shas[run.path.name] = None  # not yet started, or its env.json is damaged
    other = {name: sha for name, sha in shas.items() if sha != args.sha}
    if not args.quiet:
        print(f"{len(shas) - len(other)} of {len(shas)} runs name {args.sha[:12]}"
              + (f"; the others: {dict(Counter(other.values()))}" if other else ""))
        for name in sorted(other):
            print(f"  {name}: {other[name]}")
    return 1 if other else 0


if __name__ == "__main__":
    sys.exit(main())
