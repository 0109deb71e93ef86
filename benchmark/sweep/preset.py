"""Sweep presets and their expansion into runs.

A preset (YAML under ``benchmark/presets/`` or any file) names the teacher -> student pairs (an explicit list,
as in the papers' tables, or a ``teachers`` x ``students`` product), the methods, the seeds, the dataset and
recipe, config overrides for the student and teacher runs, and the executors' options (the ``slurm:``
section: ``executors/slurm.py``'s ``SlurmOptions``, which the local executor reads too)::

    name: cifar100-ofa
    dataset: cifar100
    recipe: auto                 # cifar-cnn for CNN students, cifar-vit for ViT/Swin/MLP students
    teacher_recipe: cifar-teacher
    pairs: [swin_tiny -> resnet18, vit_small -> resnet18, ...]
    methods: [none, kd, fitnet, dkd, ofa]
    seeds: [0, 1, 2]
    overrides: {data: {...}, optim: {...}, train: {...}}   # every student run
    teacher_overrides: {train: {...}}                     # every teacher run
    method_overrides: {ofa: {eps: [1.0]}}                 # method.* of one method
    teacher_checkpoints: {swin_tiny: /path/to/ckpt.pth}   # load these teachers instead of training them
    teacher_pretrained: {swin_tiny: swin_tiny_patch4_window7_224.ms_in1k}  # timm's weights (as they are on
                                                          # ImageNet, fine-tuned by the teacher run elsewhere)
    requires: [data.root]                                 # must be given at run time
    slurm: {partition: gpu, time: 1440, gpus_per_node: 1, ...}

Every field is validated (a typo names the field and lists the allowed ones); models and methods are checked
against the registries; every run of the grid is resolved through ``resolve_run_config`` at expansion, so a
config error surfaces before anything is submitted. ``key=value`` overrides reach every field:
``seeds=[0]``, ``methods=[kd,ofa]``, ``slurm.partition=gpu``; ``data.*``/``optim.*``/``train.*`` go to the
student runs' overrides, ``teacher.data.*`` (etc.) to the teacher runs', ``method.<name>.<field>`` to one
method's config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from hkdbench.benchmark.core.config import (RUN_SECTIONS, ConfigError, build_dataclass, deep_merge, load_yaml,
                                            parse_overrides)
from hkdbench.benchmark.sweep.executors.slurm import SlurmOptions


@dataclass(frozen=True)
class Preset:
    name: str = "custom"
    description: str = ""
    dataset: str = "fashion-mnist"
    recipe: str = "auto"
    teacher_recipe: Optional[str] = None
    pairs: Tuple[Any, ...] = ()         # "teacher -> student" strings or [teacher, student] lists
    teachers: Tuple[str, ...] = ()      # with students: the product teachers x students (when pairs is empty)
    students: Tuple[str, ...] = ()
    methods: Tuple[str, ...] = ("none",)
    seeds: Tuple[int, ...] = (0,)
    overrides: Dict[str, Any] = field(default_factory=dict)
    teacher_overrides: Dict[str, Any] = field(default_factory=dict)
    method_overrides: Dict[str, Any] = field(default_factory=dict)
    teacher_checkpoints: Dict[str, Any] = field(default_factory=dict)
    teacher_pretrained: Dict[str, Any] = field(default_factory=dict)
    requires: Tuple[str, ...] = ()
    slurm: SlurmOptions = field(default_factory=SlurmOptions)  # the Slurm executor's; the local one's too

    def pair_list(self) -> List[Tuple[str, str]]:
        if self.pairs:
            return [_parse_pair(p, i) for i, p in enumerate(self.pairs)]
        return [(t, s) for t in self.teachers for s in self.students]


def _parse_pair(p: Any, i: int) -> Tuple[str, str]:
    if isinstance(p, str) and "->" in p:
        t, s = (x.strip() for x in p.split("->", 1))
    elif isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p):
        t, s = p
    elif isinstance(p, Mapping) and set(p) == {"teacher", "student"}:
        t, s = p["teacher"], p["student"]
    else:
        raise ConfigError(f"pairs[{i}]: expected 'teacher -> student', [teacher, student] or "
                          f"{{teacher: ..., student: ...}}, got {p!r}")
    if not t or not s:
        raise ConfigError(f"pairs[{i}]: empty model name in {p!r}")
    return str(t), str(s)


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------

def preset_names() -> List[str]:
    folder = resources.files("hkdbench.benchmark") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def find_preset(name_or_path: str) -> Tuple[Dict[str, Any], str]:
    """The raw mapping of a preset by name (shipped) or path, and where it came from."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or _is_file(path):
        text, origin = _read_text(path), str(path)
    else:
        res = resources.files("hkdbench.benchmark") / "presets" / f"{name_or_path}.yaml"
        if name_or_path not in preset_names():
            raise ConfigError(f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())} "
                              "(or give the path of a YAML file)")
        text, origin = res.read_text(), f"preset {name_or_path}"
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{origin}: not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: a preset is a mapping of fields, got {type(raw).__name__}")
    raw = dict(raw)
    if not path.is_file():
        raw.setdefault("name", name_or_path)
    else:
        raw.setdefault("name", path.stem)
    return raw, origin


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long, a NUL: not a file; the preset's name is judged next
        return False


def _read_text(path: Path) -> str:
    """A preset file's text; a file that cannot be read, or is not UTF-8, is named with the reason."""
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as err:
        why = "it does not exist" if isinstance(err, FileNotFoundError) else \
            "it is a folder" if isinstance(err, IsADirectoryError) else getattr(err, "strerror", None) or str(err)
        raise ConfigError(f"preset file {path} cannot be read: {why}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"preset file {path} is not UTF-8 text (byte {err.start} is {data[err.start:err.start + 1]!r}"
                          "); save it as UTF-8") from None


def split_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """CLI ``key=value`` items -> a nested mapping of preset fields. ``data.*``, ``optim.*``, ``train.*`` go to
    ``overrides``; ``teacher.<section>.*`` to ``teacher_overrides``; ``method.<name>.*`` to ``method_overrides``;
    anything else (``seeds``, ``methods``, ``slurm.*``, ``dataset``, ...) to the preset field of that name."""
    nested = parse_overrides(list(items))
    out: Dict[str, Any] = {}
    for key, value in nested.items():
        if key in RUN_SECTIONS:
            out = deep_merge(out, {"overrides": {key: value}})
        elif key == "teacher":
            if not isinstance(value, Mapping):
                raise ConfigError("teacher.* overrides are teacher.<section>.<field>=value, e.g. "
                                  "teacher.train.epochs=3")
            out = deep_merge(out, {"teacher_overrides": value})
        elif key == "method":
            if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
                raise ConfigError("method.* overrides name the method: method.<name>.<field>=value, e.g. "
                                  "method.ofa.eps=[1.5] (each method has its own config)")
            out = deep_merge(out, {"method_overrides": value})
        else:
            out = deep_merge(out, {key: value})
    return out


def load_preset(name_or_path: Optional[str], overrides: Sequence[str] = (),
                grid: Optional[Mapping[str, Any]] = None) -> Preset:
    """Loads, merges ``key=value`` overrides and an inline grid (``teachers``/``students``/``methods``/``seeds``
    lists) and validates the preset. ``name_or_path=None``: an empty preset (the grid must name students)."""
    if name_or_path:
        raw, origin = find_preset(name_or_path)
    else:
        raw, origin = {"name": "custom"}, "inline grid"
    extra = split_overrides(overrides)
    grid = {k: v for k, v in (grid or {}).items() if v is not None}
    for key in ("teachers", "students"):  # as key=value they act as the inline grid (else pairs would hide them)
        if key in extra and key not in grid:
            value = extra.pop(key)
            grid[key] = [value] if isinstance(value, str) else value
    raw = deep_merge(raw, extra)
    if "teachers" in grid or "students" in grid:
        # an inline grid replaces the preset's pairs by a product (keeping the side that was not given)
        base = build_dataclass(Preset, {k: v for k, v in raw.items() if k != "slurm"}, origin).pair_list() \
            if raw.get("pairs") or raw.get("teachers") else []
        teachers = grid.get("teachers") or raw.get("teachers") or sorted({t for t, _ in base})
        students = grid.get("students") or raw.get("students") or sorted({s for _, s in base})
        raw = {**raw, "pairs": [], "teachers": list(teachers), "students": list(students)}
    for key in ("methods", "seeds"):
        if key in grid:
            raw[key] = list(grid[key])
    preset = build_dataclass(Preset, raw, origin)
    validate_preset(preset, origin)
    return preset


def validate_preset(p: Preset, origin: str) -> None:
    from hkdbench.methods import get_method, list_methods

    from hkdbench.benchmark.models.zoo import zoo, zoo_entry
    from hkdbench.benchmark.recipes.resolve import recipe_names

    known_models = ", ".join(zoo())
    pairs = p.pair_list()
    if not pairs:
        raise ConfigError(f"{origin}: no teacher -> student pairs (give pairs, or teachers and students)")
    for t, s in pairs:
        for role, name in (("teacher", t), ("student", s)):
            try:
                zoo_entry(name)
            except (KeyError, ValueError):
                raise ConfigError(f"{origin}: unknown {role} model {name!r}; known models: {known_models}") from None
    if not p.methods:
        raise ConfigError(f"{origin}: methods is empty")
    for m in p.methods:
        try:
            get_method(m)
        except (KeyError, ValueError):
            raise ConfigError(f"{origin}: unknown method {m!r}; known methods: {', '.join(list_methods())}") from None
    for m in p.method_overrides:
        if m not in p.methods:
            raise ConfigError(f"{origin}: method_overrides names {m!r}, which is not in methods "
                              f"({', '.join(p.methods)})")
    if not p.seeds:
        raise ConfigError(f"{origin}: seeds is empty")
    if len(set(p.seeds)) != len(p.seeds):
        raise ConfigError(f"{origin}: seeds repeat: {list(p.seeds)}")
    for r in (p.recipe, p.teacher_recipe):
        if r is not None and r not in recipe_names():
            raise ConfigError(f"{origin}: unknown recipe {r!r}; known recipes: {', '.join(recipe_names())}")
    for section, where in ((p.overrides, "overrides"), (p.teacher_overrides, "teacher_overrides")):
        unknown = sorted(set(section) - set(RUN_SECTIONS))
        if unknown:
            hint = " (method settings go to method_overrides.<method>)" if "method" in unknown else ""
            raise ConfigError(f"{origin}: unknown section(s) {', '.join(unknown)} in {where}; allowed: "
                              f"{', '.join(RUN_SECTIONS)}{hint}")
    for where, named in (("teacher_checkpoints", p.teacher_checkpoints), ("teacher_pretrained", p.teacher_pretrained)):
        for t in named:
            if t not in {t for t, _ in pairs}:
                raise ConfigError(f"{origin}: {where} names {t!r}, which is not a teacher of the sweep")
    for t in set(p.teacher_checkpoints) & set(p.teacher_pretrained):
        raise ConfigError(f"{origin}: teacher {t!r} is in both teacher_checkpoints and teacher_pretrained; give one")
    for key in p.requires:
        if key.split(".")[0] not in RUN_SECTIONS:
            raise ConfigError(f"{origin}: requires: {key!r} is not a data./optim./train. field")


def missing_requirements(p: Preset) -> List[str]:
    """The ``requires`` keys the preset (with its overrides) leaves unset."""
    missing = []
    for key in p.requires:
        node: Any = p.overrides
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node in (None, ""):
            missing.append(key)
    return missing
