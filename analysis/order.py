"""The one home of the method order, the method labels and the colours shared by every table and figure.

A **label** names what a table column or a figure series stands for: the method, then in brackets the settings that
set it apart, ``kd``, ``kd[temperature=4]``, ``kd[teacher: train.epochs=7]``, ``kd[temperature=4; teacher: ...]``
(:func:`.collect.label_runs` decides which settings). A plain method name is a label too (its default).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

BASELINE = "none"          # the student trained alone
REFERENCE = "kd"           # the plain logit-distillation reference of the paired differences
METHOD_ORDER = [BASELINE, "kd", "dkd", "dist", "fitnet", "ofa", "pat", "hcd", "spofa"]
# tab10, one colour per known method in METHOD_ORDER; the colours left, then tab20's light shades, go to the other
# labels (a method outside the list, a method's variant) in label order
_TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
_TAB20_LIGHT = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d",
                "#9edae5"]
_OPEN, _CLOSE = "[", "]"


def method_label(method: str, settings: Sequence[str] = (), teacher: Sequence[str] = ()) -> str:
    """``method[settings; teacher: items]``: the plain method where nothing sets the runs apart."""
    parts = [", ".join(settings)] if settings else []
    if teacher:
        parts.append("teacher: " + ", ".join(teacher))
    return f"{method}{_OPEN}{'; '.join(parts)}{_CLOSE}" if parts else method


def method_of(label: str) -> str:
    """The method a label stands for (registry names hold no bracket)."""
    return label.split(_OPEN, 1)[0]


def method_key(label: str):
    """Sort key: the known methods in METHOD_ORDER, then any other by name; a method's default before its
    variants, the variants by label."""
    method = method_of(label)
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, method, label != method, label


def ordered(labels: Iterable[str]) -> List[str]:
    return sorted(set(labels), key=method_key)


def palette(labels: Iterable[str]) -> Dict[str, str]:
    """A fixed colour per known method (its default label) in every figure; the other labels of a figure take the
    spare colours in label order."""
    known = {m: _TAB10[i] for i, m in enumerate(METHOD_ORDER)}
    spare = _TAB10[len(METHOD_ORDER):] + _TAB20_LIGHT
    others = [label for label in ordered(labels) if label not in known]
    return known | {label: spare[i % len(spare)] for i, label in enumerate(others)}
