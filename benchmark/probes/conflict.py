"""Gradient conflict between the task loss and the distillation loss: the maths, and the training probe
(:class:`ConflictProbe`) on it.

:func:`gradient_conflict` takes the task loss and the distillation loss of one step *before* ``backward()`` and
returns the cosine between their gradients on the given parameters (overall and per block), the norm ratio
||g_distill|| / ||g_task|| and the two norms. :func:`student_blocks` groups a :class:`TappedModel`'s parameters
into ``stem``, ``stage1`` .. ``stage4`` and ``head``. :class:`ConflictTracker` accumulates the per-step values
over an epoch and summarises them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from hkdbench.benchmark.probes.base import Probe, ProbedRun
from hkdbench.methods.base import TASK_LOSS
from hkdbench.benchmark.core.store import CONFLICT_COSINE, CONFLICT_FRACTION, CONFLICT_NORM_RATIO, CONFLICT_PREFIX

BLOCK_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "head")


def _param_list(params) -> List[nn.Parameter]:
    """Parameters from an iterable of tensors or of (name, tensor) pairs, de-duplicated, order kept."""
    out, seen = [], set()
    for p in params:
        if isinstance(p, tuple):
            p = p[1]
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"expected parameters (tensors), got {type(p).__name__}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _grads(loss: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """d loss / d params with unused (or non-differentiable) parameters given zero gradients."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"gradient_conflict needs scalar losses, got "
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    grads: List[Optional[torch.Tensor]] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    if loss.requires_grad and wanted:
        got = torch.autograd.grad(loss, [params[i] for i in wanted], retain_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            grads[i] = g
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


@dataclass
class _Dots:
    dot: float = 0.0
    task_sq: float = 0.0
    distill_sq: float = 0.0

    def add(self, other: "_Dots") -> None:
        self.dot += other.dot
        self.task_sq += other.task_sq
        self.distill_sq += other.distill_sq


def _cosine(d: _Dots) -> Tuple[float, bool]:
    """(cosine, degenerate): a zero gradient on either side gives cosine 0 and degenerate=True."""
    denom = math.sqrt(d.task_sq) * math.sqrt(d.distill_sq)
    if not denom > 0:
        return 0.0, True
    return max(-1.0, min(1.0, d.dot / denom)), False


@dataclass
class ConflictStats:
    """One step's gradient comparison.

    ``cosine`` is 0 and ``degenerate`` True when either gradient is zero; ``norm_ratio`` is
    ||g_distill|| / ||g_task||, ``inf`` when only the task gradient is zero and 0 when both are. Per-block values
    follow the same rules.
    """
    cosine: float
    norm_ratio: float
    task_norm: float
    distill_norm: float
    degenerate: bool
    block_cosines: Dict[str, float] = field(default_factory=dict)
    block_degenerate: Dict[str, bool] = field(default_factory=dict)
    block_norm_ratios: Dict[str, float] = field(default_factory=dict)

    @property
    def conflicting(self) -> bool:
        return (not self.degenerate) and self.cosine < 0

    def as_dict(self) -> Dict:
        return {"cosine": self.cosine, "norm_ratio": self.norm_ratio, "task_norm": self.task_norm,
                "distill_norm": self.distill_norm, "degenerate": self.degenerate,
                "block_cosines": dict(self.block_cosines), "block_degenerate": dict(self.block_degenerate),
                "block_norm_ratios": dict(self.block_norm_ratios)}


def _ratio(d: _Dots) -> float:
    task, distill = math.sqrt(d.task_sq), math.sqrt(d.distill_sq)
    if task > 0:
        return distill / task
    return math.inf if distill > 0 else 0.0


def gradient_conflict(task_loss: torch.Tensor, distill_loss: torch.Tensor, params: Optional[Iterable] = None,
                      blocks: Optional[Mapping[str, Iterable]] = None) -> ConflictStats:
    """Compare the gradients of the task and distillation losses on ``params``.

    Call it after the forward pass and *before* ``backward()``: both gradients are taken with
    ``torch.autograd.grad(..., retain_graph=True)``, so the graph survives for the real backward, and no ``.grad``
    is touched. Parameters the loss does not reach (or that do not require grad) count as zero gradients.
    ``params`` may be tensors or ``(name, tensor)`` pairs; if None, the union of the ``blocks``. ``blocks`` maps a
    block name to its parameters (e.g. :func:`student_blocks`) and must lie within ``params``. Equal positive
    scalings of both losses (AMP loss scaling) leave cosines and norm ratio unchanged; the norms scale with them.
    The dot products are summed in float64.
    """
    block_lists = {name: _param_list(ps) for name, ps in (blocks or {}).items()}
    if params is None:
        if not block_lists:
            raise ValueError("gradient_conflict needs params or blocks")
        params = [p for ps in block_lists.values() for p in ps]
    plist = _param_list(params)
    if not plist:
        raise ValueError("gradient_conflict got no parameters")
    index = {id(p): i for i, p in enumerate(plist)}
    for name, ps in block_lists.items():
        outside = sum(1 for p in ps if id(p) not in index)
        if outside:
            raise ValueError(f"block {name!r} has {outside} parameter(s) that are not in params")

    g_task = _grads(task_loss, plist)
    g_distill = _grads(distill_loss, plist)
    per_param = []
    for a, b in zip(g_task, g_distill):
        a64, b64 = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
        per_param.append(torch.stack([a64 @ b64, a64 @ a64, b64 @ b64]))
    # One device->host transfer for all parameters.
    table = torch.stack(per_param).cpu().tolist()
    dots = [_Dots(*row) for row in table]

    total = _Dots()
    for d in dots:
        total.add(d)
    cosine, degenerate = _cosine(total)
    stats = ConflictStats(cosine=cosine, norm_ratio=_ratio(total), task_norm=math.sqrt(total.task_sq),
                          distill_norm=math.sqrt(total.distill_sq), degenerate=degenerate)
    for name, ps in block_lists.items():
        block = _Dots()
        for p in ps:
            block.add(dots[index[id(p)]])
        stats.block_cosines[name], stats.block_degenerate[name] = _cosine(block)
        stats.block_norm_ratios[name] = _ratio(block)
    return stats


def student_blocks(tapped_model) -> Dict[str, List[nn.Parameter]]:
    """Group a :class:`TappedModel`'s parameters into 'stem', 'stage1'..'stage4' and 'head'.

    Stage k spans, in parameter registration order, from the first parameter under its entry module
    (``_entry_module_names[k]``) to the last parameter under its output module (``_stage_module_names[k]``), so
    for ViT / Mixer stage k holds blocks.{entry}..blocks.{output}. Parameters before stage 1 are the 'stem'
    (patch embedding, cls/pos tokens, conv stem), those after stage 4 the 'head' (final norm, classifier); any in
    a gap between two stages go to the later stage (they act on its input). Every parameter lands in exactly one
    block. Only the wrapped model's parameters are grouped (not a method's extra modules).
    """
    model = tapped_model.model
    named = list(model.named_parameters())
    names = [n for n, _ in named]

    def positions(module_name: str) -> List[int]:
        hits = [i for i, n in enumerate(names) if n.startswith(module_name + ".") or n == module_name]
        if not hits:
            raise ValueError(f"{tapped_model.name}: stage module {module_name!r} holds no parameters")
        return hits

    starts, ends = [], []
    for stage in sorted(tapped_model._stage_module_names):
        starts.append(positions(tapped_model._entry_module_names[stage])[0])
        ends.append(positions(tapped_model._stage_module_names[stage])[-1])
    for k in range(len(starts)):
        if starts[k] > ends[k] or (k and starts[k] <= ends[k - 1]):
            raise ValueError(f"{tapped_model.name}: stage modules are not in forward order among the "
                             "parameters; cannot group parameters into stages")

    groups: Dict[str, List[nn.Parameter]] = {name: [] for name in BLOCK_NAMES}
    for i, (_, p) in enumerate(named):
        if i < starts[0]:
            groups["stem"].append(p)
        elif i > ends[-1]:
            groups["head"].append(p)
        else:
            stage = next(k for k in range(len(starts)) if i <= ends[k])
            groups[f"stage{stage + 1}"].append(p)
    return groups


class ConflictTracker:
    """Accumulates :class:`ConflictStats` over an epoch (or any window) and summarises them.

    Means and the conflicting fraction are over non-degenerate steps (both gradients non-zero); degenerate
    steps are counted apart. The mean norm ratio is over steps with a finite ratio. Empty means are None.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.history: List[ConflictStats] = []

    def update(self, stats: ConflictStats) -> ConflictStats:
        self.history.append(stats)
        return stats

    def __len__(self) -> int:
        return len(self.history)

    @staticmethod
    def _mean(values: List[float]) -> Optional[float]:
        return sum(values) / len(values) if values else None

    def summary(self) -> Dict:
        steps = self.history
        valid = [s for s in steps if not s.degenerate]
        ratios = [s.norm_ratio for s in steps if math.isfinite(s.norm_ratio) and s.task_norm > 0]
        block_names: List[str] = []
        for s in steps:
            block_names += [b for b in s.block_cosines if b not in block_names]
        block_mean, block_conflict, block_degenerate = {}, {}, {}
        for b in block_names:
            vals = [s.block_cosines[b] for s in steps if b in s.block_cosines and not s.block_degenerate[b]]
            block_mean[b] = self._mean(vals)
            block_conflict[b] = (sum(v < 0 for v in vals) / len(vals)) if vals else None
            block_degenerate[b] = sum(1 for s in steps if s.block_degenerate.get(b, False))
        return {
            "steps": len(steps),
            "degenerate_steps": len(steps) - len(valid),
            "mean_cosine": self._mean([s.cosine for s in valid]),
            "mean_norm_ratio": self._mean(ratios),
            "conflict_fraction": (sum(s.cosine < 0 for s in valid) / len(valid)) if valid else None,
            "mean_task_norm": self._mean([s.task_norm for s in steps]),
            "mean_distill_norm": self._mean([s.distill_norm for s in steps]),
            "block_mean_cosine": block_mean,
            "block_conflict_fraction": block_conflict,
            "block_degenerate_steps": block_degenerate,
        }

    def epoch_summary(self) -> Dict:
        """:meth:`summary` then :meth:`reset`."""
        out = self.summary()
        self.reset()
        return out


class ConflictProbe(Probe):
    """Every ``train.conflict_every`` steps: the cosine between the gradients of the task term (``'ce'``) and of
    the sum of the distillation terms on the student's own parameters, whole model and per block
    (:func:`student_blocks`), via ``torch.autograd.grad`` before the step's backward (extra backward passes only
    on those steps). Per epoch: ``conflict/cosine`` (mean over measured steps), ``conflict/norm_ratio``
    (||g_distill|| / ||g_task||), ``conflict/fraction`` (share of measured steps with cosine < 0),
    ``conflict/steps``, ``conflict/task_norm``, ``conflict/distill_norm``, ``conflict/block/<name>`` (mean cosine)
    and ``conflict/block_fraction/<name>``. A run resumed mid-epoch reports the steps since the resume for that
    epoch."""

    name = "conflict"
    retains_graph = True
    measures = "cosine and norm ratio between the task and the distillation gradients on the student"
    keys = ("conflict/cosine", "conflict/norm_ratio", "conflict/fraction", "conflict/steps", "conflict/task_norm",
            "conflict/distill_norm", "conflict/block/<block>", "conflict/block_fraction/<block>")

    def __init__(self, run: ProbedRun) -> None:
        super().__init__(run)
        self.every = run.cfg.train.conflict_every
        self.tracker = ConflictTracker()
        self.blocks = student_blocks(run.student)

    @staticmethod
    def enabled(cfg) -> bool:
        return bool(cfg.train.conflict_every)

    def measures_step(self, global_step: int) -> bool:
        return global_step % self.every == 0

    def on_losses(self, losses: Dict[str, torch.Tensor], global_step: int, scaler=None) -> None:
        """Under an enabled GradScaler (fp16) both losses are multiplied by its scale against underflow; cosines
        and the norm ratio do not depend on it, the logged norms are divided back."""
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        distill = [v for k, v in losses.items() if k != TASK_LOSS]
        if TASK_LOSS not in losses or not distill:
            return  # the student alone (or a method without a task term): nothing to compare
        task = losses[TASK_LOSS].float() * scale
        distill_sum = sum(v.float() for v in distill) * scale
        stats = gradient_conflict(task, distill_sum, blocks=self.blocks)
        if scale != 1.0:
            stats.task_norm, stats.distill_norm = stats.task_norm / scale, stats.distill_norm / scale
        self.tracker.update(stats)

    def epoch_values(self, epoch: int) -> Dict[str, Any]:
        if not len(self.tracker):
            return {}
        s = self.tracker.epoch_summary()
        out = {CONFLICT_COSINE: s["mean_cosine"], CONFLICT_NORM_RATIO: s["mean_norm_ratio"],
               CONFLICT_FRACTION: s["conflict_fraction"], CONFLICT_PREFIX + "steps": s["steps"],
               CONFLICT_PREFIX + "task_norm": s["mean_task_norm"],
               CONFLICT_PREFIX + "distill_norm": s["mean_distill_norm"]}
        out.update({f"{CONFLICT_PREFIX}block/{b}": v for b, v in s["block_mean_cosine"].items()})
        out.update({f"{CONFLICT_PREFIX}block_fraction/{b}": v for b, v in s["block_conflict_fraction"].items()})
        return out
