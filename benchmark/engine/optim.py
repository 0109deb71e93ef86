"""The optimiser and the learning-rate schedule of a run, as timm 0.6.5's ``train.py`` builds them (OFA-KD and
PAT ran it): ``create_optimizer_v2(distiller, ...)`` and ``create_scheduler(args, optimizer)``.

* Parameter groups follow 0.6.5's ``param_groups_weight_decay`` on the module handed to the optimiser (the
  reference hands it the whole distiller, which has no ``no_weight_decay()``; so the student ViT's cls token and
  position embedding *are* decayed there, and here). Frozen parameters (the teacher's) are left out.
* ``sgd`` is timm's: SGD with **Nesterov** momentum. ``adamw`` is ``torch.optim.AdamW`` with torch's betas/eps
  unless the recipe sets them (OFA-KD/PAT never do).
* The schedule is timm's own ``CosineLRScheduler`` / ``StepLRScheduler``, built with the arguments 0.6.5's
  ``create_scheduler`` passes. By default it is stepped once per epoch, as the reference (``t_in_epochs=True``:
  every step of epoch ``e`` uses the scheduler's value at ``e``); ``optim.sched_on_updates`` steps it per
  optimiser update instead, with the epoch lengths converted to updates as timm 1.x's ``create_scheduler_v2``
  does. The schedule is a pure function of (epoch, step): it is set afresh on every step, so a resumed run
  recomputes it and stays bit for bit.
* On CUDA the optimiser runs torch's fused kernels (``fused=True``: one kernel for every parameter's update,
  and no host synchronisation under a GradScaler); elsewhere torch's default implementation. The update is the
  same up to float rounding.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError, OptimConfig


def _as_module(params) -> nn.Module:
    """A method group's ``params``: a module as it is, a list of parameters held in a ParameterList."""
    return params if isinstance(params, nn.Module) else nn.ParameterList(list(params))


def param_groups(modules: List[nn.Module], weight_decay: float, skip: Set[int] = frozenset()
                 ) -> List[Dict[str, Any]]:
    """timm 0.6.5 ``param_groups_weight_decay``: parameters with ndim <= 1 or named ``*.bias`` get no weight decay;
    the no-decay group comes first, as in timm. Without weight decay timm makes one group (1.x: of the trainable
    parameters; 0.6.5 passes every parameter, and the optimiser skips the frozen ones, which have no gradient)."""
    no_decay, decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            exempt = weight_decay == 0 or p.ndim <= 1 or name.endswith(".bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, modules: List[nn.Module],
                    method_groups: Sequence[Dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """``create_optimizer_v2(module, opt=cfg.name, lr, weight_decay, momentum[, eps, betas])`` of timm 0.6.5, plus
    a method's own groups (``Distiller.optimizer_groups``): their parameters leave the default groups and follow
    them with the group's options (``lr_scale``, ``weight_decay``). A group without ``weight_decay`` is split by
    the default rule (``params`` given as a module keeps the ``*.bias`` names). No method groups: timm's exactly."""
    own = [_as_module(g["params"]) for g in method_groups]
    groups = param_groups(modules, cfg.weight_decay, skip={id(p) for m in own for p in m.parameters()})
    for group, module in zip(method_groups, own):
        options = {k: v for k, v in group.items() if k != "params"}
        if "weight_decay" in options:
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], **options})
        else:
            groups += [{**g, **options} for g in param_groups([module], cfg.weight_decay)]
    fused = {"fused": True} if use_fused([p for g in groups for p in g["params"]]) else {}
    if cfg.name == "sgd":  # timm's 'sgd' is Nesterov momentum ('momentum' would be the classical one)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=0.0, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0, **fused)


def use_fused(params: Sequence[torch.Tensor]) -> bool:
    """Whether the optimiser of ``params`` runs torch's fused kernels: all of them on CUDA, of a floating dtype
    (what torch's fused AdamW and SGD accept there). Not on the CPU, where torch's default stays."""
    return bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` runs fused kernels (env.json records it)."""
    return bool(optimizer.defaults.get("fused"))


def timm_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int, updates_per_epoch: int):
    """timm's scheduler with the arguments 0.6.5's ``create_scheduler`` gives it for OFA-KD's ``train.py``
    defaults: one cosine cycle (``lr_cycle_limit`` 1, so ``lr_cycle_mul`` 1 and ``lr_cycle_decay`` 0.5 never act), no
    ``lr_noise``, ``lr_k_decay`` 1, ``cooldown_epochs`` 0 (so the run is exactly ``epochs`` long). The warm-up
    counts inside the schedule (``warmup_prefix=False``): 0.6.5's ``StepLRScheduler`` has no prefix option,
    and 1.x's defaults to True, so it is pinned here. Under ``optim.sched_on_updates`` every length in epochs is
    multiplied by ``updates_per_epoch`` (timm 1.x's conversion)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    per_update = cfg.sched_on_updates
    scale = updates_per_epoch if per_update else 1
    common = dict(warmup_t=cfg.warmup_epochs * scale, warmup_lr_init=cfg.warmup_lr, warmup_prefix=False,
                  t_in_epochs=not per_update)
    if cfg.sched == "cosine":
        return CosineLRScheduler(optimizer, t_initial=epochs * scale, lr_min=cfg.min_lr, cycle_limit=1,
                                 cycle_decay=0.5, k_decay=1.0, **common)
    # 0.6.5's create_scheduler gives the step scheduler no lr floor: min_lr does not act on it
    return StepLRScheduler(optimizer, decay_t=cfg.decay_epochs * scale, decay_rate=cfg.decay_rate, **common)


class LRSchedule:
    """Sets the recipe's learning rate on the optimiser for (epoch, step), through timm's scheduler."""

    def __init__(self, cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
        if steps_per_epoch < 1:
            raise ConfigError(f"no full training batch per epoch (steps_per_epoch={steps_per_epoch}): the training "
                              "set is smaller than one global batch; lower data.batch_size or raise data.train_subset")
        # The base of the schedule is the recipe's lr, whatever a resumed optimiser state says (timm reads
        # 'initial_lr' from the groups and only sets it when missing).
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
        self.optimizer = optimizer
        self.per_update = cfg.sched_on_updates
        self.steps_per_epoch = steps_per_epoch
        self.scheduler = timm_scheduler(cfg, optimizer, epochs, steps_per_epoch)

    def _t(self, epoch: int, step: int) -> int:
        return epoch * self.steps_per_epoch + step if self.per_update else epoch

    def apply(self, epoch: int, step: int) -> float:
        """Sets the lr of step ``step`` of epoch ``epoch`` (0-based) on every group; returns it."""
        t = self._t(epoch, step)
        if self.per_update:
            self.scheduler.step_update(num_updates=t)
        else:
            self.scheduler.step(epoch=t)
        return self.optimizer.param_groups[0]["lr"]

    def value(self, epoch: int, step: int) -> float:
        """The lr ``apply`` sets, without touching the optimiser (``_get_lr`` is the schedule's formula)."""
        return self.scheduler._get_lr(self._t(epoch, step))[0]
