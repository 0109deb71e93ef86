"""What ``hkdbench overhead`` prints after measuring: the ratio table with the spread of the timed steps, and a
warning when that spread says the machine was loaded (its timings then do not compare methods)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

from .order import ordered

# A timed step that differs from the median by this fraction of it: on an idle machine repeats of one step agree to
# a few per cent; other work on the cores (or a throttled device) spreads them far wider.
LOADED_SPREAD = 0.25


def _span(r: Dict[str, Any]) -> tuple:
    """(min, median, max) of the timed steps in ms; max is None where the record predates per-repeat times."""
    times: Optional[List[float]] = r.get("step_times_ms")
    median = r["step_time_ms"]
    if times:
        return min(times), median, max(times)
    return r.get("step_time_ms_min", median), median, None


def _ratio(v) -> str:
    return f"{v:8.2f}x" if v is not None else f"{'n/a':>9}"


def print_overhead_table(results: Dict[str, Dict[str, Any]], echo: Callable[[str], None] = print) -> bool:
    """Echoes one row per method (step time min / median / max and spread, its ratio to the student alone and to
    KD, the FLOPs and memory ratios, extra parameters) and a warning naming the methods whose timed steps spread
    more than ``LOADED_SPREAD`` of their median. Returns whether the machine looked loaded."""
    echo(f"{'method':<8} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'spread':>7} {'step/none':>9} "
         f"{'step/kd':>9} {'FLOPs/none':>10} {'mem/none':>9} {'extra':>9}")
    noisy = []
    for name in ordered(results):
        r = results[name]
        low, median, high = _span(r)
        spread = ((high if high is not None else median) - low) / median
        if spread > LOADED_SPREAD:
            noisy.append(f"{name} ({spread:.0%})")
        top = f"{high:9.1f}" if high is not None else f"{'n/a':>9}"
        echo(f"{name:<8} {low:9.1f} {median:10.1f} {top} "
             f"{spread:6.0%} {_ratio(r.get('step_time_ms_vs_none'))} {_ratio(r.get('step_time_ms_vs_kd'))} "
             f"{_ratio(r.get('train_gflops_per_image_vs_none')):>10} {_ratio(r.get('peak_memory_mb_vs_none'))} "
             f"{r.get('extra_params', 0) / 1e6:8.3f}M")
    echo("spread: (slowest - fastest) / median of the timed steps ((median - fastest) / median where a stored "
         "record lacks the per-step times); ratios of medians")
    if noisy:
        echo(f"warning: the machine looks loaded: timed steps spread more than {LOADED_SPREAD:.0%} of their median "
             f"for {', '.join(noisy)}; step times and their ratios are not reliable. Re-run on an idle machine "
             "(--restart) or with more --repeats")
    return bool(noisy)
