"""The resolved configuration of a run: a tree of frozen dataclasses, built from a recipe plus ``key=value``
overrides, validated field by field, and hashed to name the run's directory."""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.names import OVERHEAD_KIND, is_teacher_run_name, run_name


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
    check_known_fields(cls, values, where)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def check_known_fields(cls: type, values: Mapping[str, Any], where: str = "") -> None:
    """A ConfigError naming the fields of ``values`` that ``cls`` lacks, the allowed ones and, for a likely typo, the
    field meant with its help."""
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(values) - set(known))
    if not unknown:
        return
    guesses = {k: difflib.get_close_matches(k, known, n=1, cutoff=0.6) for k in unknown}
    meant = [known[g[0]] for g in guesses.values() if g]
    hint = "; did you mean " + ", ".join(f"{f.name!r} -- {f.metadata['help']}" if f.metadata.get("help") else
                                         repr(f.name) for f in meant) + "?" if meant else ""
    documented = any(f.metadata.get("help") for f in known.values())  # a run config's section, not a method's
    listing = "; `hkdbench config` lists every field with its value, default and help" if documented else ""
    raise ConfigError(f"unknown field(s) {', '.join(repr(k) for k in unknown)} in {where or cls.__name__}; "
                      f"allowed: {', '.join(sorted(known))}{hint}{listing}")


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


def setting(default: Any = MISSING, help: str = "", identity: bool = True,
            identity_as: Optional[Callable[[Any], Any]] = None) -> Any:
    """A config field with its one line of help: the one source of the text that ``hkdbench config`` prints, the
    unknown-field errors quote and a generated reference can list (:func:`field_docs`). ``identity=False``: left out of
    the run's identity (see :func:`where_or_how` and :func:`restated`). ``identity_as``: what of the value the
    identity holds (a local file's path: not where it lies, the SHA-256 field beside it stands for it)."""
    metadata: Dict[str, Any] = {"help": help}
    if not identity:
        metadata["identity"] = False
    if identity_as is not None:
        metadata["identity_as"] = identity_as
    return field(default=default, metadata=metadata)


def where_or_how(default: Any, help: str = "") -> Any:
    """A config field that says where or how fast a run goes, or how it is watched, never what it computes: left out
    of the run's identity."""
    return setting(default, help, identity=False)


def restated(default: Any = MISSING, help: str = "") -> Any:
    """A config field whose content another field of the identity already stands for (the method's resolved
    hyperparameters by ``method_settings``; how the teacher run is trained by ``teacher_run``): left out of it."""
    return setting(default, help, identity=False)


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
        if "identity_as" in f.metadata:
            value = f.metadata["identity_as"](value)
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
    dataset: str = setting("fashion-mnist", "the dataset (set by --dataset; it picks the recipe and the classes)")
    # where the dataset lies and how it got there are not what it is (the dataset's name is)
    root: Optional[str] = where_or_how(None, "the dataset's folder (null: its default location; same as --data-root)")
    download: bool = where_or_how(False, "let torchvision download the dataset (cifar10/cifar100 only; needs a "
                                         "network)")
    pipeline: str = setting("small", "input pipeline: 'small' (demo resolution, padded random crop) or 'paper224' "
                                     "(the papers' CIFAR-at-224: timm's random resized crop)")
    img_size: int = setting(32, "training and evaluation image size in pixels (a side)")
    train_subset: int = setting(0, "0: the whole training set; else the first N of a seeded permutation")
    # data/datasets.py: held_out_mask (a fixed seed, stratified by class over the whole split, so every run shares it)
    val_split: float = setting(0.0, "fraction of the training set held out to validate on (the kept best weights are "
                                    "chosen on it); 0: none, the papers' convention (best by test top-1)")
    batch_size: int = setting(128, "training batch per process (timm's --batch-size)")
    eval_batch_size: int = setting(256, "evaluation batch")
    workers: int = where_or_how(4, "DataLoader workers of the per-image path")
    eval_subset: int = setting(0, "0: the whole test set; else its first N images (quick checks only)")
    in_memory: str = setting("auto", "'auto', 'yes', 'no': the whole set as one uint8 tensor, augmented on the device")
    hflip: float = setting(0.5, "horizontal flip probability")
    rrc_scale: Tuple[float, ...] = setting((0.08, 1.0), "random resized crop: the range of the area kept ('paper224')")
    train_interpolation: str = setting("bilinear", "training resize: 'bilinear', 'bicubic' or 'random' (either, per "
                                                   "image, as timm's train.py)")
    eval_interpolation: str = setting("bilinear", "evaluation resize: 'bilinear', 'bicubic' or 'model' (the "
                                                  "student's default)")
    crop_padding: int = setting(4, "random crop padding of the 'small' pipeline")
    color_jitter: float = setting(0.0, "colour jitter strength (timm: applied only without auto_augment)")
    auto_augment: Optional[str] = setting(None, "timm's RandAugment policy, e.g. 'rand-m9-mstd0.5-inc1' (null: none)")
    reprob: float = setting(0.0, "random erasing probability")
    mixup: float = setting(0.0, "mixup alpha (0: off)")
    cutmix: float = setting(0.0, "cutmix alpha (0: off)")
    crop_pct: Optional[float] = setting(None, "evaluation centre-crop fraction (null: the student's crop_pct from the "
                                              "zoo)")
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
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"data.val_split is the fraction of the training set held out for validation, in [0, 1) "
                             f"(0: none), got {self.val_split}")
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
    name: str = setting("sgd", "optimiser: 'sgd' (timm's: Nesterov momentum) or 'adamw'")
    lr: float = setting(0.05, "peak learning rate (after the warm-up)")
    momentum: float = setting(0.9, "sgd momentum (Nesterov)")
    weight_decay: float = setting(5e-4, "weight decay (timm's: not on biases and norms)")
    betas: Tuple[float, ...] = setting((0.9, 0.999), "adamw betas")
    eps: float = setting(1e-8, "adamw eps (torch's default, which timm keeps without --opt-eps)")
    sched: str = setting("cosine", "schedule: 'cosine' (CosineLRScheduler) or 'step' (StepLRScheduler)")
    sched_on_updates: bool = setting(False, "false: the schedule steps once per epoch, as the references; true: per "
                                            "update")
    warmup_epochs: float = setting(0.0, "linear warm-up from warmup_lr, in epochs")
    warmup_lr: float = setting(1e-4, "learning rate at the start of the warm-up")
    min_lr: float = setting(0.0, "cosine floor (the step schedule has none, as in timm)")
    decay_epochs: float = setting(100.0, "step schedule: decay every decay_epochs (OFA-KD train.py default 100)")
    decay_rate: float = setting(0.1, "step schedule: the factor per decay")
    clip_grad: float = setting(0.0, "gradient norm clipping (0: none; timm's clip_mode 'norm')")
    label_smoothing: float = setting(0.0, "label smoothing of the task loss")
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

def _not_teacher_runs(names: Sequence[Any]) -> List[Any]:
    """The items of ``names`` that do not name a teacher run, by the store's naming rule."""
    if not names:
        return []
    return [name for name in names if not isinstance(name, str) or not is_teacher_run_name(name)]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(10, "training epochs")
    seed: int = setting(0, "seed of the data stream and of the models' randomness (same as --seed)")
    precision: str = setting("auto", "'auto' (bf16 on CUDA with support, fp16 otherwise; fp32 on CPU), 'fp32', "
                                     "'bf16', 'fp16'")
    channels_last: str = setting("auto", "channels-last memory format: 'auto' (on CUDA), 'yes', 'no'")
    ema_decay: float = setting(0.0, "student EMA decay per update (0: no EMA)")
    drop_path: Optional[float] = setting(None, "student stochastic depth (null: the timm model's default, as "
                                               "train.py)")
    eval_every: int = setting(1, "epochs between evaluations (the last epoch is always evaluated)")
    # Probes (probes/: the PROBES registry in probes/hooks.py), logged into metrics.jsonl; 0 turns a probe off.
    probe_every: int = setting(0, "epochs between CKA probes, teacher stage x student stage (0: off)")
    probe_images: int = setting(512, "CKA probe set size, drawn deterministically from the test set")
    probe_kernel: str = setting("linear", "CKA kernel: 'linear' or 'rbf'")
    conflict_every: int = setting(0, "steps between gradient-conflict measurements, task vs distillation (0: off)")
    # A sweep sets it for its `none` runs (one per teacher the run serves); empty: no such probe.
    probe_teachers: Tuple[str, ...] = setting((), "teacher runs (names) a student trained alone is CKA-probed against "
                                                  "(the reference of the CKA-change figure)")
    # Where the run is watched (not part of the run's hash: they change no result; benchmark/engine/tracking.py and
    # benchmark/engine/progress.py). The run store stays the source of truth.
    log: str = where_or_how("none", "experiment tracker: 'tensorboard', 'wandb' or 'none'")
    log_interval: int = where_or_how(50, "steps between per-step records (steps.jsonl, the tracker's step/ scalars) "
                                         "and progress lines when stdout is not a terminal (0: none)")
    # checkpoint.pt holds the optimiser and EMA beside the model (twice the kept weights' size): once the run is DONE
    # only a resume would read it, and a finished run never resumes
    keep_checkpoint: bool = where_or_how(False, "keep the resume checkpoint (checkpoint.pt) of a finished run (false: "
                                                "removed once its kept weights and DONE are written)")
    # torch.compile of the student and the method's modules (engine/step.py: compile_trained_modules); the same
    # result up to float rounding, so it is in env.json, not in the hash
    compile: bool = where_or_how(False, "torch.compile the student and the method's modules (same result up to float "
                                        "rounding)")
    # Where the teacher's logits/pre-logits come from (engine/teacher_outputs.py): its live pass, or the outputs
    # stored once per (teacher weights, data stream) in the run store; the same numbers either way, so not in the hash
    teacher_outputs: str = where_or_how("live", "'live': run the teacher every step; 'stored': read its outputs, "
                                                "computed once per teacher and data stream, from the run store "
                                                "(methods that read only logits/pre-logits)")
    # How many ranks the reference spread its global batch over (data.batch_size per rank): part of what the run
    # computes (each rank's slice augmented, normalised and lossed on its own, the gradients averaged over the ranks);
    # the processes that run them are not: each trains world / processes ranks in turn (engine/ranks.py)
    world: int = setting(1, "ranks the global batch is spread over, as the reference ran (OFA-KD: 8); each device "
                            "trains world / processes of them in turn")
    sync_bn: bool = setting(False, "timm's --sync-bn: BatchNorm statistics over every rank's slice (world > 1, one "
                                   "GPU per rank)")
    # timm's --dist-bn (engine/dist_bn.py); its default 'reduce' is what OFA-KD's and PAT's train.py ran, ours
    # 'broadcast' is what every run did before the field (rank 0's statistics, DDP's buffer broadcast)
    dist_bn: str = setting("broadcast", "timm's --dist-bn (world > 1): 'broadcast' evaluates and keeps rank 0's "
                                        "BatchNorm running statistics, 'reduce' their mean over the ranks after "
                                        "every epoch (the EMA's at evaluated epochs)")
    def __post_init__(self):
        if self.log not in TRACKERS:
            raise ValueError(f"train.log must be one of {', '.join(TRACKERS)}, got {self.log!r}")
        if self.log_interval < 0:
            raise ValueError(f"train.log_interval must be >= 0 (0: no per-step records or progress lines), "
                             f"got {self.log_interval}")
        if self.probe_every < 0 or self.conflict_every < 0:
            raise ValueError("train.probe_every and train.conflict_every must be >= 0 (0 turns the probe off)")
        if self.probe_images < 4:
            raise ValueError(f"train.probe_images must be >= 4 (unbiased HSIC), got {self.probe_images}")
        bad = _not_teacher_runs(self.probe_teachers)
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
        if self.dist_bn not in ("broadcast", "reduce"):
            raise ValueError(f"train.dist_bn must be 'broadcast' (rank 0's BatchNorm statistics) or 'reduce' (their "
                             f"mean over the ranks), got {self.dist_bn!r}")
        if self.dist_bn == "reduce" and self.world == 1:
            raise ValueError("train.dist_bn=reduce needs train.world > 1 (with one rank there is nothing to average): "
                             "set train.dist_bn=broadcast")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.teacher_outputs not in ("live", "stored"):
            raise ValueError(f"train.teacher_outputs must be live or stored, got {self.teacher_outputs!r}")
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


# How a local weight file is told from timm's architecture.tag names (which never hold a path separator); a resolved
# local file is named by its absolute path.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt")
LOCAL_WEIGHT_FILE = "local file"  # what a run's identity holds of a local file's path


def is_weight_file(name: str) -> bool:
    """Whether ``name`` is a local weight file's path rather than a timm weights name."""
    return "/" in name or name.endswith(WEIGHT_FILE_SUFFIXES) or Path(name).expanduser().is_file()


def _weights_identity(name: str) -> str:
    """A resolved local file (an absolute path) stands in the identity by its SHA-256 field, not by where it lies."""
    return LOCAL_WEIGHT_FILE if "/" in name or name.endswith(WEIGHT_FILE_SUFFIXES) else name


WEIGHTS_KINDS = ("best", "last")       # the weights a run keeps: its best evaluated epoch and its last epoch


@dataclass(frozen=True)
class ModelConfig:
    name: str = setting(help="the model (see `hkdbench models`)")
    checkpoint: Optional[str] = setting(None, "a state dict to load (a teacher: instead of training one; "
                                              "--teacher-checkpoint)")
    checkpoint_ema: bool = setting(False, "take the EMA weights from a timm checkpoint that has them")
    # The references' teachers are the model_best of timm's train.py.
    weights: str = setting("best", "a teacher trained here: which weights of its run students load, 'best' (its best "
                                   "epoch by top-1; by validation top-1 with data.val_split) or 'last'")
    # (benchmark/models/pretrained.py): the weights' identity, part of the hash; a local file's by its SHA-256 only
    pretrained: Optional[str] = setting(None, "pretrained weights: timm's architecture.tag (e.g. "
                                              "swin_tiny_patch4_window7_224.ms_in1k) or a local weight file's path",
                                        identity_as=lambda name: _weights_identity(name))
    pretrained_sha256: Optional[str] = setting(None, "the SHA-256 of the file those weights resolved to (recorded, "
                                                     "not set)")
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
    kind: str = setting(help="'student' (hkdbench train) or 'teacher' (hkdbench teacher)")
    student: ModelConfig = setting(help="the model the run trains (a teacher run's: the teacher)")
    method: str = setting(help="the distillation method (see `hkdbench methods`); 'none' trains the model alone")
    method_cfg: Dict[str, Any] = restated(help="the method's hyperparameters, every one as resolved (method.<field>)")
    data: DataConfig = setting(help="the data and its augmentation")
    optim: OptimConfig = setting(help="the optimiser and its schedule")
    train: TrainConfig = setting(help="the training loop")
    # what the run stands for of method_cfg, and the label that keeps the run's table cell apart
    method_settings: Tuple[str, ...] = setting((), "the method's hyperparameters that differ from its defaults, "
                                                   "canonical key=value (recorded, not set)")
    # 'v<N>', a built-in method's declared version, or 'src-<hash>', a plugin's source fingerprint; a run is trained
    # only while it matches the loaded code (methods/registry.py: method_code)
    method_code: str = setting("", "the version of the method's computation (recorded, not set)")
    teacher: Optional[ModelConfig] = setting(None, "the teacher (null: none); its fields as the student's")
    teacher_recipe: Optional[str] = restated(None, "the recipe the teacher run is trained with (--teacher-recipe)")
    # canonical (sorted, each value as the teacher run reads it, none that changes nothing): the teacher run is
    # rebuilt from them
    teacher_overrides: Tuple[str, ...] = restated((), "key=value overrides of the teacher run (teacher.<section>."
                                                      "<field>=value)")
    recipe: str = setting("", "the training recipe (see `hkdbench recipes`; --recipe)")
    # a student's hash names its teacher by it
    teacher_run: Optional[str] = setting(None, "the name (with its hash) of the run that trains the teacher (recorded, "
                                               "not set)")
    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)

    def run_hash(self) -> str:
        """What the run stands for (:func:`identity`: the config fields that decide the result, at values other than
        their defaults) and the pipeline's version, hashed."""
        return identity_hash(self, pipeline=PIPELINE_VERSION)

    def run_name(self) -> str:
        """The run's directory name, by the store's naming rule (core/names.py)."""
        return run_name(self)


def run_config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuilds a RunConfig from its stored JSON form."""
    return build_dataclass(RunConfig, d)




@dataclass(frozen=True)
class OverheadConfig:
    """What the overhead benchmark measures of one method on one teacher/student pair, on synthetic data: the config
    of a run of kind ``'overhead'`` (benchmark/tools/overhead.py)."""
    kind: ClassVar[str] = OVERHEAD_KIND
    teacher: str
    student: str
    method: str
    batch_size: int = 32
    img_size: int = 32
    num_classes: int = 100
    in_chans: int = 3
    warmup: int = 3
    repeats: int = 10
    precision: str = "fp32"          # 'fp32', 'bf16', 'fp16' (autocast)
    optimizer: str = "adamw"
    device: str = "cpu"
    seed: int = 0
    protocol: int = 2                # what is timed; 2: the trainer's TrainStep (1 timed a bare forward/backward)
    compile: bool = False            # torch.compile of the step's models, as train.compile=true
    # the measured method's code (methods.method_code), as a training run's: set by the tool that stores the run
    method_code: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, **to_dict(self)}

    def run_hash(self) -> str:
        """The one rule of run identities (:func:`identity`: fields away from their defaults, the method's code among
        them) with the run's kind and the version of the pipeline whose step is timed."""
        if not self.method_code:
            raise ValueError(f"the overhead run of {self.method!r} has no method_code: its hash would not say which "
                             "code was measured")
        return identity_hash(self, kind=self.kind, pipeline=PIPELINE_VERSION)


def overhead_config_from_dict(d: Mapping[str, Any]) -> OverheadConfig:
    """Rebuilds an OverheadConfig from its stored JSON form (which names its kind)."""
    return build_dataclass(OverheadConfig, {k: v for k, v in d.items() if k != "kind"})


# --------------------------------------------------------------------------------------------------------------
# The fields' documentation and config files
# --------------------------------------------------------------------------------------------------------------

REQUIRED = "(required)"  # the default shown for a field without one


@dataclass(frozen=True)
class FieldDoc:
    """One field of the run config: its dotted key, its type, its default (:data:`REQUIRED` when it has none) and its
    one line of help, as the dataclasses declare them."""
    key: str
    type: str
    default: Any
    help: str


def _type_name(annotation: Any) -> str:
    """``Optional[float]`` -> 'float or null', ``Tuple[float, ...]`` -> 'list of float'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, Tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _dataclass_in(annotation: Any) -> Optional[type]:
    """The dataclass a field holds (also as Optional[...]), or None."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return next((a for a in candidates if is_dataclass(a)), None)


def field_docs(cls: type = RunConfig, prefix: str = "") -> List[FieldDoc]:
    """Every leaf field of the config tree under ``cls`` (sections and models expanded: ``data.img_size``,
    ``teacher.name``), in declaration order: the one source of the fields' help (``hkdbench config``, the
    unknown-field errors, a generated reference)."""
    docs: List[FieldDoc] = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        inner = _dataclass_in(hints[f.name])
        if inner is not None:
            docs.extend(field_docs(inner, f"{prefix}{f.name}."))
            continue
        default = _field_default(f)
        docs.append(FieldDoc(f"{prefix}{f.name}", _type_name(hints[f.name]),
                             REQUIRED if default is MISSING else to_dict(default), f.metadata.get("help", "")))
    return docs


def check_partial(cls: type, values: Any, where: str) -> Dict[str, Any]:
    """``values`` for some fields of ``cls`` (a section of a config file): every name known, every value of its
    field's type, sections and models checked the same way; the values as read. Checks between fields wait for the
    whole config (a recipe fills the rest)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {values!r}")
    check_known_fields(cls, values, where)
    hints = typing.get_type_hints(cls)
    checked: Dict[str, Any] = {}
    for key, value in values.items():
        inner, path = _dataclass_in(hints[key]), f"{where}.{key}" if where else key
        if inner is None or value is None:
            checked[key] = _coerce(value, hints[key], path)
        else:
            checked[key] = check_partial(inner, {"name": value} if isinstance(value, str) else value, path)
    return checked


def load_config_file(path: str) -> Dict[str, Any]:
    """A run config file (YAML; a run's config.json is one): the fields of :class:`RunConfig`, each section partial
    (``train: {epochs: 3}``), a model given as its name or as its fields, ``teacher_overrides`` as ``key=value`` items
    or as sections. Every name and type is checked here; a ConfigError names the file and the field."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory (a run's is RUN/config.json)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read ({err})") from None
    try:
        body = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(body, Mapping):
        raise ConfigError(f"config file {path} holds {type(body).__name__ if body is not None else 'nothing'}, not "
                          "a mapping of run config fields (data:, optim:, train:, ...)")
    body = dict(body)
    if isinstance(body.get("teacher_overrides"), Mapping):  # sections, as a preset writes them
        body["teacher_overrides"] = flatten(body["teacher_overrides"])
    try:
        return check_partial(RunConfig, body, "")
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None
