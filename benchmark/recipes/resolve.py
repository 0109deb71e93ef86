"""Training recipes: the papers' data/optimiser/schedule settings, by name, and how a run's config is resolved.

``auto`` picks the papers' recipe by dataset and student family: CNN students get the SGD recipe
(``configs/cifar/cnn.yaml`` of OFA-KD/PAT), ViT/Swin/MLP students the AdamW + RandAugment + mixup recipe
(``configs/cifar/vit_mlp.yaml``). Batch sizes are per rank, as in timm; the released YAMLs do not say how many
ranks (``train.world``) the authors ran, nor what their runs changed on the command line (AMP, EMA, ...): the
``*-ofa-runs`` / ``*-pat-runs`` variants (:data:`RUNS_VARIANTS`, ``auto-ofa-runs`` / ``auto-pat-runs``) are those
runs, each change with its source. The global batch is recorded with every run.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hkdbench.benchmark.core.config import (RUN_SECTIONS, ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig,
                                            TrainConfig, build_dataclass, deep_merge, flatten, load_config_file,
                                            parse_overrides, split_teacher_overrides, to_dict)
from hkdbench.benchmark.data.datasets import dataset_info
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.models.pretrained import used_as_is
from hkdbench.benchmark.models.zoo import zoo_entry

# train_interpolation 'random' is the --train-interpolation default of OFA-KD's, PAT's and spofaKD's train.py, which
# no config overrides. PAT's and spofaKD's data_config["interpolation"] = "bilinear" (CIFAR) reaches only the eval
# loader: their train.py falls back to it for training only under --no-aug or an empty --train-interpolation.
_CIFAR224 = {"pipeline": "paper224", "img_size": 224, "batch_size": 128, "rrc_scale": [0.08, 1.0], "hflip": 0.5,
             "train_interpolation": "random"}

RECIPES: Dict[str, Dict[str, Any]] = {
    # The offline demo: Fashion-MNIST at 32 px on a CPU in minutes. Not a reference recipe: its schedule is
    # stepped per update (a 4-epoch run with a half-epoch warm-up would otherwise be a staircase).
    "demo": {
        "data": {"dataset": "fashion-mnist", "pipeline": "small", "img_size": 32, "batch_size": 128,
                 "crop_padding": 2, "hflip": 0.5, "train_interpolation": "bilinear"},
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05, "sched": "cosine", "sched_on_updates": True,
                  "warmup_epochs": 0.5, "warmup_lr": 1e-5, "min_lr": 1e-5, "clip_grad": 5.0, "label_smoothing": 0.0},
        "train": {"epochs": 4},
    },
    # OFA-KD / PAT configs/cifar/cnn.yaml (+ train.py defaults: warmup_lr 1e-4, no clipping); the audit:
    # docs/reference/recipes.md
    "cifar-cnn": {
        "data": {**_CIFAR224, "color_jitter": 0.0},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 2e-3, "sched": "cosine",
                  "warmup_epochs": 3, "warmup_lr": 1e-4, "min_lr": 1e-3, "label_smoothing": 0.1},
        "train": {"epochs": 300},
    },
    # OFA-KD / PAT configs/cifar/vit_mlp.yaml
    "cifar-vit": {
        "data": {**_CIFAR224, "color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
                 "mixup": 0.8, "cutmix": 1.0},
        "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 20,
                  "warmup_lr": 5e-7, "min_lr": 1e-5, "clip_grad": 5.0, "label_smoothing": 0.1},
        "train": {"epochs": 300},
    },
    # PAT configs/cifar/pretrain_cnn.yaml: fine-tuning ImageNet teachers on CIFAR-100 at 224
    "cifar-teacher": {
        "data": {**_CIFAR224, "color_jitter": 0.4, "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25,
                 "mixup": 0.8, "cutmix": 1.0},
        "optim": {"name": "adamw", "lr": 5e-5, "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 20,
                  "warmup_lr": 5e-8, "min_lr": 1e-6, "clip_grad": 5.0, "label_smoothing": 0.1},
        "train": {"epochs": 300},
    },
    # OFA-KD configs/imagenet/cnn.yaml: step decay x0.1 every 30 epochs (min_lr 1e-6 is in the yaml; timm's
    # step schedule does not use it)
    "imagenet-cnn": {
        "data": {"dataset": "imagenet", "pipeline": "paper224", "img_size": 224, "batch_size": 64, "hflip": 0.5,
                 "train_interpolation": "random", "eval_interpolation": "model"},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "sched": "step",
                  "decay_epochs": 30, "decay_rate": 0.1, "warmup_epochs": 3, "warmup_lr": 1e-4, "min_lr": 1e-6,
                  "label_smoothing": 0.1},
        "train": {"epochs": 100},
    },
    # OFA-KD configs/imagenet/vit_mlp.yaml
    "imagenet-vit": {
        "data": {"dataset": "imagenet", "pipeline": "paper224", "img_size": 224, "batch_size": 128,
                 "train_interpolation": "random", "eval_interpolation": "model", "color_jitter": 0.4,
                 "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0},
        "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 20,
                  "warmup_lr": 5e-7, "min_lr": 1e-6, "clip_grad": 5.0, "label_smoothing": 0.1},
        "train": {"epochs": 300, "ema_decay": 0.99996, "drop_path": 0.0},
    },
}



@dataclasses.dataclass(frozen=True)
class RunsVariant:
    """What a reference's authors ran where it differs from the released YAML (``base``): each changed field
    (``section.field``) with its value and the source that states it. A field set to its default (PAT's CIFAR
    ``train.world=1``) is stated for the record and changes no run's identity."""
    base: str
    reference: str
    changes: Mapping[str, Tuple[Any, str]]

    def body(self) -> Dict[str, Any]:
        nested: Dict[str, Dict[str, Any]] = {}
        for key, (value, _source) in self.changes.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        return deep_merge(RECIPES[self.base], nested)


_OFA_README = "OFAKD README: `--nproc_per_node=8`"
_OFA_14 = "OFAKD #14, the author's args.yaml of the CIFAR Swin-T -> ResNet18 OFA run"
_OFA_15 = "OFAKD #15, the author's args.yaml of the ImageNet DeiT-T -> ResNet18 OFA run"
_OFA_19 = "OFAKD #19, the author's args.yaml of the CIFAR DeiT-T and Swin-P runs"
_PAT_CIFAR = "PAT command_cifar.sh: `--nproc_per_node=1 ... --amp --model-ema`"
_PAT_IMAGENET = "PAT command_imagenet.sh: `--nproc_per_node=4 ... --amp --model-ema`"
_EMA_DEFAULT = "train.py's --model-ema-decay default 0.9998 (no PAT YAML sets it)"
_FP16 = "`--amp`: timm's native AMP, float16 autocast with a GradScaler"
_DIST_BN = ("train.py's --dist-bn default 'reduce' (OFAKD's and PAT's): BatchNorm running statistics averaged over "
            "the ranks after every epoch")

# Named recipes for the authors' real runs; ``auto-ofa-runs`` / ``auto-pat-runs`` pick one by student family as
# ``auto`` picks the released YAML. docs/reference/recipes.md: "The authors' runs against the released YAML".
RUNS_VARIANTS: Dict[str, RunsVariant] = {
    "cifar-cnn-ofa-runs": RunsVariant("cifar-cnn", "OFA-KD", {
        "train.world": (8, f"{_OFA_README}; the author's log in OFAKD #14 has 48 steps per epoch (50000 // 1024)"),
        "optim.lr": (0.1, f"{_OFA_14}: lr 0.1 (YAML 0.05)"),
        "train.precision": ("fp32", f"{_OFA_14}: amp false"),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
    "cifar-vit-ofa-runs": RunsVariant("cifar-vit", "OFA-KD", {
        "train.world": (8, _OFA_README),
        "optim.min_lr": (1e-6, f"{_OFA_19}: min_lr 1.0e-06 (YAML 1e-5)"),
        "train.ema_decay": (0.99996, f"{_OFA_19}: model_ema true, model_ema_decay 0.99996"),
        "train.drop_path": (0.0, f"{_OFA_19}: drop_path 0.0 (Swin's default 0.1)"),
        "train.precision": ("fp16", f"{_OFA_19}: amp true; {_FP16}"),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
    "imagenet-cnn-ofa-runs": RunsVariant("imagenet-cnn", "OFA-KD", {
        "train.world": (8, _OFA_README),
        "train.drop_path": (0.0, f"{_OFA_15}: drop_path 0.0"),
        "train.precision": ("fp16", f"{_OFA_15}: amp true; {_FP16}"),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
    "imagenet-vit-ofa-runs": RunsVariant("imagenet-vit", "OFA-KD", {
        "train.world": (8, _OFA_README),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
    "cifar-cnn-pat-runs": RunsVariant("cifar-cnn", "PAT", {
        "train.world": (1, _PAT_CIFAR),
        "train.ema_decay": (0.9998, f"{_PAT_CIFAR}; {_EMA_DEFAULT}"),
        "train.precision": ("fp16", f"{_PAT_CIFAR}; {_FP16}"),
    }),
    "cifar-vit-pat-runs": RunsVariant("cifar-vit", "PAT", {
        "train.world": (1, _PAT_CIFAR),
        "train.ema_decay": (0.9998, f"{_PAT_CIFAR}; {_EMA_DEFAULT}"),
        "train.precision": ("fp16", f"{_PAT_CIFAR}; {_FP16}"),
    }),
    "imagenet-cnn-pat-runs": RunsVariant("imagenet-cnn", "PAT", {
        "train.world": (4, _PAT_IMAGENET),
        "train.ema_decay": (0.9998, f"{_PAT_IMAGENET}; {_EMA_DEFAULT}"),
        "train.precision": ("fp16", f"{_PAT_IMAGENET}; {_FP16}"),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
    # PAT's configs/imagenet/vit_mlp.yaml sets model_ema_decay 0.99996, as imagenet-vit already does
    "imagenet-vit-pat-runs": RunsVariant("imagenet-vit", "PAT", {
        "train.world": (4, _PAT_IMAGENET),
        "train.precision": ("fp16", f"{_PAT_IMAGENET}; {_FP16}"),
        "train.dist_bn": ("reduce", _DIST_BN),
    }),
}
# auto-<suffix>: the variant <auto's pick>-<suffix>
AUTO_RUNS = {"auto-ofa-runs": "ofa-runs", "auto-pat-runs": "pat-runs"}


def recipe_names() -> Sequence[str]:
    return ("auto", *AUTO_RUNS, *RECIPES, *RUNS_VARIANTS)


def recipe_body(name: str) -> Dict[str, Any]:
    """The fields of a named recipe (a released YAML's or a variant's), as nested sections."""
    return RUNS_VARIANTS[name].body() if name in RUNS_VARIANTS else RECIPES[name]


# What ``auto`` picks, per dataset: the recipe for CNN students and for the others (ViT/Swin/ConvNeXt/MLP). A new
# dataset gets an entry here; one without fails under ``auto`` instead of silently taking another's recipe.
AUTO_RECIPES: Dict[str, Dict[str, str]] = {
    "fashion-mnist": {"cnn": "demo", "other": "demo"},
    "cifar10": {"cnn": "cifar-cnn", "other": "cifar-vit"},
    "cifar100": {"cnn": "cifar-cnn", "other": "cifar-vit"},
    "imagenet": {"cnn": "imagenet-cnn", "other": "imagenet-vit"},
}


def resolve_recipe_name(recipe: str, dataset: str, student: str) -> str:
    if recipe in AUTO_RUNS:
        picked = resolve_recipe_name("auto", dataset, student)
        variant = f"{picked}-{AUTO_RUNS[recipe]}"
        if variant not in RUNS_VARIANTS:
            raise ConfigError(f"--recipe {recipe} has no variant of recipe {picked!r} (for {student} on {dataset}); "
                              f"the authors' runs are known for: {', '.join(v.base for v in _variants(recipe))}")
        return variant
    if recipe != "auto":
        if recipe not in RECIPES and recipe not in RUNS_VARIANTS:
            raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(recipe_names())}")
        return recipe
    if dataset not in AUTO_RECIPES:
        from hkdbench.benchmark.data.datasets import dataset_info

        dataset_info(dataset)  # an unknown dataset is named as such, with the known ones
        raise ConfigError(f"--recipe auto has no recipe for dataset {dataset!r} (it knows {', '.join(AUTO_RECIPES)}); "
                          f"name one (--recipe, known: {', '.join(RECIPES)}) or add the dataset to AUTO_RECIPES")
    return AUTO_RECIPES[dataset]["cnn" if zoo_entry(student).family == "cnn" else "other"]


def _variants(auto_name: str) -> List[RunsVariant]:
    return [v for name, v in RUNS_VARIANTS.items() if name.endswith(f"-{AUTO_RUNS[auto_name]}")]


def resolve_run_config(*, kind: str, student: str, method: str = "none", teacher: Optional[str] = None,
                       dataset: str = "fashion-mnist", recipe: str = "auto", teacher_checkpoint: Optional[str] = None,
                       teacher_recipe: Optional[str] = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                       teacher_overrides: Sequence[str] = (), teacher_weights: str = "best",
                       teacher_pretrained: Optional[str] = None, pretrained: Optional[str] = None) -> RunConfig:
    """Builds and validates the complete config of one run: recipe, then the dataset, then ``key=value``
    overrides (``data.*``, ``optim.*``, ``train.*``, ``method.*``). ``teacher_weights``: which weights of a
    teacher trained here the student loads ('best' or 'last' epoch). ``pretrained`` / ``teacher_pretrained``:
    timm's pretrained weights of the run's model / of the teacher (benchmark/models/pretrained.py): ImageNet weights on
    ImageNet are the teacher as they are, elsewhere they start the teacher run that fine-tunes them."""
    from hkdbench.methods import get_method, method_code, method_config, method_settings

    zoo_entry(student)
    if teacher is not None:
        zoo_entry(teacher)
    if not get_method(method).uses_teacher:
        # the student-alone baseline does not depend on a teacher: one run serves every teacher of a student
        teacher = teacher_checkpoint = teacher_pretrained = None
    elif kind == "student" and teacher is None:
        raise ConfigError(f"method {method!r} needs a teacher (--teacher NAME)")
    recipe_name = resolve_recipe_name(recipe, dataset, student)
    body = deep_merge(recipe_body(recipe_name), {"data": {"dataset": dataset}})
    extra = parse_overrides(list(overrides)) if not isinstance(overrides, Mapping) else dict(overrides)
    unknown = sorted(set(extra) - {*RUN_SECTIONS, "method"})
    if unknown:
        raise ConfigError(f"unknown override section(s) {', '.join(unknown)}; allowed: data, optim, train, method")
    body = deep_merge(body, {k: v for k, v in extra.items() if k != "method"})
    data = build_dataclass(DataConfig, body.get("data", {}), "data")
    if data.dataset != dataset:  # it picked the recipe and the number of classes: one way to set it
        raise ConfigError(f"data.dataset={data.dataset!r}: the dataset is set by --dataset (a preset's dataset), "
                          f"which also picks the recipe and the classes, not by an override; got {dataset!r} there")
    if data.eval_interpolation == "model":  # the references' resolve_data_config: the student's own default
        data = dataclasses.replace(data, eval_interpolation=zoo_entry(student).interpolation)
    optim = build_dataclass(OptimConfig, body.get("optim", {}), "optim")
    train = build_dataclass(TrainConfig, body.get("train", {}), "train")
    if train.probe_teachers and (kind != "student" or get_method(method).uses_teacher):
        raise ConfigError(f"train.probe_teachers is for a student run without a teacher of its own (method none); "
                          f"this {kind} run ({method}) " + ("probes its own teacher" if kind == "student" else
                                                            "is a teacher"))
    method_cfg = method_config(method, extra.get("method", {}))
    t_weights = _pretrained(teacher, teacher_pretrained, "the teacher's weights (--teacher-pretrained)") \
        if teacher and teacher_pretrained else None
    t_recipe = None
    if teacher is not None and teacher_checkpoint is None and not (
            t_weights and used_as_is(t_weights.num_classes, dataset, dataset_info(dataset).num_classes)):
        t_recipe = resolve_recipe_name(teacher_recipe or recipe, dataset, teacher)
    own = _pretrained(student, pretrained, "the weights (--pretrained)") if pretrained else None
    cfg = RunConfig(
        kind=kind, student=ModelConfig(student, pretrained=own and own.name, pretrained_sha256=own and own.sha256),
        method=method, method_cfg=to_dict(method_cfg), method_settings=method_settings(method, method_cfg),
        method_code=method_code(method), data=data, optim=optim, train=train,
        teacher=_teacher_model(teacher, teacher_checkpoint, teacher_weights, t_weights) if teacher else None,
        teacher_recipe=t_recipe, teacher_overrides=tuple(teacher_overrides) if t_recipe else (),
        recipe=recipe_name)
    return _naming_teacher_run(cfg) if t_recipe else cfg


def _naming_teacher_run(cfg: RunConfig) -> RunConfig:
    """``cfg`` naming the run that trains its teacher (``teacher_run``, by that run's hash), with its teacher
    overrides canonical: sorted, each value as the teacher run's config reads it, and only those that change
    something. Equivalent spellings (another order, ``3.0`` for ``3``) therefore give one student run."""
    try:
        t_cfg = teacher_run_config(cfg)
    except ConfigError as err:
        raise ConfigError(f"teacher override (teacher.<section>.<field>=value): {err}") from None
    plain = teacher_run_config(dataclasses.replace(cfg, teacher_overrides=()))
    changed = {}
    for section in RUN_SECTIONS:
        mine, default = to_dict(getattr(t_cfg, section)), to_dict(getattr(plain, section))
        changed[section] = {k: v for k, v in mine.items() if v != default[k]}
    canonical = tuple(flatten({k: v for k, v in changed.items() if v}))
    return dataclasses.replace(cfg, teacher_overrides=canonical, teacher_run=t_cfg.run_name())


def _pretrained(model: str, name: str, flag: str):
    """The weights ``name`` for ``model``; when they do not fit or cannot be found, a ConfigError starting with
    ``flag`` (which weights, given how)."""
    from hkdbench.benchmark.models.zoo import resolve_for_model

    try:
        return resolve_for_model(model, name)
    except HkdbenchError as err:
        raise ConfigError(f"{flag}: {err.message()}") from None


def _teacher_model(name: str, checkpoint: Optional[str], weights: str, pretrained=None) -> ModelConfig:
    try:
        return ModelConfig(name, checkpoint=checkpoint, weights=weights, pretrained=pretrained and pretrained.name,
                           pretrained_sha256=pretrained and pretrained.sha256)
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None


def teacher_run_config(cfg: RunConfig) -> RunConfig:
    """The config of the run that trains ``cfg``'s teacher: the same dataset, the teacher's own recipe and
    ``teacher_overrides``, seed 0. Every student run with the same teacher settings reuses that one run."""
    extra = parse_overrides(list(cfg.teacher_overrides))
    # the teacher sees the students' inputs: same data location and resolution, whatever its overrides say
    located = {"data": {"root": cfg.data.root, "download": cfg.data.download, "img_size": cfg.data.img_size}}
    # watched and kept like the student run unless its overrides say otherwise (these are not part of any hash)
    kept = {key: getattr(cfg.train, key) for key in ("log", "log_interval", "keep_checkpoint")}
    # the students' validation split unless its overrides say otherwise: the teacher never trains on the images a
    # student's best epoch is chosen on (the split is the same for every run: data/datasets.py held_out_mask)
    extra = deep_merge({"train": kept, "data": {"val_split": cfg.data.val_split}}, extra)
    return resolve_run_config(kind="teacher", student=cfg.teacher.name, method="none", dataset=cfg.data.dataset,
                              recipe=cfg.teacher_recipe or "auto", overrides=deep_merge(extra, located),
                              pretrained=cfg.teacher.pretrained)


# --------------------------------------------------------------------------------------------------------------
# A run config file (hkdbench train/teacher -c FILE), then the command line's flags, then its key=value overrides
# --------------------------------------------------------------------------------------------------------------

# Fields a config file may hold that resolution derives from the others: a run's config.json records them, and a
# replay of that file checks that this hkdbench derives the same (else the run would not be the one recorded).
DERIVED_FIELDS = ("method_settings", "method_code", "teacher_run", "student.pretrained_sha256",
                  "teacher.pretrained_sha256")
_FIXED_MODEL_FIELDS = {"checkpoint_ema": False}  # what neither `train` nor `teacher` sets: a file must leave it so


@dataclasses.dataclass
class RunRequest:
    """What ``hkdbench train``/``teacher`` (or the API) asks for: :func:`resolve_run_config`'s arguments, from a config
    file (:func:`from_file`), then the flags given, then ``key=value`` overrides (``teacher.*`` to the teacher run).
    ``method_cfg``: the file's hyperparameters, for its ``method`` only."""
    kind: str
    arguments: Dict[str, Any] = dataclasses.field(default_factory=dict)
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher_overrides: List[str] = dataclasses.field(default_factory=list)
    method_cfg: Dict[str, Any] = dataclasses.field(default_factory=dict)
    file: Optional[str] = None
    body: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Optional[str], kind: str) -> "RunRequest":
        if path is None:
            return cls(kind)
        body = load_config_file(path)
        _check_file_kind(body, kind, path)
        student, teacher = body.get("student") or {}, body.get("teacher") or {}
        for role, model in (("student", student), ("teacher", teacher)):
            for key, value in _FIXED_MODEL_FIELDS.items():
                if model.get(key, value) != value:
                    raise ConfigError(f"config file {path}: {role}.{key}={model[key]!r} is not a setting of hkdbench "
                                      f"{kind}; leave it out")
        sections = {k: dict(body[k]) for k in RUN_SECTIONS if body.get(k)}
        dataset = sections.get("data", {}).pop("dataset", None)
        arguments = {"student": student.get("name"), "pretrained": student.get("pretrained"),
                     "dataset": dataset, "recipe": body.get("recipe")}
        if kind == "student":
            arguments.update(method=body.get("method"), teacher=teacher.get("name"),
                             teacher_checkpoint=teacher.get("checkpoint"), teacher_weights=teacher.get("weights"),
                             teacher_pretrained=teacher.get("pretrained"), teacher_recipe=body.get("teacher_recipe"))
            arguments.pop("pretrained")
        return cls(kind, {k: v for k, v in arguments.items() if v is not None}, sections,
                   list(body.get("teacher_overrides") or []), dict(body.get("method_cfg") or {}), path, body)

    def given(self, **flags: Any) -> "RunRequest":
        """The request with the flags given on the command line (None: not given) over the file's."""
        self.arguments.update({k: v for k, v in flags.items() if v is not None})
        return self

    def with_overrides(self, items: Sequence[str]) -> "RunRequest":
        """``key=value`` items over the file's sections; ``teacher.<section>.<field>=value`` over its teacher
        overrides (a later value of a key wins)."""
        own, teacher = split_teacher_overrides(items)
        if teacher and self.kind == "teacher":
            raise ConfigError(f"teacher.* overrides ({', '.join(teacher)}) set a student's teacher run; for this "
                              "teacher run, set its fields directly (train.epochs=3)")
        self.overrides = deep_merge(self.overrides, parse_overrides(own))
        self.teacher_overrides = [*self.teacher_overrides, *teacher]
        return self

    def resolve(self, method: Optional[str] = None) -> RunConfig:
        """The run's config (``method``: one of a cohort's, else the file's or kd); a pure replay of a config file is
        checked to stand for the same run (:data:`DERIVED_FIELDS`)."""
        try:
            cfg = resolve_run_config(**self._arguments(method))
        except ConfigError as err:
            raise self._blamed(err, method) from None
        if self.file is not None:
            check_replay(self.body, cfg, self.file)
        return cfg

    def _arguments(self, method: Optional[str]) -> Dict[str, Any]:
        arguments = dict(self.arguments, kind=self.kind)
        if self.kind == "student":
            arguments["method"] = method or arguments.get("method", "kd")
        if "student" not in arguments:
            flag = "--student" if self.kind == "student" else "--model"
            raise ConfigError(f"no model to train: give {flag}" + (f" (config file {self.file} names none: "
                                                                   "student: NAME)" if self.file else ""))
        mine = self.method_cfg if arguments.get("method") == self.body.get("method", "none") else {}
        overrides = deep_merge(self.overrides, {"method": deep_merge(mine, self.overrides.get("method", {}))})
        return {**arguments, "overrides": overrides, "teacher_overrides": self.teacher_overrides}

    def _blamed(self, err: ConfigError, method: Optional[str]) -> ConfigError:
        """``err`` naming the config file when the file alone (with the flags) fails so too."""
        if self.file is None:
            return err
        alone = dataclasses.replace(RunRequest.from_file(self.file, self.kind), arguments=self.arguments)
        try:
            resolve_run_config(**alone._arguments(method))
        except ConfigError as again:
            if again.message() == err.message():
                return ConfigError(f"config file {self.file}: {err.message()}")
        return err


def _check_file_kind(body: Mapping[str, Any], kind: str, path: str) -> None:
    """A teacher run's file given to ``train`` (or a student's to ``teacher``) says which command takes it."""
    stated = body.get("kind", kind)
    if stated not in ("student", "teacher"):
        raise ConfigError(f"config file {path}: kind must be 'student' or 'teacher', got {stated!r}")
    if stated != kind:
        command = "hkdbench teacher" if stated == "teacher" else "hkdbench train"
        raise ConfigError(f"config file {path} is a {stated} run's config (kind: {stated}); train it with `{command} "
                          f"-c {path}`")
    if kind == "teacher":
        extra = [k for k in ("teacher", "teacher_recipe", "teacher_run") if body.get(k)]
        extra += ["teacher_overrides"] if body.get("teacher_overrides") else []
        extra += [f"method={body['method']!r}"] if body.get("method", "none") != "none" else []
        if extra:
            raise ConfigError(f"config file {path}: a teacher run has no teacher nor method; remove "
                              f"{', '.join(extra)}")


def _at(body: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        body = body.get(part) if isinstance(body, Mapping) else None
    return body


def _same(given: Any, resolved: Any) -> bool:
    """Whether the fields a file gives have the values resolved (a section: those of its fields it gives)."""
    if isinstance(given, Mapping) and isinstance(resolved, Mapping):
        return all(k in resolved and _same(v, resolved[k]) for k, v in given.items())
    return json.loads(json.dumps(given)) == json.loads(json.dumps(resolved))


def check_replay(body: Mapping[str, Any], cfg: RunConfig, path: str) -> None:
    """A config file whose settings all resolved as written (a run's config.json replayed) must derive what it
    records (:data:`DERIVED_FIELDS`): else this hkdbench would train another run under the recorded one's settings."""
    resolved = cfg.to_dict()
    plain = {k: v for k, v in body.items() if k not in DERIVED_FIELDS}
    for role in ("student", "teacher"):
        if isinstance(plain.get(role), Mapping):
            plain[role] = {k: v for k, v in plain[role].items() if k != "pretrained_sha256"}
    if not _same(plain, resolved):
        return  # the command line changed something: a new run, its derived fields derived afresh
    for key in DERIVED_FIELDS:
        recorded = _at(body, key)
        if recorded is not None and not _same(recorded, _at(resolved, key)):
            raise ConfigError(f"config file {path} records {key}={recorded!r}, but this hkdbench derives "
                              f"{_at(resolved, key)!r} from its settings: {_REPLAY_ADVICE[key.split('.')[-1]]}. "
                              f"Remove {key} from the file to train the settings with this code (a new run)")


_REPLAY_ADVICE = {
    "method_code": "the method's code changed since that run, so it would compute something else",
    "method_settings": "the method's defaults changed since that run",
    "teacher_run": "the teacher run it names would not be the one trained now (its settings, the pipeline or its "
                   "weights changed)",
    "pretrained_sha256": "the pretrained weights resolve to another file than that run used",
}
