"""Records the golden runs (tests/_golden.py) into tests/golden/runs.json, after a deliberate change of what runs
compute and the bump of the version it changed (PIPELINE_VERSION in benchmark/core/config.py, or the method's
``version``). ``--compare`` records nothing: it trains the goldens again and prints each one's largest relative
difference from the stored numbers (how far this CPU's rounding lies from the recording's)."""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _golden  # noqa: E402


def _largest_relative_difference(expected, measured) -> float:
    pairs = [(e, g) for key in expected["epochs"] for e, g in zip(expected["epochs"][key], measured["epochs"][key])]
    pairs += list(zip(expected["weights"], measured["weights"]))
    return max(abs(g - e) / max(abs(e), 1e-12) for e, g in pairs if math.isfinite(e))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--compare", action="store_true", help="train and compare with the stored goldens")
    parser.add_argument("--only", nargs="*", help="these goldens only (a method name, 'teacher', 'paper')")
    args = parser.parse_args(argv)
    names = args.only or _golden.golden_names()
    unknown = sorted(set(names) - set(_golden.golden_names()))
    if unknown:
        parser.error(f"unknown golden(s) {', '.join(unknown)}; known: {', '.join(_golden.golden_names())}")
    with tempfile.TemporaryDirectory() as runs:
        measured = {name: _golden.run_golden(name, Path(runs)) for name in names}
    if args.compare:
        stored = _golden.load()["runs"]
        for name, numbers in measured.items():
            print(f"{name}: largest relative difference {_largest_relative_difference(stored[name], numbers):.2e}")
        return 0
    golden = _golden.load() if _golden.GOLDEN_FILE.exists() else {"runs": {}}
    golden["runs"].update({name: {"versions": _golden.version_of(name), **numbers}
                           for name, numbers in measured.items()})
    golden.update(rtol=_golden.RTOL, weights_rtol=_golden.WEIGHTS_RTOL, atol=_golden.ATOL)
    _golden.GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    _golden.GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"recorded {', '.join(names)} in {_golden.GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
