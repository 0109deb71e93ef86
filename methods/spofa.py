"""``spofa``: SPOFA, "Heterogeneous KD via Geometry Decoupling and Momentum-Aware Gradient Regulation"
(arXiv 2606.24557, 2026; reference code xiaoming927/spofaKD ``distillers/spofa.py``).

OFA (see ``ofa.py``) with two changes:

1. LayerNorm decoupling projectors (``build_branch_projector(style='spofa')``): CNN branches put a LayerNorm
   before the final Linear; token branches use GELU-free mergers (LayerNorm + Linear; the last of several
   mergers has no norm), drop the prefix tokens and read out the token mean.
2. MEMA dynamic scalers, each an EMA baseline mu of a batch statistic s (first update: mu = s, deviation 0;
   later: dev = mu_prev - s, mu <- m*mu + (1-m)*s):
   * branch weights, per stage: s_i = mean_b cos(branch logits_i, teacher logits),
     w_i = clip(1 - feature_scale * dev_i, 0.1, 2.0), L_branch = ofa_weight * sum_i w_i * L_ofa(branch_i);
   * per-sample final-KD weights: c_b = cos(dCE/dz_b, dL_ofa/dz_b) from the closed-form logit gradients
     p_s - y and (sum_c w_c) p_s - w; mu is updated with mean_b c_b and then
     omega_b = clamp(1 - output_rate * output_scale * max(0, mu - c_b), 0.5, 2.0);
     L_kd = mean_b kd_weight * omega_b * L_ofa,b(z_s).
   The scalers act in training mode only (weights 1 in eval mode or with ``enable_adaptive=False``); the
   weights carry no gradient.

Deviations from the reference code, all deliberate:
* the EMA baselines and their "initialised" flags are registered buffers (the reference keeps Python floats),
  so they are in the state dict and survive a resume;
* under torch.distributed the batch statistic is averaged over ranks before the EMA update, so every rank
  holds the same baseline (the reference updates each rank from its own shard); ranks emulated in turn take the
  same mean (``Distiller.exchange``);
* prefix (cls/dist) tokens are always dropped by the token branches (they come split off in ``Features.prefix``;
  the reference's PatchMerging strips 1 or 2 of them by counting tokens, and keeps them when nothing is merged);
* the probe gradients are computed in closed form instead of by autograd on a detached copy (same values, see
  tests/methods/test_spofa.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DISTRIBUTED, TASK_LOSS, RankExchange
from .ofa import OFA, enhanced_target, ofa_loss
from .registry import register_method


def soft_ce_logit_grad(logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample gradient w.r.t. z of -sum_c target_c log softmax(z/T)_c: ((sum_c target_c) p - target) / T.

    With a one-hot or soft label this is the CE gradient p - y; with OFA's target w it is the OFA gradient.
    """
    p = F.softmax(logits.float() / temperature, dim=-1)
    target = target.float()
    return (target.sum(-1, keepdim=True) * p - target) / temperature


class EmaBaseline(nn.Module):
    """A momentum EMA of a scalar statistic; its state is buffers (checkpointed, moved with the module)."""

    def __init__(self, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mu", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, s: torch.Tensor, exchange: RankExchange = DISTRIBUTED) -> Tuple[torch.Tensor, torch.Tensor]:
        """Folds the batch statistic ``s``, averaged over the ranks, in; returns the deviation mu_prev - s (0 on the
        first call) and the new mu. The buffers change through ``exchange.update_shared`` (under DDP at once;
        emulated ranks after the last one's forward, so every rank reads the step's mu_prev).

        Written without Python branching on tensor values, so it never synchronises with the device.
        """
        s = exchange.mean(s.detach().float().reshape(()))
        prev = self.mu.clone()
        dev = torch.where(self.initialised, prev - s, torch.zeros_like(s))
        mu = torch.where(self.initialised, self.momentum * prev + (1 - self.momentum) * s, s)
        exchange.update_shared(lambda: self._commit(mu))
        return dev, mu

    @torch.no_grad()
    def _commit(self, mu: torch.Tensor) -> None:
        self.mu.copy_(mu)
        self.initialised.fill_(True)


@register_method
class SPOFA(OFA):
    name = "spofa"
    version = 1  # of its computation: bump when its numbers change (tests/test_golden.py says when)
    paper = "arXiv 2606.24557 (2026), HKD via Geometry Decoupling and Momentum-Aware Gradient Regulation"
    projector_style = "spofa"

    @dataclass(frozen=True)
    class Config(OFA.Config):
        momentum: float = 0.99
        feature_scale: float = 5.0
        feature_clamp: Tuple[float, float] = (0.1, 2.0)
        output_scale: float = 2.0
        output_rate: float = 0.1                     # the reference's constant factor in omega_b
        output_clamp: Tuple[float, float] = (0.5, 2.0)
        enable_adaptive: bool = True

        def __post_init__(self):
            super().__post_init__()
            if not 0 <= self.momentum < 1:
                raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
            for name in ("feature_clamp", "output_clamp"):
                lo_hi = getattr(self, name)
                if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                    raise ValueError(f"{name} must be (low, high) with low <= high, got {lo_hi}")

    def __init__(self, cfg, student, teacher, num_classes, criterion=None):
        super().__init__(cfg, student, teacher, num_classes, criterion)
        self.feature_scalers = nn.ModuleDict({str(s): EmaBaseline(cfg.momentum) for s in cfg.stages})
        self.output_scaler = EmaBaseline(cfg.momentum)
        self._last: Dict[str, torch.Tensor] = {}

    # -- the scalers ----------------------------------------------------------------------------------------------
    def branch_weight(self, stage: int, branch_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """w_i = clip(1 - feature_scale * (mu_prev - s_i), lo, hi), s_i = mean cosine of branch and teacher logits."""
        with torch.no_grad():
            s = F.cosine_similarity(branch_logits.detach().float(), teacher_logits.detach().float(), dim=-1).mean()
            dev, _ = self.feature_scalers[str(stage)].update(s, self.exchange)
            lo, hi = self.cfg.feature_clamp
            return (1 - self.cfg.feature_scale * dev).clamp(lo, hi)

    def output_weights(self, logits: torch.Tensor, teacher_logits: torch.Tensor, targets) -> torch.Tensor:
        """omega_b from the cosine of the CE and OFA logit gradients against the (updated) EMA baseline."""
        return self._output_weights(logits, teacher_logits, targets)[0]

    def _output_weights(self, logits: torch.Tensor, teacher_logits: torch.Tensor, targets
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """omega_b and the updated baseline mu it was measured against."""
        cfg = self.cfg
        with torch.no_grad():
            logits = logits.detach().float()
            if targets.soft is not None:
                label = targets.soft.float()
            else:
                label = F.one_hot(targets.hard.long(), logits.shape[-1]).float()
            g_ce = soft_ce_logit_grad(logits, label)
            w = enhanced_target(teacher_logits, targets.hard, cfg.eps_values[-1], cfg.temperature)
            g_ofa = soft_ce_logit_grad(logits, w, cfg.temperature)
            c = F.cosine_similarity(g_ce, g_ofa, dim=-1)
            _, mu = self.output_scaler.update(c.mean(), self.exchange)
            lo, hi = cfg.output_clamp
            return (1 - cfg.output_rate * cfg.output_scale * (mu - c).clamp_min(0)).clamp(lo, hi), mu

    # -- the loss -------------------------------------------------------------------------------------------------
    def losses(self, student, teacher, targets, epoch=0):
        cfg, eps = self.cfg, self.cfg.eps_values
        adaptive = cfg.enable_adaptive and self.training
        t_logits = teacher.logits
        branches = self.branch_logits(student)
        branch_loss, last = 0.0, {}
        for i, s in enumerate(cfg.stages):
            term = ofa_loss(branches[s], t_logits, targets.hard, eps[i], cfg.temperature)
            if adaptive:
                w = self.branch_weight(s, branches[s], t_logits)
                last[f"w_stage{s}"] = w
                term = w * term
            branch_loss = branch_loss + term
        per_sample = ofa_loss(student.logits, t_logits, targets.hard, eps[-1], cfg.temperature, reduction="none")
        if adaptive:
            omega, mu = self._output_weights(student.logits, t_logits, targets)
            last.update(omega_mean=omega.mean(), omega_min=omega.min(), mu_output=mu)
            per_sample = omega * per_sample
        self._last = {k: v.detach() for k, v in last.items()}
        return {
            TASK_LOSS: cfg.gt_weight * self.task_loss(student.logits, targets),
            "kd": cfg.kd_weight * per_sample.mean(),
            "ofa": cfg.ofa_weight * branch_loss,
        }

    def takes_rank_means(self) -> bool:
        return self.cfg.enable_adaptive  # every training step: the branch and output statistics

    def statistics(self) -> Dict[str, torch.Tensor]:
        return dict(self._last)
