"""The one home of the method order and colours shared by every table and figure."""
from __future__ import annotations

from typing import Dict, Iterable, List

BASELINE = "none"          # the student trained alone
REFERENCE = "kd"           # the plain logit-distillation reference of the paired differences
METHOD_ORDER = [BASELINE, "kd", "dkd", "dist", "fitnet", "ofa", "pat", "hcd", "spofa"]
# tab10, one colour per known method in METHOD_ORDER; a method outside the list gets the next free colour
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


def method_key(method: str):
    """Sort key: the known methods in METHOD_ORDER, then any other by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def ordered(methods: Iterable[str]) -> List[str]:
    return sorted(set(methods), key=method_key)


def palette(methods: Iterable[str]) -> Dict[str, str]:
    """A fixed colour per method: the same method has the same colour in every figure."""
    extra = sorted(set(methods) - set(METHOD_ORDER))
    everything = METHOD_ORDER + extra
    return {m: _TAB10[i % len(_TAB10)] for i, m in enumerate(everything)}
