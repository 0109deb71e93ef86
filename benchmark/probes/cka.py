"""CKA between teacher and student stages: the maths, and the training probe (:class:`CKAProbe`) on it.

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
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from hkdbench.benchmark.models.taps import LAYOUTS, STAGES
from hkdbench.benchmark.probes.base import Probe, ProbedRun
from hkdbench.benchmark.core.store import cka_key, cka_prefix

KERNELS = ("linear", "rbf")
POOLS = ("none", "mean")

PROBE_SEED = 20240501  # the probe set's draw: the same images in every run

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
# The training probe
# --------------------------------------------------------------------------------------------------------------

def _loader_size(loader) -> Optional[int]:
    if hasattr(loader, "labels"):
        return len(loader.labels)
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    return None


def probe_set(loader, n_images: int, batch_size: int) -> List[torch.Tensor]:
    """A fixed probe set from an evaluation loader, as a list of minibatches (CPU tensors).

    The images are a seeded random draw of ``n_images`` positions of the loader's (ordered) test set, kept in
    test-set order, so class-sorted sets (ImageNet val) are still covered. Minibatches have ``batch_size`` images;
    a last one with fewer than 4 (the unbiased HSIC minimum) is merged into the one before.
    """
    total = _loader_size(loader)
    wanted = None
    if total is not None and total > n_images:
        g = torch.Generator().manual_seed(PROBE_SEED)
        wanted = torch.randperm(total, generator=g)[:n_images].sort().values
    kept: List[torch.Tensor] = []
    count, offset = 0, 0
    for images, _ in loader.batches():
        b = images.shape[0]
        if wanted is None:
            take = images[: n_images - count]
        else:
            lo, hi = torch.searchsorted(wanted, torch.tensor([offset, offset + b])).tolist()
            take = images[(wanted[lo:hi] - offset).to(images.device)] if hi > lo else images[:0]
        offset += b
        if take.shape[0]:
            kept.append(take.detach().cpu())
            count += take.shape[0]
        if count >= n_images:
            break
    if not kept:
        raise ValueError("the CKA probe set is empty: the test set has no images")
    flat = torch.cat(kept)
    chunks = list(flat.split(batch_size))
    if len(chunks) > 1 and chunks[-1].shape[0] < 4:
        last = chunks.pop()
        chunks[-1] = torch.cat([chunks[-1], last])
    if chunks[0].shape[0] < 4:
        raise ValueError(f"the CKA probe set has {flat.shape[0]} images; it needs at least 4")
    return chunks


@torch.no_grad()
def cka_matrix(teacher, student, batches: List[torch.Tensor], device, kernel: str = "linear",
               autocast=None, channels_last: bool = False, prefix: str = cka_prefix()) -> Dict[str, float]:
    """``{'<prefix>/<kernel>/t{i}_s{j}': value}`` for all stage pairs, both models in eval mode (restored after)."""
    acc = CKAAccumulator.for_models(teacher, student, STAGES, STAGES, kernel=kernel)
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        for images in batches:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                t_out = teacher(images, stages=STAGES)
                s_out = student(images, stages=STAGES)
            acc.update({k: v.float() for k, v in t_out.stages.items()},
                       {k: v.float() for k, v in s_out.stages.items()})
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return {cka_key(prefix, kernel, t, s): (None if math.isnan(v) else v) for (t, s), v in acc.as_dict().items()}


class CKAProbe(Probe):
    """Every ``train.probe_every`` epochs (and at the last): minibatch CKA (unbiased HSIC, :class:`CKAAccumulator`)
    between every teacher stage and every student stage on a fixed probe set of ``train.probe_images`` test images
    (:func:`probe_set`: the same images and the same minibatches at every probe and in every run of a sweep), both
    models in eval mode, kernel ``train.probe_kernel``; main process only. Keys: ``cka/<kernel>/t{i}_s{j}``
    (teacher stage i, student stage j). A run without a teacher of its own (the student alone) is probed against
    each run of ``train.probe_teachers`` instead: keys ``cka@<teacher run>/<kernel>/t{i}_s{j}``, the same
    measurement, the reference of "CKA change from none"."""

    name = "cka"
    measures = "CKA between every teacher stage and every student stage on a fixed probe set"
    keys = ("cka/<kernel>/t<i>_s<j>", "cka@<teacher run>/<kernel>/t<i>_s<j>", "cka_time_s")

    def __init__(self, run: ProbedRun) -> None:
        super().__init__(run)
        t = run.cfg.train
        self.every, self.kernel = t.probe_every, t.probe_kernel
        # key prefix -> teacher: the run's own teacher, or the teacher runs a run without one is probed against
        self.references = {cka_prefix(): run.teacher} if run.teacher is not None else {
            cka_prefix(name): model for name, model in (run.probe_teachers or {}).items()}
        self.batches: Optional[List[torch.Tensor]] = None
        if self.references and run.is_main:
            self.batches = probe_set(run.test_loader, t.probe_images,
                                     min(run.cfg.data.eval_batch_size, t.probe_images))

    @staticmethod
    def enabled(cfg) -> bool:
        return bool(cfg.train.probe_every)

    @property
    def active(self) -> bool:
        return self.batches is not None

    def measures_epoch(self, epoch: int, last_epoch: bool) -> bool:
        return (epoch + 1) % self.every == 0 or last_epoch

    def epoch_values(self, epoch: int) -> Dict[str, Any]:
        run = self.run
        tic = time.perf_counter()
        out: Dict[str, Any] = {}
        for prefix, teacher in self.references.items():
            out.update(cka_matrix(teacher, run.student, self.batches, run.device, self.kernel, run.autocast,
                                  run.channels_last, prefix))
        out["cka_time_s"] = time.perf_counter() - tic
        return out
