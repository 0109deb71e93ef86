"""The sum over the ranks as DDP's all-reduce gives it to power-of-two counts: a balanced tree in rank order (the
gradients, ``ranks.py``; the means a method takes, ``exchange.py``; the BatchNorm statistics, ``dist_bn.py``)."""
from __future__ import annotations

from typing import List, Optional

import torch


class PairwiseSum:
    """Per-parameter gradient lists summed as a balanced binary tree in the order they are added (a pairwise
    summation: at most log2(n) + 1 lists held). ``None`` is a parameter without a gradient in that list."""

    def __init__(self):
        self._stack: List[tuple] = []  # (level, grads)

    def add(self, grads: List[Optional[torch.Tensor]]) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            grads = _add(self._stack.pop()[1], grads)
            level += 1
        self._stack.append((level, grads))

    def total(self) -> List[Optional[torch.Tensor]]:
        _, total = self._stack.pop()
        while self._stack:
            total = _add(self._stack.pop()[1], total)
        return total


def _add(left: List[Optional[torch.Tensor]], right: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    return [b if a is None else a if b is None else a.add_(b) for a, b in zip(left, right)]
