"""Optimiser, LR schedule, loss, mixup and EMA against timm itself, and every recipe against the reference's
arguments (OFA-KD / PAT configs + timm 0.6.5 train.py defaults).

timm 0.6.5's scheduler and optimiser factories are re-created here from their source (``REFERENCE_*`` and
``create_scheduler_065``) on top of the installed timm classes, so a drift of either side shows up.
"""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.engine.optim import LRSchedule, build_optimizer, param_groups
from hkdbench.benchmark.recipes.resolve import RECIPES, RUNS_VARIANTS, resolve_run_config

# OFA-KD train.py argparse defaults (identical in PAT's train.py) that reach the optimiser, scheduler, loss,
# mixup, EMA and crop; the YAML of each recipe is applied on top, as `parser.set_defaults(**yaml)` does.
TRAIN_PY_DEFAULTS = dict(
    opt="sgd", lr=0.05, momentum=0.9, weight_decay=2e-5, opt_eps=None, opt_betas=None, clip_grad=None,
    clip_mode="norm", sched="cosine", epochs=300, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-6, cooldown_epochs=0,
    decay_epochs=100, decay_rate=0.1, lr_noise=None, lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1,
    lr_k_decay=1.0, smoothing=0.1, batch_size=128, hflip=0.5, scale=[0.08, 1.0], color_jitter=0.4, aa=None,
    reprob=0.0, mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch",
    model_ema=False, model_ema_decay=[0.9998], drop=0.0, drop_path=None, seed=42, dist_bn="reduce")
REFERENCE_YAML = {
    # OFAKD (and PAT) configs/cifar/cnn.yaml
    "cifar-cnn": dict(epochs=300, batch_size=128, lr=0.05, min_lr=1e-3, opt="sgd", weight_decay=2e-3,
                      sched="cosine", warmup_epochs=3, color_jitter=0, smoothing=0.1),
    # OFAKD (and PAT) configs/cifar/vit_mlp.yaml
    "cifar-vit": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-5, opt="adamw", weight_decay=0.05,
                      sched="cosine", warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, smoothing=0.1,
                      color_jitter=0.4, reprob=0.25, aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
    # PAT configs/cifar/pretrain_cnn.yaml
    "cifar-teacher": dict(smoothing=0.1, epochs=300, batch_size=128, lr=5e-5, min_lr=1e-6, opt="adamw",
                          weight_decay=0.05, sched="cosine", warmup_epochs=20, warmup_lr=5e-8, clip_grad=5.0,
                          color_jitter=0.4, reprob=0.25, aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0),
    # OFAKD configs/imagenet/cnn.yaml
    "imagenet-cnn": dict(epochs=100, batch_size=64, lr=0.1, min_lr=1e-6, opt="sgd", weight_decay=1e-4,
                         sched="step", decay_epochs=30, warmup_epochs=3, color_jitter=0, smoothing=0.1),
    # OFAKD configs/imagenet/vit_mlp.yaml
    "imagenet-vit": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-6, opt="adamw", weight_decay=0.05,
                         sched="cosine", warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, smoothing=0.1,
                         color_jitter=0.4, reprob=0.25, aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
                         model_ema=True, model_ema_decay=[0.99996], drop=0, drop_path=0),
}
REFERENCE_RECIPES = tuple(REFERENCE_YAML)
DATASET = {"cifar-cnn": "cifar100", "cifar-vit": "cifar100", "cifar-teacher": "cifar100",
           "imagenet-cnn": "imagenet", "imagenet-vit": "imagenet"}
# The authors' runs: (the released YAML, what their run set on top of it, the ranks). OFA-KD: the args.yaml its author
# posted (OFAKD #14: CIFAR Swin-T -> ResNet18 OFA; #15: ImageNet DeiT-T -> ResNet18 OFA; #19: CIFAR DeiT-T and Swin-P)
# and the README's --nproc_per_node=8; PAT: command_cifar.sh (1 process) and command_imagenet.sh (4), both
# `--amp --model-ema` (decay from the YAML, else train.py's 0.9998).
AUTHORS_RUNS = {
    "cifar-cnn-ofa-runs": ("cifar-cnn", dict(lr=0.1, amp=False, model_ema=False, drop_path=None), 8),
    "cifar-vit-ofa-runs": ("cifar-vit", dict(min_lr=1e-6, amp=True, model_ema=True, model_ema_decay=[0.99996],
                                             drop_path=0.0), 8),
    "imagenet-cnn-ofa-runs": ("imagenet-cnn", dict(amp=True, model_ema=False, drop_path=0.0), 8),
    "imagenet-vit-ofa-runs": ("imagenet-vit", dict(), 8),
    "cifar-cnn-pat-runs": ("cifar-cnn", dict(amp=True, model_ema=True), 1),
    "cifar-vit-pat-runs": ("cifar-vit", dict(amp=True, model_ema=True), 1),
    "imagenet-cnn-pat-runs": ("imagenet-cnn", dict(amp=True, model_ema=True), 4),
    "imagenet-vit-pat-runs": ("imagenet-vit", dict(amp=True, model_ema=True), 4),
}
DATASET.update({name: DATASET[base] for name, (base, _, _) in AUTHORS_RUNS.items()})


def reference_args(recipe: str, epochs=None) -> SimpleNamespace:
    base, run, _world = AUTHORS_RUNS.get(recipe, (recipe, {}, 1))
    args = {**TRAIN_PY_DEFAULTS, **REFERENCE_YAML[base], **run}
    if epochs is not None:
        args["epochs"] = epochs
    return SimpleNamespace(**args)


def our_cfg(recipe: str, epochs=None, extra=()):
    overrides = [f"train.epochs={epochs}"] if epochs is not None else []
    return resolve_run_config(kind="student", student="resnet_mini", method="none", recipe=recipe,
                              dataset=DATASET.get(recipe, "fashion-mnist"), overrides=[*overrides, *extra])


def create_scheduler_065(args, optimizer):
    """timm 0.6.5 ``timm/scheduler/scheduler_factory.py::create_scheduler`` for 'cosine' and 'step', on the
    installed classes. 0.6.5's StepLRScheduler had no warm-up prefix (1.x defaults it to True)."""
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    assert args.lr_noise is None  # the reference never sets it
    noise = dict(noise_range_t=None, noise_pct=0.67, noise_std=1.0, noise_seed=args.seed)
    if args.sched == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=args.epochs, lr_min=args.min_lr, warmup_lr_init=args.warmup_lr,
                                  warmup_t=args.warmup_epochs, k_decay=args.lr_k_decay, cycle_mul=args.lr_cycle_mul,
                                  cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit, **noise)
        return sched, sched.get_cycle_length() + args.cooldown_epochs
    assert args.sched == "step"
    sched = StepLRScheduler(optimizer, decay_t=args.decay_epochs, decay_rate=args.decay_rate,
                            warmup_lr_init=args.warmup_lr, warmup_t=args.warmup_epochs, warmup_prefix=False, **noise)
    return sched, args.epochs


def reference_trace(args, updates_per_epoch=3):
    """The lr of each epoch as OFA-KD's train.py steps the scheduler: step_update after every update (a no-op
    with t_in_epochs), step(epoch + 1) after every epoch."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched, num_epochs = create_scheduler_065(args, optimizer)
    trace, num_updates = [], 0
    for epoch in range(num_epochs):
        lrs = []
        for _ in range(updates_per_epoch):
            lrs.append(optimizer.param_groups[0]["lr"])
            num_updates += 1
            sched.step_update(num_updates=num_updates)
        assert len(set(lrs)) == 1
        trace.append(lrs[0])
        sched.step(epoch + 1)
    return trace


def our_trace(cfg, steps=3):
    """Our per-epoch lr, through the optimiser the trainer builds; every step of an epoch must agree."""
    module = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg.optim, [module])
    schedule = LRSchedule(cfg.optim, optimizer, cfg.train.epochs, steps)
    trace = []
    for epoch in range(cfg.train.epochs):
        lrs = [schedule.apply(epoch, s) for s in range(steps)]
        assert all(g["lr"] == lrs[-1] for g in optimizer.param_groups)
        assert len(set(lrs)) == 1, f"epoch {epoch}: lr changed within the epoch: {lrs}"
        assert schedule.value(epoch, steps - 1) == lrs[0]
        trace.append(lrs[0])
    return trace


# ---------------------------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("epochs", [None, 25, 7])
@pytest.mark.parametrize("recipe", REFERENCE_RECIPES + tuple(AUTHORS_RUNS))
def test_per_epoch_lr_of_every_recipe_is_timms_scheduler_stepped_as_the_reference(recipe, epochs):
    expected = reference_trace(reference_args(recipe, epochs))
    ours = our_trace(our_cfg(recipe, epochs))
    assert len(ours) == len(expected) == (epochs or reference_args(recipe).epochs)
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)


def test_cosine_warmup_counts_inside_the_schedule_as_in_timm_065():
    """cifar-cnn by hand from 0.6.5's cosine_lr.py: the warm-up is linear from warmup_lr over epochs 0..2, then the
    cosine is evaluated at the epoch itself (warmup_prefix False): it never reaches lr and ends above min_lr."""
    trace = our_trace(our_cfg("cifar-cnn"))
    lr, lo, w0 = 0.05, 1e-3, 1e-4
    assert trace[:3] == pytest.approx([w0, w0 + (lr - w0) / 3, w0 + 2 * (lr - w0) / 3], rel=1e-12)
    for e in (3, 150, 299):
        assert trace[e] == pytest.approx(lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * e / 300)), rel=1e-12)
    assert max(trace) < lr and trace[-1] > lo


def test_imagenet_cnn_steps_down_at_epochs_30_60_90_as_in_timm_065():
    """0.6.5's step_lr.py: lr * 0.1 ** (epoch // 30) after a 3-epoch warm-up, the warm-up inside (1.x's default
    warmup_prefix=True would move the decays to 33/63/93). No lr floor."""
    trace = our_trace(our_cfg("imagenet-cnn"))
    assert trace[:3] == pytest.approx([1e-4 + e * (0.1 - 1e-4) / 3 for e in range(3)], rel=1e-12)
    for e in range(3, 100):
        assert trace[e] == pytest.approx(0.1 * 0.1 ** (e // 30), rel=1e-12), e
    assert trace[29] == pytest.approx(0.1) and trace[30] == pytest.approx(0.01) and trace[99] == pytest.approx(1e-4)


@pytest.mark.parametrize("sched,extra", [("cosine", []), ("step", ["optim.sched=step", "optim.decay_epochs=1.5",
                                                                    "optim.decay_rate=0.5"])])
def test_per_update_stepping_is_timm_1x_create_scheduler_v2_on_updates(sched, extra):
    """The demo's stepping (optim.sched_on_updates): timm 1.x train.py with --sched-on-updates, i.e.
    create_scheduler_v2(step_on_epochs=False, updates_per_epoch=K) and step_update(num_updates) per update."""
    from timm.scheduler import create_scheduler_v2

    steps = 5
    cfg = our_cfg("demo", extra=extra)
    o = cfg.optim
    assert o.sched_on_updates and o.warmup_epochs == 0.5
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=o.lr)
    ref, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=cfg.train.epochs, decay_epochs=o.decay_epochs,
                                 decay_rate=o.decay_rate, min_lr=o.min_lr, warmup_lr=o.warmup_lr,
                                 warmup_epochs=o.warmup_epochs, warmup_prefix=False, step_on_epochs=False,
                                 updates_per_epoch=steps)
    expected = []
    for k in range(cfg.train.epochs * steps):
        expected.append(optimizer.param_groups[0]["lr"])
        ref.step_update(num_updates=k + 1)
    ours_opt = build_optimizer(o, [nn.Linear(2, 2)])
    schedule = LRSchedule(o, ours_opt, cfg.train.epochs, steps)
    ours = [schedule.apply(e, s) for e in range(cfg.train.epochs) for s in range(steps)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    assert len(set(ours[:steps])) > 2  # it moves within an epoch (the warm-up is half an epoch)


def test_resumed_optimizer_state_does_not_shift_the_schedule():
    """The schedule is recomputed from (epoch, step) on resume; its base is the recipe's lr even when the loaded
    optimiser state lacks timm's 'initial_lr' (timm would otherwise take the current lr as the base)."""
    cfg = our_cfg("cifar-cnn")
    module = nn.Linear(3, 3)
    first = build_optimizer(cfg.optim, [module])
    schedule = LRSchedule(cfg.optim, first, 300, 4)
    schedule.apply(150, 2)
    state = first.state_dict()
    for group in state["param_groups"]:
        group.pop("initial_lr")
    resumed = build_optimizer(cfg.optim, [module])
    resumed.load_state_dict(state)
    again = LRSchedule(cfg.optim, resumed, 300, 4)
    assert again.apply(150, 3) == schedule.value(150, 3) == reference_trace(reference_args("cifar-cnn"))[150]


def test_an_epoch_without_a_full_batch_is_refused_with_the_fields_to_change():
    o = our_cfg("cifar-cnn").optim
    with pytest.raises(ValueError, match="data.batch_size"):
        LRSchedule(o, build_optimizer(o, [nn.Linear(2, 2)]), 300, 0)


def test_train_step_sets_the_scheduled_lr_on_every_step():
    """The trainer's (and overhead's) TrainStep uses the schedule: per epoch for a reference recipe."""
    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.data.stream import prepare_batch
    from hkdbench.benchmark.engine.step import TrainModule, TrainStep
    from hkdbench.methods import get_method, method_config

    cfg = our_cfg("cifar-cnn", epochs=4, extra=["optim.warmup_epochs=2"])
    student = create_model("resnet_mini", 10, in_chans=1, img_size=16)
    method = get_method("none")(method_config("none"), student, None, 10, nn.CrossEntropyLoss())
    module = TrainModule(student, method)
    optimizer = build_optimizer(cfg.optim, [module])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ctx = TrainStep(cfg.optim, 4, 2, module, module, method, optimizer, scaler, torch.device("cpu"))
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    seen = [ctx.step(prepare_batch(images, labels), e, s)[0]["lr"] for e in range(4) for s in range(2)]
    args = reference_args("cifar-cnn", 4)
    args.warmup_epochs = 2
    expected = reference_trace(args)
    assert seen == pytest.approx([lr for lr in expected for _ in range(2)], rel=1e-12)


def test_train_step_clips_as_train_pys_dispatch_clip_grad():
    """One TrainStep with optim.clip_grad against the reference's step on a copy: timm's optimiser, backward,
    dispatch_clip_grad(model_parameters(distiller), value, mode='norm'), step."""

    from timm.models import model_parameters
    from timm.optim import create_optimizer_v2
    from timm.utils import dispatch_clip_grad

    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.data.stream import prepare_batch
    from hkdbench.benchmark.engine.step import TrainModule, TrainStep
    from hkdbench.methods import Targets, get_method, method_config

    cfg = our_cfg("cifar-cnn", extra=["optim.clip_grad=0.01"])
    torch.manual_seed(0)
    student = create_model("resnet_mini", 10, in_chans=1, img_size=16)
    method = get_method("none")(method_config("none"), student, None, 10, nn.CrossEntropyLoss(label_smoothing=0.1))
    module = TrainModule(student, method)
    reference = copy.deepcopy(module)
    images, labels = torch.randn(8, 1, 16, 16), torch.arange(8)
    ctx = TrainStep(cfg.optim, 300, 10, module, module, method, build_optimizer(cfg.optim, [module]),
                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    lr = ctx.step(prepare_batch(images, labels), 40, 0)[0]["lr"]
    o = cfg.optim
    optimizer = create_optimizer_v2(reference, o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum)
    _, losses = reference(images, Targets(hard=labels), 40)
    sum(losses.values()).backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in reference.parameters() if p.grad is not None]))
    assert norm > 10 * cfg.optim.clip_grad  # the clipping acts
    dispatch_clip_grad(model_parameters(reference), value=cfg.optim.clip_grad, mode="norm")
    optimizer.step()
    for (name, ours), theirs in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# The optimiser
# ---------------------------------------------------------------------------------------------------------------

class _Distillerish(nn.Module):
    """What the reference hands create_optimizer_v2: student + method modules + a frozen teacher, no
    no_weight_decay() of its own (the student ViT has one)."""

    def __init__(self):
        super().__init__()
        from hkdbench.benchmark.models.zoo import create_model

        self.student = create_model("vit_mini", 10, img_size=32).model
        self.projector = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Linear(16, 10))
        self.teacher = nn.Linear(5, 5).requires_grad_(False)


def _groups(optimizer):
    return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
            for g in optimizer.param_groups]


@pytest.mark.parametrize("recipe", ["cifar-cnn", "cifar-vit", "demo"])
def test_optimizer_is_timms_create_optimizer_v2_on_the_same_module(recipe):
    from timm.optim import create_optimizer_v2

    o = our_cfg(recipe).optim
    module = _Distillerish()
    ours = build_optimizer(o, [module])
    kwargs = dict(opt=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)
    theirs = create_optimizer_v2(module, **kwargs)  # train.py passes no eps/betas: timm's defaults
    assert type(ours) is type(theirs)
    assert _groups(ours) == _groups(theirs)
    group = ours.param_groups[0]
    if o.name == "sgd":
        assert group["nesterov"] is True and group["momentum"] == 0.9 and group["dampening"] == 0
    else:
        assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    assert [g["weight_decay"] for g in ours.param_groups] == [0.0, o.weight_decay]


def test_the_optimiser_is_fused_exactly_for_floating_cuda_parameters():
    from hkdbench.benchmark.engine.optim import is_fused, use_fused

    def param(device, floating=True):  # what use_fused reads of a parameter (no GPU here)
        return SimpleNamespace(device=torch.device(device), is_floating_point=lambda: floating)

    assert use_fused([param("cuda"), param("cuda:1")])
    assert not use_fused([param("cuda"), param("cpu")]) and not use_fused([param("cuda", floating=False)])
    assert not use_fused([])
    for name in ("sgd", "adamw"):
        optimizer = build_optimizer(our_cfg("cifar-cnn", extra=[f"optim.name={name}"]).optim, [_Distillerish()])
        assert not is_fused(optimizer) and not optimizer.defaults["fused"]  # on the CPU: torch's default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused kernels run on CUDA")
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_the_fused_cuda_step_is_the_plain_step_up_to_rounding(name):
    from hkdbench.benchmark.engine.optim import is_fused

    cfg = our_cfg("cifar-cnn", extra=[f"optim.name={name}", "optim.weight_decay=0.05"]).optim
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    gpu = copy.deepcopy(cpu).cuda()
    optimizers = [build_optimizer(cfg, [cpu]), build_optimizer(cfg, [gpu])]
    assert not is_fused(optimizers[0]) and is_fused(optimizers[1])
    x = torch.randn(32, 8)
    for _ in range(3):
        for model, optimizer, device in ((cpu, optimizers[0], "cpu"), (gpu, optimizers[1], "cuda")):
            optimizer.zero_grad()
            model(x.to(device)).square().mean().backward()
            optimizer.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)


def test_weight_decay_follows_the_module_handed_over_not_the_student():
    """cls_token / pos_embed are decayed: the distiller has no no_weight_decay() (timm would exempt them on
    the bare ViT); biases and norms are exempt; frozen parameters are not optimised."""
    from timm.optim import create_optimizer_v2

    module = _Distillerish()
    no_decay, decay = param_groups([module], 0.05)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"student.cls_token", "student.pos_embed"} <= decayed
    bare_no_decay, _ = create_optimizer_v2(module.student, "adamw", weight_decay=0.05).param_groups
    assert any(p is module.student.cls_token for p in bare_no_decay["params"])  # what the distiller avoids
    assert all(n.endswith(".bias") or module.get_parameter(n).ndim <= 1 for n in exempt)
    assert not any(n.startswith("teacher") for n in decayed | exempt)
    # no weight decay at all: one group (timm 1.x), of the trainable parameters
    (only,) = param_groups([module], 0.0)
    assert only["weight_decay"] == 0.0 and len(only["params"]) == len(decayed) + len(exempt)


@pytest.mark.parametrize("override,message", [
    ("optim.sched=poly", "optim.sched must be 'cosine' or 'step'"),
    ("optim.decay_epochs=0", "optim.decay_epochs must be > 0"),
    ("optim.decay_rate=1.5", r"optim.decay_rate must be in \(0, 1\]"),
    ("optim.momentum=0", r"optim.momentum must be in \(0, 1\) for sgd"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.sched_on_updates=maybe", "optim.sched_on_updates: expected a boolean"),
])
def test_bad_optim_fields_name_the_field_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        our_cfg("cifar-cnn", extra=[override])


# ---------------------------------------------------------------------------------------------------------------
# Recipe audit: every optimiser/schedule/train field and the plain data fields against the reference's args
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", REFERENCE_RECIPES + tuple(AUTHORS_RUNS))
def test_recipe_fields_are_the_reference_arguments(recipe):
    ref, cfg = reference_args(recipe), our_cfg(recipe)
    # --amp: float16 autocast with a GradScaler; amp false: float32; unstated: the project's default (auto)
    assert cfg.train.precision == {True: "fp16", False: "fp32"}.get(getattr(ref, "amp", None), "auto")
    assert cfg.train.world == AUTHORS_RUNS.get(recipe, (None, None, 1))[2]
    # --dist-bn: train.py's, where there are ranks to distribute over (our default: rank 0's statistics)
    assert cfg.train.dist_bn == (ref.dist_bn if cfg.train.world > 1 else "broadcast")
    o, d, t = cfg.optim, cfg.data, cfg.train
    assert (o.name, o.lr, o.weight_decay, o.momentum) == (ref.opt, ref.lr, ref.weight_decay, ref.momentum)
    assert (o.sched, o.sched_on_updates, o.warmup_epochs, o.warmup_lr) == (ref.sched, False, ref.warmup_epochs,
                                                                          ref.warmup_lr)
    assert o.min_lr == ref.min_lr and o.label_smoothing == ref.smoothing
    assert o.clip_grad == (ref.clip_grad or 0.0)  # None: no clipping
    assert (o.betas, o.eps) == ((0.9, 0.999), 1e-8)  # no --opt-betas / --opt-eps: torch's AdamW defaults
    if ref.sched == "step":
        assert (o.decay_epochs, o.decay_rate) == (ref.decay_epochs, ref.decay_rate)
    assert t.epochs == ref.epochs
    assert t.ema_decay == (ref.model_ema_decay[0] if ref.model_ema else 0.0)
    assert t.drop_path == ref.drop_path and ref.drop == 0  # None: the model's default (dropout is 0 in every model)
    assert (d.batch_size, d.hflip, list(d.rrc_scale)) == (ref.batch_size, ref.hflip, ref.scale)
    assert (d.color_jitter, d.auto_augment, d.reprob) == (ref.color_jitter, ref.aa, ref.reprob)
    assert (d.mixup, d.cutmix) == (ref.mixup, ref.cutmix)


def test_drop_path_none_keeps_the_models_default_and_a_value_replaces_it():
    """train.py passes --drop-path only when set (timm's create_model drops None kwargs): Swin's default is 0.1,
    imagenet-vit's YAML sets 0."""
    from timm.layers import DropPath

    from hkdbench.benchmark.models.zoo import create_model

    def rates(drop_path_rate):
        model = create_model("swin_mini", 10, img_size=32, drop_path_rate=drop_path_rate).model
        return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]

    assert max(rates(None)) == pytest.approx(0.1) and rates(0.0) == [] and max(rates(0.3)) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="train.drop_path must be in"):
        our_cfg("imagenet-vit", extra=["train.drop_path=1.5"])


def test_every_recipe_is_audited():
    assert set(RECIPES) - set(REFERENCE_RECIPES) == {"demo"}  # the offline demo is not a reference recipe
    assert set(RUNS_VARIANTS) == set(AUTHORS_RUNS)
    assert {name: v.base for name, v in RUNS_VARIANTS.items()} == {n: b for n, (b, _, _) in AUTHORS_RUNS.items()}


@pytest.mark.parametrize("student,dataset,expected", [
    ("resnet18", "cifar100", "cifar-cnn-{}-runs"), ("swin_pico", "cifar100", "cifar-vit-{}-runs"),
    ("mobilenetv2_100", "imagenet", "imagenet-cnn-{}-runs"), ("deit_tiny", "imagenet", "imagenet-vit-{}-runs")])
@pytest.mark.parametrize("reference", ["ofa", "pat"])
def test_auto_runs_picks_the_authors_run_of_autos_recipe(student, dataset, expected, reference):
    cfg = resolve_run_config(kind="student", student=student, method="none", dataset=dataset,
                             recipe=f"auto-{reference}-runs")
    assert cfg.recipe == expected.format(reference)


def test_a_variant_is_its_base_with_its_changes_and_a_run_of_its_own():
    from hkdbench.benchmark.core.config import identity

    released = our_cfg("cifar-vit")
    runs = our_cfg("cifar-vit-ofa-runs")
    assert RECIPES["cifar-vit"]["optim"]["min_lr"] == 1e-5  # the released YAML is left as it is
    assert (runs.optim.min_lr, runs.train.ema_decay, runs.train.drop_path) == (1e-6, 0.99996, 0.0)
    assert (runs.train.precision, runs.train.world, runs.recipe) == ("fp16", 8, "cifar-vit-ofa-runs")
    assert (runs.data, runs.optim.lr) == (released.data, released.optim.lr)
    assert runs.run_hash() != released.run_hash()
    # the variant's fields are overridable as any recipe's: fp32 on a CPU is another run, named so
    assert our_cfg("cifar-vit-ofa-runs", extra=["train.precision=fp32"]).run_hash() != runs.run_hash()
    # PAT's CIFAR runs state one rank, the default: it is not part of their identity
    assert "world" not in identity(our_cfg("cifar-cnn-pat-runs").train)


def test_auto_runs_without_a_variant_for_the_dataset_is_refused():
    with pytest.raises(ConfigError, match="auto-ofa-runs has no variant of recipe 'demo'.*cifar-cnn, cifar-vit"):
        resolve_run_config(kind="student", student="resnet_mini", method="none", recipe="auto-ofa-runs")
    with pytest.raises(ConfigError, match="unknown recipe 'cifar-vit-runs'.*cifar-vit-ofa-runs"):
        resolve_run_config(kind="student", student="vit_mini", method="none", recipe="cifar-vit-runs")


# ---------------------------------------------------------------------------------------------------------------
# Loss, mixup, EMA
# ---------------------------------------------------------------------------------------------------------------

def test_label_smoothing_criterion_equals_timms_label_smoothing_cross_entropy():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from hkdbench.benchmark.engine.step import build_criterion

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, 100, generator=g) * 3, torch.randint(0, 100, (64,), generator=g)
    ours = build_criterion(our_cfg("cifar-cnn"))
    assert ours(logits, labels).item() == pytest.approx(LabelSmoothingCrossEntropy(0.1)(logits, labels).item(),
                                                        rel=1e-6)
    assert ours(logits, labels).item() != pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-3)
    assert isinstance(build_criterion(our_cfg("cifar-vit")), SoftTargetCrossEntropy)  # mixup: soft targets


def test_mixup_arguments_are_train_pys():
    from hkdbench.benchmark.data.loaders import build_mixup

    cfg, ref = our_cfg("cifar-vit"), reference_args("cifar-vit")
    mixup = build_mixup(cfg.data, 100, cfg.optim.label_smoothing)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.cutmix_minmax) == (ref.mixup, ref.cutmix, None)
    assert (mixup.mix_prob, mixup.switch_prob, mixup.mode) == (ref.mixup_prob, ref.mixup_switch_prob,
                                                               ref.mixup_mode)
    assert (mixup.label_smoothing, mixup.num_classes) == (ref.smoothing, 100)


def test_student_ema_is_timm_065_model_ema_v2():
    """0.6.5 ModelEmaV2: every float state entry (weights and BN statistics) becomes decay * ema + (1 - decay) *
    model after each update, with a constant decay (no warm-up)."""
    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.engine.step import _make_ema

    torch.manual_seed(0)
    student = create_model("resnet_mini", 10, in_chans=1, img_size=16)
    decay = 0.9
    ema = _make_ema(student, decay)
    expected = {k: v.clone() for k, v in student.model.state_dict().items() if v.is_floating_point()}
    for _ in range(3):
        with torch.no_grad():
            for p in student.model.parameters():
                p.add_(torch.randn_like(p))
        student.model.train()(torch.randn(8, 1, 16, 16))  # moves the BN running statistics
        ema.update(student.model)
        model_state = student.model.state_dict()
        expected = {k: decay * v + (1 - decay) * model_state[k] for k, v in expected.items()}
    ema_state = ema.module.state_dict()
    assert any("running_mean" in k for k in expected)
    for k, v in expected.items():
        torch.testing.assert_close(ema_state[k], v, rtol=1e-5, atol=1e-6, msg=k)
