"""Recipes, overrides, validation and run hashes."""
import pytest

from hkdbench.benchmark.core.config import ConfigError, parse_overrides
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config


def _cfg(**kw):
    args = dict(kind="student", student="vit_mini", teacher="resnet_mini", method="kd")
    args.update(kw)
    return resolve_run_config(**args)


def test_overrides_parse_as_yaml_into_nested_sections():
    assert parse_overrides(["optim.lr=0.1", "method.stages=[1, 2]", "data.root=/x"]) == {
        "optim": {"lr": 0.1}, "method": {"stages": [1, 2]}, "data": {"root": "/x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_overrides_reach_every_section_and_are_typed():
    cfg = _cfg(method="fitnet", overrides=["optim.lr=0.5", "train.epochs=2", "data.batch_size=32",
                                           "method.stages=[2,3]", "method.kd_weight=0"])
    assert cfg.optim.lr == 0.5 and cfg.train.epochs == 2 and cfg.data.batch_size == 32
    assert cfg.method_cfg["stages"] == [2, 3] and cfg.method_cfg["kd_weight"] == 0.0


@pytest.mark.parametrize("override,message", [
    ("optim.lrr=1", "unknown field.*'lrr'.*allowed: .*lr"),
    ("method.temp=2", "unknown field.*'temp' in method.kd; allowed: gt_weight, kd_weight, temperature"),
    ("train.epochs=two", "train.epochs: expected an integer"),
    ("optim.name=lamb", "optim.name must be 'sgd' or 'adamw'"),
    ("method.temperature=0", "temperature must be > 0"),
    ("model.x=1", "unknown override section"),
    ("train.compile=fast", "train.compile: expected a boolean"),
])
def test_bad_overrides_name_the_field_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(overrides=[override])


def test_auto_recipe_follows_the_papers():
    assert _cfg(dataset="cifar100", student="resnet18", teacher="swin_tiny").recipe == "cifar-cnn"
    vit = _cfg(dataset="cifar100", student="deit_tiny", teacher="convnext_tiny")
    assert vit.recipe == "cifar-vit" and vit.optim.name == "adamw" and vit.data.mixup == 0.8
    assert vit.data.img_size == 224 and vit.data.pipeline == "paper224"
    assert _cfg().recipe == "demo"


def test_hash_is_stable_and_changes_with_the_result_relevant_config():
    a, b = _cfg(), _cfg()
    assert a.run_hash() == b.run_hash() and a.run_name() == b.run_name()
    assert _cfg(overrides=["train.seed=1"]).run_hash() != a.run_hash()
    assert _cfg(overrides=["method.temperature=4"]).run_hash() != a.run_hash()
    assert _cfg(teacher_overrides=["train.epochs=7"]).run_hash() != a.run_hash()
    # how many loader workers is not part of the result, nor whether the step is compiled
    assert _cfg(overrides=["data.workers=9"]).run_hash() == a.run_hash()
    compiled = _cfg(overrides=["train.compile=true"])
    assert compiled.train.compile is True and compiled.run_hash() == a.run_hash()
    assert compiled.run_name() == a.run_name() and a.train.compile is False
    # nor where the dataset lies or whether torchvision may download it (the dataset's name is what it is)
    assert _cfg(overrides=["data.root=/elsewhere/fmnist", "data.download=true"]).run_hash() == a.run_hash()


def test_student_alone_does_not_depend_on_a_teacher():
    assert _cfg(method="none").run_hash() == _cfg(method="none", teacher="swin_mini").run_hash()
    with pytest.raises(ConfigError, match="needs a teacher"):
        _cfg(teacher=None)


def test_teacher_run_is_shared_by_students_of_the_same_teacher():
    a = teacher_run_config(_cfg(student="vit_mini"))
    b = teacher_run_config(_cfg(student="mixer_mini", method="fitnet"))
    assert a.run_hash() == b.run_hash() and a.kind == "teacher" and a.student.name == "resnet_mini"


def test_auto_has_a_recipe_per_dataset_and_names_the_missing_one(monkeypatch):
    from hkdbench.benchmark.recipes import resolve as recipes

    assert _cfg(dataset="cifar10", student="resnet18", teacher="swin_tiny").recipe == "cifar-cnn"
    assert _cfg(dataset="imagenet", student="deit_tiny", teacher="resnet18").recipe == "imagenet-vit"
    # a dataset the registry knows but auto has no recipe for fails, instead of silently taking CIFAR's
    monkeypatch.delitem(recipes.AUTO_RECIPES, "cifar10")
    with pytest.raises(ConfigError, match="--recipe auto has no recipe for dataset 'cifar10'"):
        _cfg(dataset="cifar10", student="resnet18", teacher="swin_tiny")
    assert _cfg(dataset="cifar10", recipe="cifar-cnn", student="resnet18", teacher="swin_tiny").recipe == "cifar-cnn"
    with pytest.raises(ValueError, match="unknown dataset .svhn.; known datasets"):
        _cfg(dataset="svhn")
