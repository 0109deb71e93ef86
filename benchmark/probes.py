"""Analysis probes: CKA between teacher and student stages, and gradient conflict between task and distillation.

CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited")
------------------------------------------------------------------------------------------
For two feature matrices X (n x p) and Y (n x q) of the same n examples, with Gram matrices K = k(X, X) and
L = l(Y, Y)::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L))

Kernels:

* ``linear``: K = X X^T.
* ``rbf``: K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)) with sigma = ``sigma_frac`` x the median pairwise distance.
  As in Kornblith's reference code (``gram_rbf``), sigma^2 = sigma_frac^2 x median of the full n x n matrix of
  squared distances (diagonal included; an even count takes the mean of the two middle values, as numpy does).
  In minibatch accumulation the bandwidth is taken per minibatch.

HSIC estimators:

* biased (Gretton et al., 2005): HSIC_0(K, L) = tr(K H L H) / (n - 1)^2, H = I - 11^T / n.
* unbiased (Song et al., 2012), used for minibatch CKA by Nguyen et al. (2021, "Do Wide and Deep Networks Learn
  the Same Things?"); with K~, L~ the Gram matrices with their diagonals set to zero::

      HSIC_1(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n - 1)(n - 2)) - 2/(n - 2) 1^T K~ L~ 1 ] / (n (n - 3))

  It needs n > 3 samples; a smaller minibatch raises ``ValueError``.

Minibatch CKA (Nguyen et al., 2021) sums the per-minibatch HSICs over k minibatches::

    CKA_minibatch = sum_i HSIC(K_i, L_i) / sqrt(sum_i HSIC(K_i, K_i) * sum_i HSIC(L_i, L_i))

which :class:`CKAAccumulator` computes for every teacher-stage x student-stage pair. All HSIC arithmetic is done
in float64. A representation whose Gram matrix has zero HSIC with itself (constant features) has no defined
CKA: the value is NaN.

Feature preparation (:func:`flatten_features`) is the same for every family so the two sides are comparable:
``pool='none'`` flattens a stage feature to (B, C*H*W) ('nchw') or (B, L*D) ('tokens', prefix tokens already
split off by :class:`TappedModel`); ``pool='mean'`` averages over space / tokens to (B, C) or (B, D).

Gradient conflict
-----------------
:func:`gradient_conflict` takes the task loss and the distillation loss of one step *before* ``backward()`` and
returns the cosine between their gradients on the given parameters (overall and per block), the norm ratio
||g_distill|| / ||g_task|| and the two norms. :func:`student_blocks` groups a :class:`TappedModel`'s parameters
into ``stem``, ``stage1`` .. ``stage4`` and ``head``. :class:`ConflictTracker` accumulates the per-step values
over an epoch and summarises them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

KERNELS = ("linear", "rbf")
POOLS = ("none", "mean")
LAYOUTS = ("nchw", "tokens")
BLOCK_NAMES = ("stem", "stage1", "stage2", "stage3", "stage4", "head")

# Feature columns per chunk when forming X X^T in float64, to bound the memory of the float64 copy.
_GRAM_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------------
# Feature preparation
# --------------------------------------------------------------------------------------------------------------

def _layout_of(spec) -> str:
    """A layout string from a string or anything with a ``layout`` attribute (:class:`StageInfo`)."""
    layout = getattr(spec, "layout", spec)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown feature layout {layout!r}; layouts are {LAYOUTS}")
    return layout


def flatten_features(x: torch.Tensor, layout, pool: str = "none") -> torch.Tensor:
    """One stage feature -> a (B, features) matrix for CKA.

    ``layout`` is 'nchw' for (B, C, H, W) maps or 'tokens' for (B, L, D) patch tokens (prefix tokens already
    split off), or a :class:`StageInfo`. ``pool='none'`` flattens everything ((B, C*H*W) or (B, L*D));
    ``pool='mean'`` takes the global average over space ((B, C)) or over tokens ((B, D)).
    """
    layout = _layout_of(layout)
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; pools are {POOLS}")
    expected = 4 if layout == "nchw" else 3
    if x.dim() != expected:
        raise ValueError(f"a {layout!r} feature must have {expected} dimensions "
                         f"({'B, C, H, W' if layout == 'nchw' else 'B, L, D'}), got shape {tuple(x.shape)}")
    if pool == "mean":
        return x.mean(dim=(2, 3)) if layout == "nchw" else x.mean(dim=1)
    return x.reshape(x.shape[0], -1)


# --------------------------------------------------------------------------------------------------------------
# Gram matrices and HSIC
# --------------------------------------------------------------------------------------------------------------

def _check_matrix(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be an (n, features) matrix, got shape {tuple(x.shape)}; "
                         "use flatten_features() for stage features")


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """K = X X^T in float64 for an (n, p) matrix (the feature dimension is chunked to bound memory)."""
    _check_matrix(x)
    x = x.detach()
    n, p = x.shape
    chunk = max(1, _GRAM_CHUNK_ELEMENTS // max(n, 1))
    if p <= chunk:
        xd = x.to(torch.float64)
        return xd @ xd.T
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, p, chunk):
        xc = x[:, start:start + chunk].to(torch.float64)
        gram += xc @ xc.T
    return gram


def _median_all(values: torch.Tensor) -> torch.Tensor:
    """Median of all entries, averaging the two middle values for an even count (numpy's convention)."""
    flat = values.reshape(-1).sort().values
    m = flat.numel()
    if m % 2:
        return flat[m // 2]
    return 0.5 * (flat[m // 2 - 1] + flat[m // 2])


def gram_rbf(x: torch.Tensor, sigma_frac: float = 0.8) -> torch.Tensor:
    """RBF Gram matrix, exp(-d_ij^2 / (2 sigma^2)), sigma^2 = sigma_frac^2 * median(d^2) (Kornblith's gram_rbf)."""
    if not sigma_frac > 0:
        raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")
    dots = gram_linear(x)
    sq_norms = torch.diagonal(dots)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * dots).clamp_min(0.0)
    median = _median_all(sq_dist)
    if not median > 0:
        # More than half of all pairs coincide: no scale to set a bandwidth by.
        raise ValueError("RBF CKA: the median squared distance between samples is 0 (mostly identical "
                         "features), so the bandwidth is undefined; use kernel='linear'")
    return torch.exp(-sq_dist / (2.0 * sigma_frac ** 2 * median))


def gram(x: torch.Tensor, kernel: str = "linear", sigma_frac: float = 0.8) -> torch.Tensor:
    """The Gram matrix of an (n, features) matrix under ``kernel`` (float64).

    When all n rows are identical the kernel matrix is constant, which both HSIC estimators map to exactly 0;
    a zero matrix is returned so that rounding cannot make a constant representation look informative (its CKA
    comes out NaN).
    """
    _check_matrix(x)
    if x.shape[0] > 1 and bool((x == x[:1]).all()):
        return torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, sigma_frac)
    raise ValueError(f"unknown CKA kernel {kernel!r}; kernels are {KERNELS}")


def _check_grams(k: torch.Tensor, l: torch.Tensor) -> int:
    if k.dim() != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"HSIC needs two square Gram matrices of the same size, got {tuple(k.shape)} and "
                         f"{tuple(l.shape)}")
    return k.shape[0]


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_0(K, L) = tr(K H L H) / (n - 1)^2 (float64)."""
    n = _check_grams(k, l)
    if n < 2:
        raise ValueError(f"biased HSIC needs at least 2 samples, got {n}")
    k, l = k.to(torch.float64), l.to(torch.float64)
    kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
    # tr(HKH L) = <HKH, L>_F since H is idempotent and tr is cyclic
    return (kc * l).sum() / (n - 1) ** 2


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_1(K, L), the unbiased estimator of Song et al. (2012) (float64); needs n > 3 samples."""
    n = _check_grams(k, l)
    if n <= 3:
        raise ValueError(f"the unbiased HSIC estimator needs more than 3 samples per (mini)batch, got {n}; "
                         "use a batch of at least 4 or unbiased=False")
    k = k.to(torch.float64).clone()
    l = l.to(torch.float64).clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    trace_kl = (k * l).sum()                       # tr(K~ L~), both symmetric
    sum_k, sum_l = k.sum(), l.sum()                # 1^T K~ 1, 1^T L~ 1
    cross = k.sum(dim=0) @ l.sum(dim=1)            # 1^T K~ L~ 1
    value = trace_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)
    return value / (n * (n - 3))


def hsic(k: torch.Tensor, l: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def _cka_from_hsic(kl, kk, ll) -> float:
    kl, kk, ll = float(kl), float(kk), float(ll)
    denom = kk * ll
    if not denom > 0:
        return math.nan
    return kl / math.sqrt(denom)


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", unbiased: bool = True,
        sigma_frac: float = 0.8) -> float:
    """One-shot CKA between two (n, features) matrices of the same n examples.

    Use :func:`flatten_features` first for stage features. Returns a Python float (NaN when either
    representation is constant).
    """
    _check_matrix(x, "x")
    _check_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares the same examples: x has {x.shape[0]} rows, y has {y.shape[0]}")
    k, l = gram(x, kernel, sigma_frac), gram(y, kernel, sigma_frac)
    return _cka_from_hsic(hsic(k, l, unbiased), hsic(k, k, unbiased), hsic(l, l, unbiased))


# --------------------------------------------------------------------------------------------------------------
# Minibatch CKA over teacher stage x student stage
# --------------------------------------------------------------------------------------------------------------

def _stage_features(feats) -> Mapping[int, torch.Tensor]:
    """Accept a {stage: tensor} mapping or a :class:`Features` (its ``stages``)."""
    stages = getattr(feats, "stages", feats)
    if not isinstance(stages, Mapping):
        raise TypeError(f"expected a {{stage: tensor}} mapping or a Features object, got {type(feats).__name__}")
    return stages


class CKAAccumulator:
    """Minibatch CKA (Nguyen et al., 2021) for every teacher-stage x student-stage pair.

    ``teacher_layouts`` / ``student_layouts`` map each stage to compare to its layout ('nchw' / 'tokens' or a
    :class:`StageInfo`); their key order gives the rows / columns of :meth:`result`. Call :meth:`update` with the
    teacher's and the student's stage features of the same minibatch (a ``{stage: tensor}`` mapping or the
    :class:`Features` a :class:`TappedModel` returns); every minibatch needs at least 4 samples when
    ``unbiased``. Each stage's Gram matrix is formed once per minibatch; per pair the accumulator keeps
    sum HSIC(K, L), and per stage sum HSIC(K, K) / sum HSIC(L, L) (the same sums for every pair, since all pairs
    see the same minibatches).
    """

    def __init__(self, teacher_layouts: Mapping, student_layouts: Mapping, kernel: str = "linear",
                 unbiased: bool = True, pool: str = "none", sigma_frac: float = 0.8):
        if kernel not in KERNELS:
            raise ValueError(f"unknown CKA kernel {kernel!r}; kernels are {KERNELS}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; pools are {POOLS}")
        if not sigma_frac > 0:
            raise ValueError(f"sigma_frac must be > 0, got {sigma_frac}")
        if not teacher_layouts or not student_layouts:
            raise ValueError("CKAAccumulator needs at least one teacher stage and one student stage")
        self.teacher_layouts = {s: _layout_of(v) for s, v in teacher_layouts.items()}
        self.student_layouts = {s: _layout_of(v) for s, v in student_layouts.items()}
        self.teacher_stages: Tuple = tuple(self.teacher_layouts)
        self.student_stages: Tuple = tuple(self.student_layouts)
        self.kernel, self.unbiased, self.pool, self.sigma_frac = kernel, unbiased, pool, sigma_frac
        self.reset()

    @classmethod
    def for_models(cls, teacher, student, teacher_stages: Sequence[int] = (1, 2, 3, 4),
                   student_stages: Sequence[int] = (1, 2, 3, 4), **kwargs) -> "CKAAccumulator":
        """Layouts from two :class:`TappedModel` s' ``stage_info``."""
        return cls({s: teacher.stage_info[s] for s in teacher_stages},
                   {s: student.stage_info[s] for s in student_stages}, **kwargs)

    def reset(self) -> None:
        nt, ns = len(self.teacher_stages), len(self.student_stages)
        self.hsic_kl = torch.zeros(nt, ns, dtype=torch.float64)
        self.hsic_kk = torch.zeros(nt, dtype=torch.float64)
        self.hsic_ll = torch.zeros(ns, dtype=torch.float64)
        self.num_batches = 0
        self.num_samples = 0

    def _grams(self, feats, layouts: Dict, side: str) -> List[torch.Tensor]:
        stages = _stage_features(feats)
        missing = [s for s in layouts if s not in stages]
        if missing:
            raise KeyError(f"{side} features lack stage(s) {missing}; got stages {sorted(stages)}")
        grams = []
        for s, layout in layouts.items():
            x = flatten_features(stages[s].detach(), layout, self.pool)
            grams.append(gram(x, self.kernel, self.sigma_frac))
        return grams

    @torch.no_grad()
    def update(self, teacher_feats, student_feats) -> None:
        t_stages, s_stages = _stage_features(teacher_feats), _stage_features(student_feats)
        sizes = {int(v.shape[0]) for s, v in t_stages.items() if s in self.teacher_layouts}
        sizes |= {int(v.shape[0]) for s, v in s_stages.items() if s in self.student_layouts}
        if len(sizes) > 1:
            raise ValueError(f"teacher and student features of one minibatch differ in batch size: {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        if self.unbiased and n <= 3:
            raise ValueError(f"minibatch CKA with the unbiased HSIC needs at least 4 samples per minibatch, "
                             f"got {n}; drop the last incomplete batch or use unbiased=False")
        k_grams = self._grams(teacher_feats, self.teacher_layouts, "teacher")
        l_grams = self._grams(student_feats, self.student_layouts, "student")
        kk = torch.stack([hsic(k, k, self.unbiased) for k in k_grams]).cpu()
        ll = torch.stack([hsic(l, l, self.unbiased) for l in l_grams]).cpu()
        kl = torch.stack([torch.stack([hsic(k, l, self.unbiased) for l in l_grams]) for k in k_grams]).cpu()
        self.hsic_kk += kk
        self.hsic_ll += ll
        self.hsic_kl += kl
        self.num_batches += 1
        self.num_samples += n

    def result(self) -> torch.Tensor:
        """(n_teacher_stages, n_student_stages) float64 CKA matrix, rows in ``teacher_stages`` order, columns in
        ``student_stages`` order; NaN where a stage's accumulated self-HSIC is not positive."""
        if self.num_batches == 0:
            raise RuntimeError("CKAAccumulator.result() before any update()")
        denom = self.hsic_kk[:, None] * self.hsic_ll[None, :]
        out = torch.full_like(self.hsic_kl, math.nan)
        ok = denom > 0
        out[ok] = self.hsic_kl[ok] / denom[ok].sqrt()
        return out

    def as_dict(self) -> Dict[Tuple[int, int], float]:
        """{(teacher_stage, student_stage): CKA}."""
        matrix = self.result()
        return {(t, s): float(matrix[i, j]) for i, t in enumerate(self.teacher_stages)
                for j, s in enumerate(self.student_stages)}


# --------------------------------------------------------------------------------------------------------------
# Gradient conflict
# --------------------------------------------------------------------------------------------------------------

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

    def measure(self, task_loss, distill_loss, params=None, blocks=None) -> ConflictStats:
        """:func:`gradient_conflict` then :meth:`update`."""
        return self.update(gradient_conflict(task_loss, distill_loss, params, blocks))

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
