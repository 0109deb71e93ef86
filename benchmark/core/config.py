"""The resolved configuration of a run: a tree of frozen dataclasses, built from a recipe plus ``key=value``
overrides, validated field by field, and hashed to name the run's directory."""
from __future__ import annotations

import hashlib
import json
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from hkdbench.benchmark.core.errors import HkdbenchError


class ConfigError(HkdbenchError, ValueError):
    pass


# --------------------------------------------------------------------------------------------------------------
# Generic building and validation
# --------------------------------------------------------------------------------------------------------------

# The one rule for booleans: YAML text (presets, key=value overrides) is read with YAML 1.2's booleans, so only
# true/false are booleans and 'no', 'on', ... stay strings (a str field such as data.in_memory keeps "no"); a bool
# field then accepts a boolean or one of these words, in any case.
TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")


class _Yaml12BoolLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (true/false) instead of YAML 1.1's (yes/no/on/off too)."""


_Yaml12BoolLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12BoolLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                        list("tTfF"))


def load_yaml(text: str) -> Any:
    """Parses YAML text (a preset file, an override value) with the booleans rule above."""
    return yaml.load(text, Loader=_Yaml12BoolLoader)

def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Converts a YAML/CLI value to the annotated field type, or raises ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (tuple, Tuple):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, where) for v in value)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS + FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise ConfigError(f"{where}: expected a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}, any "
                          f"case), got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):  # exact: a float would round an integer above 2**53
            return value
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return build_dataclass(annotation, value, where)
    return value


def build_dataclass(cls: type, values: Mapping[str, Any], where: str = ""):
    """Instantiates ``cls`` from ``values``; unknown keys and ill-typed values raise a ConfigError that names
    the field and lists the allowed ones."""
    if not isinstance(values, Mapping):  # "optim=3": a section given a value instead of its fields
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of {cls.__name__} fields ({where or 'section'}"
                          f".<field>=value), got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(repr(k) for k in unknown)} in {where or cls.__name__}; "
                          f"allowed: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def _is_float_field(annotation: Any) -> bool:
    """float, Optional[float] or Tuple[float, ...]."""
    if annotation is float:
        return True
    return typing.get_origin(annotation) in (typing.Union, tuple) and float in typing.get_args(annotation)


def check_finite(obj: Any, section: str) -> None:
    """Every number of a float field of ``obj`` (a config dataclass) is finite: no config field means anything by
    NaN or infinity, and one would reach the run only to fail it (or worse, to finish it) with meaningless numbers."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if not _is_float_field(hints[f.name]):
            continue
        value = getattr(obj, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if any(v is not None and not math.isfinite(v) for v in values):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{section}.{f.name} must be finite, got {shown}")


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------------------
# What a run stands for
# --------------------------------------------------------------------------------------------------------------

# The version of the pipeline's computation: the data (datasets, transforms, the keyed data stream), the trainer's
# loop, optimiser, schedule and evaluation. Bump it with any change that alters a run's numbers; the golden runs
# (tests/test_golden.py) fail until it is bumped and they are re-recorded. Each method has its own version.
PIPELINE_VERSION = 1


def where_or_how(default: Any) -> Any:
    """A config field that says where or how fast a run goes, or how it is watched, never what it computes: left out
    of the run's identity."""
    return field(default=default, metadata={"identity": False})


def restated(default: Any = MISSING) -> Any:
    """A config field whose content another field of the identity already stands for (the method's resolved
    hyperparameters by ``method_settings``; how the teacher run is trained by ``teacher_run``): left out of it."""
    return field(default=default, metadata={"identity": False})


def _field_default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def identity(obj: Any) -> Dict[str, Any]:
    """The one rule for what a run stands for: every field of the config tree that decides the result and whose
    value is not the field's default. A field added later with a default that keeps the old computation therefore
    leaves every earlier run's identity alone; a default whose value changes alters numbers, which the golden runs
    catch (the pipeline's or the method's version is then bumped)."""
    body: Dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata.get("identity", True) or value == _field_default(f):
            continue
        body[f.name] = identity(value) if is_dataclass(value) else to_dict(value)
    return body


def identity_hash(obj: Any, **extra: Any) -> str:
    """12 hex digits of the SHA-256 of ``identity(obj)`` plus ``extra`` (canonical JSON)."""
    canonical = json.dumps({**identity(obj), **extra}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_overrides(items: Tuple[str, ...] | list) -> Dict[str, Any]:
    """``["optim.lr=0.1", "method.stages=[1,2]"]`` -> nested dict, values parsed as YAML (:func:`load_yaml`: only
    true/false are booleans); :func:`build_dataclass` then reads each value by its field's type."""
    nested: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> List[str]:
    """A nested mapping as sorted ``key=value`` strings (values as YAML flow scalars/lists)."""
    items: List[str] = []
    for key in sorted(mapping):
        value = mapping[key]
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(flatten(value, path + "."))
        else:
            items.append(f"{path}={_scalar(value)}")
    return items


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        try:
            if load_yaml(value) == value and "," not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def split_teacher_overrides(items: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``key=value`` items -> (the run's own, the teacher run's): ``teacher.train.epochs=3`` is the teacher run's
    ``train.epochs=3``, the spelling ``train`` and ``sweep`` share."""
    own, teacher = [], []
    for item in items:
        if item.startswith("teacher."):
            teacher.append(item[len("teacher."):])
        else:
            own.append(item)
    return own, teacher


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------------------------
# The run configuration
# --------------------------------------------------------------------------------------------------------------

RUN_SECTIONS = ("data", "optim", "train")  # the sections of a run config that key=value overrides reach

# timm's train interpolations: 'random' picks bilinear or bicubic per image (RandomResizedCropAndInterpolation)
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")
EVAL_INTERPOLATIONS = ("bilinear", "bicubic", "model")  # 'model': resolved to the student's default by the recipe
# The largest data.img_size: 18x the papers' 224 px, where a batch of 128 images is already 8 GiB per channel as
# float32 before any model runs; a larger value is a typo (the device's memory is checked too: engine/preflight.py).
MAX_IMG_SIZE = 4096


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fashion-mnist"
    root: Optional[str] = None          # None: the dataset's default location
    download: bool = False              # torchvision datasets only; needs a network
    pipeline: str = "small"             # 'small' (demo resolution) or 'paper224' (the papers' CIFAR-at-224)
    img_size: int = 32
    train_subset: int = 0               # 0: the whole training set; else the first N of a seeded permutation
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = where_or_how(4)      # DataLoader workers for the per-image path
    eval_subset: int = 0                # 0: the whole test set; else its first N images (quick checks only)
    in_memory: str = "auto"             # 'auto', 'yes', 'no': the whole-set uint8 tensor fast path
    hflip: float = 0.5
    rrc_scale: Tuple[float, ...] = (0.08, 1.0)
    train_interpolation: str = "bilinear"  # training resize: 'bilinear', 'bicubic' or 'random' (either, per image)
    eval_interpolation: str = "bilinear"   # evaluation resize: 'bilinear', 'bicubic' or 'model' (the model's default)
    crop_padding: int = 4               # 'small' pipeline random crop padding
    color_jitter: float = 0.0
    auto_augment: Optional[str] = None  # e.g. 'rand-m9-mstd0.5-inc1'
    reprob: float = 0.0                 # random erasing probability
    mixup: float = 0.0
    cutmix: float = 0.0
    crop_pct: Optional[float] = None    # None: the student's crop_pct from the zoo

    def __post_init__(self):
        if self.pipeline not in ("small", "paper224"):
            raise ValueError(f"data.pipeline must be 'small' or 'paper224', got {self.pipeline!r}")
        if self.in_memory not in ("auto", "yes", "no"):
            raise ValueError(f"data.in_memory must be 'auto', 'yes' or 'no', got {self.in_memory!r}")
        if self.eval_interpolation not in EVAL_INTERPOLATIONS:
            raise ValueError(f"data.eval_interpolation must be one of {', '.join(EVAL_INTERPOLATIONS)}, "
                             f"got {self.eval_interpolation!r}")
        if self.train_interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(f"data.train_interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, "
                             f"got {self.train_interpolation!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        for key in ("train_subset", "eval_subset", "workers", "crop_padding"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0 (0: {'all' if 'subset' in key else 'none'}), "
                                 f"got {getattr(self, key)}")
        if not 1 <= self.img_size <= MAX_IMG_SIZE:
            raise ValueError(f"data.img_size must be in [1, {MAX_IMG_SIZE}] (pixels per side), got {self.img_size}")
        if self.crop_padding > self.img_size:
            raise ValueError(f"data.crop_padding must be <= data.img_size ({self.img_size}), got {self.crop_padding}")
        if self.root is not None and not self.root.strip():
            raise ValueError("data.root is empty; leave it out for the dataset's default location, or give a path")
        for key in ("hflip", "reprob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"data.{key} is a probability in [0, 1], got {getattr(self, key)}")
        for key in ("color_jitter", "mixup", "cutmix"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if len(self.rrc_scale) != 2 or not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            raise ValueError(f"data.rrc_scale must be two numbers a, b with 0 < a <= b <= 1 (the fractions of the "
                             f"image area a random resized crop keeps), got {list(self.rrc_scale)}")
        # (above 1 only where the evaluation can pad its crop: engine/preflight.py checks it with the data path); the
        # evaluation resize, img_size / crop_pct, is an image size too
        if self.crop_pct is not None and not self.crop_pct >= self.img_size / MAX_IMG_SIZE:
            raise ValueError(f"data.crop_pct must be > 0 and at least data.img_size / {MAX_IMG_SIZE} (evaluation "
                             f"resize = img_size / crop_pct, then the center crop), or null for the student's own, "
                             f"got {self.crop_pct}")
        check_finite(self, "data")


@dataclass(frozen=True)
class OptimConfig:
    """timm 0.6.5 ``train.py``'s optimiser and schedule arguments (see ``engine/optim.py``)."""
    name: str = "sgd"                   # 'sgd' (timm's: Nesterov momentum) or 'adamw'
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    betas: Tuple[float, ...] = (0.9, 0.999)  # adamw
    eps: float = 1e-8                   # adamw (torch's default, which timm keeps without --opt-eps)
    sched: str = "cosine"               # 'cosine' (CosineLRScheduler) or 'step' (StepLRScheduler)
    sched_on_updates: bool = False      # False: stepped once per epoch, as the reference; True: per update
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-4
    min_lr: float = 0.0                 # cosine floor (the step schedule has none, as in timm)
    decay_epochs: float = 100.0         # step: decay every decay_epochs (OFA-KD train.py default 100)
    decay_rate: float = 0.1             # step: the factor per decay
    clip_grad: float = 0.0              # 0: no clipping (norm clipping otherwise, timm's clip_mode 'norm')
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.name not in ("sgd", "adamw"):
            raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {self.name!r}")
        if self.sched not in ("cosine", "step"):
            raise ValueError(f"optim.sched must be 'cosine' or 'step', got {self.sched!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        for key in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "clip_grad"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if self.name == "sgd" and not 0.0 < self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in (0, 1) for sgd (Nesterov momentum), got {self.momentum}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        if not self.decay_epochs > 0:
            raise ValueError(f"optim.decay_epochs must be > 0, got {self.decay_epochs}")
        if not 0.0 < self.decay_rate <= 1.0:
            raise ValueError(f"optim.decay_rate must be in (0, 1], got {self.decay_rate}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_finite(self, "optim")


TRACKERS = ("none", "tensorboard", "wandb")
MAX_SEED = 2 ** 40  # seed * 100003 + epoch must stay within torch.manual_seed's 64 bits
MAX_WORLD = 4096  # ranks: far above any reference (OFA-KD: 8); a larger value is a typo

@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    seed: int = 0
    # 'auto' (bf16 on CUDA with support, fp16 otherwise; fp32 on CPU), 'fp32', 'bf16', 'fp16'
    precision: str = "auto"
    channels_last: str = "auto"         # 'auto' (on CUDA), 'yes', 'no'
    ema_decay: float = 0.0              # student EMA; 0 disables
    drop_path: Optional[float] = None   # student stochastic depth; None: the timm model's default (train.py)
    eval_every: int = 1
    # Probes (probes/: the PROBES registry in probes/hooks.py), logged into metrics.jsonl; 0 turns a probe off.
    probe_every: int = 0                # epochs between CKA probes (teacher stage x student stage)
    probe_images: int = 512             # fixed probe set, drawn deterministically from the test set
    probe_kernel: str = "linear"        # 'linear' or 'rbf'
    conflict_every: int = 0             # steps between gradient-conflict measurements (task vs distillation)
    # Teacher runs of the store (names) that a run without a teacher of its own (the student alone) probes its CKA
    # against, with their best weights, as the distilled runs probe theirs: the reference of the CKA-change figure.
    # A sweep sets it for its `none` runs (one per teacher the run serves); empty: no such probe.
    probe_teachers: Tuple[str, ...] = ()
    # Where the run is watched (not part of the run's hash: they change no result; benchmark/engine/tracking.py and
    # benchmark/engine/progress.py). The run store stays the source of truth.
    log: str = where_or_how("none")     # experiment tracker: 'tensorboard', 'wandb' or 'none'
    log_interval: int = where_or_how(50)  # steps between progress lines when stdout is not a terminal (0: none)
    # torch.compile of the student and the method's modules (engine/step.py: compile_trained_modules); the same
    # result up to float rounding, so it is in env.json, not in the hash
    compile: bool = where_or_how(False)
    # How many ranks the reference spread its global batch over (data.batch_size per rank): part of what the run
    # computes (each rank's slice augmented, normalised and lossed on its own, the gradients averaged over the ranks);
    # the processes that run them are not: each trains world / processes ranks in turn (engine/ranks.py)
    world: int = 1
    sync_bn: bool = False               # timm's --sync-bn: BatchNorm statistics over every rank's slice (world > 1)

    def __post_init__(self):
        if self.log not in TRACKERS:
            raise ValueError(f"train.log must be one of {', '.join(TRACKERS)}, got {self.log!r}")
        if self.log_interval < 0:
            raise ValueError(f"train.log_interval must be >= 0 (0: no progress lines), got {self.log_interval}")
        if self.probe_every < 0 or self.conflict_every < 0:
            raise ValueError("train.probe_every and train.conflict_every must be >= 0 (0 turns the probe off)")
        if self.probe_images < 4:
            raise ValueError(f"train.probe_images must be >= 4 (unbiased HSIC), got {self.probe_images}")
        bad = [t for t in self.probe_teachers if not isinstance(t, str) or not t.startswith("teacher_")]
        if bad:
            raise ValueError(f"train.probe_teachers must name teacher runs (teacher_<model>_<dataset>_s<seed>_<hash>), "
                             f"got {', '.join(map(repr, bad))}")
        if self.probe_teachers and not self.probe_every:
            raise ValueError("train.probe_teachers needs train.probe_every > 0 (they are what the CKA probe measures "
                             "the student against)")
        if len(set(self.probe_teachers)) != len(self.probe_teachers):
            raise ValueError(f"train.probe_teachers names a run twice: {list(self.probe_teachers)}")
        if self.probe_kernel not in ("linear", "rbf"):
            raise ValueError(f"train.probe_kernel must be 'linear' or 'rbf', got {self.probe_kernel!r}")
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if not 1 <= self.world <= MAX_WORLD:
            raise ValueError(f"train.world must be in [1, {MAX_WORLD}] (the reference's number of ranks, e.g. 8 for "
                             f"OFA-KD's recipes), got {self.world}")
        if self.sync_bn and self.world == 1:
            raise ValueError("train.sync_bn=true needs train.world > 1 (with one rank BatchNorm already sees the "
                             "whole batch)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.channels_last not in ("auto", "yes", "no"):
            raise ValueError(f"train.channels_last must be auto, yes or no, got {self.channels_last!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"train.drop_path must be in [0, 1) or null (the model's default), got {self.drop_path}")
        if self.eval_every < 1:
            raise ValueError(f"train.eval_every must be >= 1 (epochs between evaluations; the last epoch is always "
                             f"evaluated), got {self.eval_every}")
        if not abs(self.seed) < MAX_SEED:
            raise ValueError(f"train.seed must be between -2**40 and 2**40 (the data stream's keys are made from "
                             f"it), got {self.seed}")
        check_finite(self, "train")


WEIGHTS_KINDS = ("best", "last")       # the weights a run keeps: its best evaluated epoch and its last epoch


@dataclass(frozen=True)
class ModelConfig:
    name: str
    checkpoint: Optional[str] = None    # a state dict to load (teachers: instead of training one)
    checkpoint_ema: bool = False        # take the EMA weights from a timm checkpoint that has them
    # A teacher trained here: which weights of its run students load. 'best' (its best epoch by top-1), as the
    # references' teachers are the model_best of timm's train.py; 'last' for its last epoch.
    weights: str = "best"
    # timm's pretrained weights (a hub name or tag, e.g. 'swin_tiny_patch4_window7_224.ms_in1k') and the SHA-256
    # of the weights file they resolved to (benchmark/models/pretrained.py): the weights' identity, part of the hash.
    pretrained: Optional[str] = None
    pretrained_sha256: Optional[str] = None

    def __post_init__(self):
        if self.pretrained and self.checkpoint:
            raise ValueError("pretrained and checkpoint exclude each other (both give the model's weights)")
        if self.weights not in WEIGHTS_KINDS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS_KINDS)} (the teacher run's best or last "
                             f"epoch), got {self.weights!r}")
        if self.checkpoint and self.weights != "best":
            raise ValueError(f"weights={self.weights!r} picks the weights of a teacher trained here; a teacher "
                             "checkpoint is loaded as it is (leave weights at 'best')")


@dataclass(frozen=True)
class RunConfig:
    kind: str                           # 'student' or 'teacher'
    student: ModelConfig
    method: str
    method_cfg: Dict[str, Any] = restated()  # the method's hyperparameters, every one as resolved
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    # the method's hyperparameters that differ from its defaults, canonical key=value (sorted, as flatten() writes
    # them): what the run stands for of method_cfg, and the label that keeps the run's table cell apart
    method_settings: Tuple[str, ...] = ()
    # the method's computation (methods/registry.py: method_code): 'v<N>', a built-in method's declared version, or
    # 'src-<hash>', a plugin's source fingerprint; a run is trained only while it matches the loaded code
    method_code: str = ""
    teacher: Optional[ModelConfig] = None
    teacher_recipe: Optional[str] = restated(None)  # the recipe the teacher is trained with when it has no checkpoint
    # key=value overrides of that teacher run, canonical (sorted, each value as the teacher run reads it, none that
    # changes nothing): the teacher run is rebuilt from them
    teacher_overrides: Tuple[str, ...] = restated(())
    recipe: str = ""
    # the name (with its hash) of the run that trains the teacher; a student's hash names its teacher by it
    teacher_run: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    def run_hash(self) -> str:
        """What the run stands for (:func:`identity`: the config fields that decide the result, at values other than
        their defaults) and the pipeline's version, hashed."""
        return identity_hash(self, pipeline=PIPELINE_VERSION)

    def run_name(self) -> str:
        seed = f"s{self.train.seed}"
        if self.kind == "teacher":
            return f"teacher_{self.student.name}_{self.data.dataset}_{seed}_{self.run_hash()}"
        teacher = self.teacher.name if self.teacher else "none"
        return f"{self.method}_{teacher}_to_{self.student.name}_{self.data.dataset}_{seed}_{self.run_hash()}"


def run_config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuilds a RunConfig from its stored JSON form."""
    return build_dataclass(RunConfig, d)
