"""The implementations of the ``hkdbench`` subcommands (argument parsing lives in cli.py)."""
from __future__ import annotations

import time
from typing import Dict, List

from .config import ConfigError
from .recipes import RECIPES, recipe_names, resolve_run_config


def cmd_train(args, overrides) -> int:
    from .trainer import train

    cfg = resolve_run_config(kind="student", student=args.student, method=args.method, teacher=args.teacher,
                             dataset=args.dataset, recipe=args.recipe, teacher_checkpoint=args.teacher_checkpoint,
                             teacher_recipe=args.teacher_recipe, overrides=overrides(args),
                             teacher_overrides=args.teacher_override)
    _check_flags(args, cfg)
    result = train(cfg, runs_dir=args.runs_dir, resume=args.resume, restart=args.restart, device=args.device)
    return 0 if result.status == "done" else 3


def cmd_teacher(args, overrides) -> int:
    from .trainer import train

    cfg = resolve_run_config(kind="teacher", student=args.model, method="none", dataset=args.dataset,
                             recipe=args.recipe, overrides=overrides(args))
    _check_flags(args, cfg)
    result = train(cfg, runs_dir=args.runs_dir, resume=args.resume, restart=args.restart, device=args.device)
    return 0 if result.status == "done" else 3


def _check_flags(args, cfg) -> None:
    """Fails before anything is built or written: conflicting flags, missing data."""
    from .data import check_data_available

    if args.resume and args.restart:
        raise ConfigError("--resume and --restart exclude each other")
    check_data_available(cfg.data)


def cmd_models(args, _overrides) -> int:
    from .models import create_model, zoo

    print(f"{'model':<16} {'family':<9} {'img':>4} {'crop':>5}  description")
    for name, entry in zoo().items():
        print(f"{name:<16} {entry.family:<9} {entry.img_size:>4} {entry.crop_pct:>5}  {entry.description}")
        if args.stages:
            model = create_model(name, num_classes=100, in_chans=3)
            for s, info in model.stage_info.items():
                print(f"{'':<16}   stage {s}: {info.layout:<6} {tuple(info.shape)} grid {info.grid}"
                      f"{f' +{info.num_prefix} prefix' if info.num_prefix else ''}")
    return 0


def cmd_recipes(args, _overrides) -> int:
    print("auto: cifar-cnn / cifar-vit (CIFAR), imagenet-cnn / imagenet-vit (ImageNet) by student family; demo "
          "for fashion-mnist")
    for name, body in RECIPES.items():
        o, d, t = body["optim"], body["data"], body["train"]
        extras = [k for k in ("auto_augment", "mixup", "cutmix", "reprob") if d.get(k)]
        print(f"{name}: {o['name']} lr {o['lr']} wd {o['weight_decay']} warmup {o['warmup_epochs']} "
              f"epochs {t['epochs']} batch {d['batch_size']}/process img {d['img_size']} ({d['pipeline']})"
              f"{' + ' + ', '.join(extras) if extras else ''}")
    return 0


def cmd_methods(args, _overrides) -> int:
    from hkdbench.methods import list_methods

    for name, cls in list_methods().items():
        fields = ", ".join(f"{k}={v}" for k, v in cls.config_fields().items())
        print(f"{name:<8} {cls.paper}\n{'':<8} {fields}")
    if args.pair:
        print()
        for row in method_costs(args.pair[0], args.pair[1], args.num_classes):
            print(row)
    return 0


def method_costs(teacher_name: str, student_name: str, num_classes: int) -> List[str]:
    """Extra trainable parameters and the memory they add in training (weights + grads + two AdamW moments,
    fp32) plus the method's buffers, per method, for one teacher/student pair."""
    import torch

    from hkdbench.methods import list_methods, method_config

    from .models import create_model, zoo_entry

    size = max(zoo_entry(teacher_name).img_size, zoo_entry(student_name).img_size)
    teacher = create_model(teacher_name, num_classes, in_chans=3, img_size=size)
    student = create_model(student_name, num_classes, in_chans=3, img_size=size)
    rows = [f"train-time cost for {teacher_name} -> {student_name} at {size}px, {num_classes} classes "
            f"(student alone: {student.deploy_parameter_count() / 1e6:.2f}M params)",
            f"{'method':<8} {'extra params':>13} {'extra MB (w+g+adam)':>20} {'buffers MB':>11}"]
    for name, cls in list_methods().items():
        try:
            method = cls(method_config(name), student, teacher if cls.uses_teacher else None, num_classes)
        except NotImplementedError as err:
            rows.append(f"{name:<8} not supported for this pair: {err}")
            continue
        params = method.extra_parameter_count()
        buffers = sum(b.numel() * b.element_size() for b in method.buffers())
        rows.append(f"{name:<8} {params / 1e6:>12.3f}M {params * 16 / 2 ** 20:>20.1f} {buffers / 2 ** 20:>11.2f}")
        del method
    torch.set_grad_enabled(True)
    return rows


def cmd_demo(args, _overrides) -> int:
    from .demo import run_demo

    return run_demo(runs_dir=args.runs_dir, device=args.device, quick=args.quick)
