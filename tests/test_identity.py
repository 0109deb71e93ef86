"""What a run stands for (issue 20): one rule over the config tree, the method's settings, and the method's code (a
built-in's declared version, a plugin's source fingerprint), so that a changed computation is a new run."""
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _support import LOGIT_MSE_PLUGIN
from hkdbench.benchmark.core.config import (PIPELINE_VERSION, DataConfig, OptimConfig, TrainConfig, identity,
                                       run_config_from_dict, to_dict)
from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.core.store import RunDir, RunStore
from hkdbench.methods import (MethodCodeChangedError, get_method, load_plugins, method_code, register_method,
                              unregister_method)
from hkdbench.methods.registry import source_fingerprint

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=1"]


def _kd(*overrides, method="kd"):
    return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=method,
                              recipe="demo", overrides=list(overrides))


def test_the_identity_is_every_result_field_away_from_its_default():
    cfg = _kd("method.temperature=4", "data.workers=9", "train.log_interval=7", "train.compile=true")
    # the rule read independently: each section against one built from its defaults, less where/how a run goes
    expected = {"kind": "student", "student": {"name": "vit_mini"}, "method": "kd", "method_code": "v1",
                "method_settings": ["temperature=4"], "recipe": "demo", "teacher": {"name": "resnet_mini"},
                "teacher_run": cfg.teacher_run}
    for section, cls, not_result in (("data", DataConfig, {"workers"}), ("optim", OptimConfig, set()),
                                     ("train", TrainConfig, {"log", "log_interval", "compile"})):
        mine, plain = to_dict(getattr(cfg, section)), to_dict(cls())
        changed = {k: v for k, v in mine.items() if v != plain[k] and k not in not_result}
        if changed:
            expected[section] = changed
    assert identity(cfg) == expected
    body = json.dumps({**expected, "pipeline": PIPELINE_VERSION}, sort_keys=True, separators=(",", ":"))
    assert cfg.run_hash() == hashlib.sha256(body.encode()).hexdigest()[:12]
    assert run_config_from_dict(cfg.to_dict()).run_hash() == cfg.run_hash()  # the stored config names the run


def test_a_field_added_with_its_default_keeps_every_identity():
    extended = dataclasses.make_dataclass("DataConfig", [("new_knob", float, dataclasses.field(default=0.0))],
                                          bases=(DataConfig,), frozen=True)
    assert identity(extended(train_subset=256)) == identity(DataConfig(train_subset=256)) == {"train_subset": 256}
    assert identity(extended(train_subset=256, new_knob=1.0)) == {"train_subset": 256, "new_knob": 1.0}


def test_method_settings_say_what_differs_from_the_defaults():
    plain, hot, spelled_default = _kd(), _kd("method.temperature=4"), _kd("method.temperature=1.0")
    assert plain.method_settings == () == spelled_default.method_settings
    assert spelled_default.run_hash() == plain.run_hash()
    assert hot.method_settings == ("temperature=4",) and hot.run_hash() != plain.run_hash()
    fitnet = _kd("method.stages=[2,3]", "method.kd_weight=0", method="fitnet")
    assert fitnet.method_settings == ("kd_weight=0", "stages=[2, 3]")


def test_a_built_in_method_s_version_is_part_of_its_runs(monkeypatch):
    before = _kd()
    monkeypatch.setattr(get_method("kd"), "version", 2)
    after = _kd()
    assert (before.method_code, after.method_code) == ("v1", "v2")
    assert after.run_hash() != before.run_hash()
    assert _kd(method="none").run_hash() == _kd(method="none").run_hash()  # another method's runs keep theirs


def test_a_built_in_method_must_declare_its_version():
    from hkdbench.methods import Distiller

    class Unversioned(Distiller):
        name = "unversioned_builtin"

        @dataclasses.dataclass(frozen=True)
        class Config:
            pass

    Unversioned.__module__ = "hkdbench.methods.unversioned"
    with pytest.raises(TypeError, match="must declare its computation's 'version'"):
        register_method(Unversioned)
    unregister_method("unversioned_builtin")


_REWRITTEN = '''
"""A module docstring that was not there."""
from dataclasses import dataclass
import torch.nn.functional as F
from hkdbench.methods import Distiller, register_method


@register_method
class LogitMSE(Distiller):
    """Another docstring: MSE between the logits."""
    name = 'logit_mse'   # single quotes now
    paper = "a test method"

    @dataclass(frozen=True)
    class Config:
        weight: float = 0.5

    def losses(self, student, teacher, targets, epoch=0):
        # a comment, and the dict written over several lines
        return {
            "ce": self.task_loss(student.logits, targets),
            "mse": self.cfg.weight * F.mse_loss(
                student.logits,
                teacher.logits,
            ),
        }
'''


def test_a_source_fingerprint_ignores_formatting_comments_and_docstrings():
    assert source_fingerprint(_REWRITTEN) == source_fingerprint(LOGIT_MSE_PLUGIN)
    for old, new in (("F.mse_loss", "F.l1_loss"), ("weight: float = 0.5", "weight: float = 0.25"),
                     ('"ce": self', '"task": self')):
        assert old in LOGIT_MSE_PLUGIN
        assert source_fingerprint(LOGIT_MSE_PLUGIN.replace(old, new)) != source_fingerprint(LOGIT_MSE_PLUGIN)


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_method.py"
    path.write_text(LOGIT_MSE_PLUGIN)
    return path


def _loaded_code(path: Path) -> str:
    load_plugins(str(path))
    try:
        return method_code("logit_mse")
    finally:
        unregister_method("logit_mse")


def test_a_plugin_s_code_is_its_source(plugin):
    first = _loaded_code(plugin)
    assert first.startswith("src-")
    plugin.write_text(_REWRITTEN)
    assert _loaded_code(plugin) == first
    plugin.write_text(LOGIT_MSE_PLUGIN.replace("F.mse_loss", "F.l1_loss"))
    assert _loaded_code(plugin) != first
    plugin.write_text(LOGIT_MSE_PLUGIN.replace('paper = "a test method"', 'paper = "a test method"\n    version = 2'))
    assert _loaded_code(plugin) != first  # a declared version counts too (for code outside the file)


def test_a_run_configured_for_other_code_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from hkdbench.benchmark.engine.trainer import train

    cfg = dataclasses.replace(_kd(*TINY), method_code="v0")
    monkeypatch.setattr(get_method("kd"), "version", 1)
    with pytest.raises(MethodCodeChangedError, match="configured for its code v0, but the code loaded now is v1"):
        train(cfg, str(tmp_path / "runs"))
    assert not any((tmp_path / "runs").rglob("*"))


# --------------------------------------------------------------------------------------------------------------
# End to end: an edited plugin through `train` and a local sweep
# --------------------------------------------------------------------------------------------------------------

def _hkdbench(args, cwd, plugin):
    env = {k: v for k, v in os.environ.items() if k != "HKDBENCH_METHODS"}
    env.update(OMP_NUM_THREADS="1", HKDBENCH_METHODS=str(plugin))
    out = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _plugin_runs(runs: Path):
    return sorted(r.path.name for r in RunStore(runs).runs() if r.config().method == "logit_mse" and r.is_done)


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
def test_an_edited_plugin_is_trained_again_and_a_reformatted_one_is_not(tmp_path, plugin):
    runs = tmp_path / "runs"
    teacher_tiny = [f"teacher.{o}" for o in TINY]
    args = ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "logit_mse", "--recipe", "demo",
            "--runs-dir", str(runs), "method.weight=2", *TINY, *teacher_tiny]
    _hkdbench(args, tmp_path, plugin)
    (first,) = _plugin_runs(runs)
    env = json.loads((runs / first / "env.json").read_text())
    assert env["method_source"]["file"] == str(plugin) and env["method_source"]["code"].startswith("src-")

    plugin.write_text(_REWRITTEN)  # formatting, comments, docstrings: the same computation
    assert "already done" in _hkdbench(args, tmp_path, plugin)
    assert _plugin_runs(runs) == [first]

    plugin.write_text(LOGIT_MSE_PLUGIN.replace("F.mse_loss", "F.l1_loss"))  # another computation: a new run
    out = _hkdbench(args, tmp_path, plugin)
    assert "already done" not in out.split("logit_mse")[-1]
    second = [r for r in _plugin_runs(runs) if r != first]
    assert len(second) == 1 and "loss/mse" in RunDir(runs / second[0]).metrics()[0]
    mse = [RunDir(runs / name).metrics()[0]["loss/mse"] for name in (first, second[0])]
    assert mse[0] != mse[1]  # l1 is not mse: the new run computed the edited loss


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
def test_a_sweep_over_an_edited_plugin_trains_the_edited_method(tmp_path, plugin):
    preset = tmp_path / "p.yaml"
    tiny = {"train_subset": 64, "eval_subset": 64, "batch_size": 32, "img_size": 16}
    preset.write_text(yaml.safe_dump({
        "name": "plugin", "recipe": "demo", "teachers": ["resnet_mini"], "students": ["vit_mini"],
        "methods": ["logit_mse"], "overrides": {"data": tiny, "train": {"epochs": 1}},
        "teacher_overrides": {"data": tiny, "train": {"epochs": 1}}}))
    runs = tmp_path / "runs"
    sweep = ["sweep", str(preset), "--executor", "local", "--runs-dir", str(runs)]
    _hkdbench(sweep, tmp_path, plugin)
    (first,) = _plugin_runs(runs)
    plugin.write_text(LOGIT_MSE_PLUGIN.replace("F.mse_loss", "F.l1_loss"))
    _hkdbench(sweep, tmp_path, plugin)
    assert len(_plugin_runs(runs)) == 2 and first in _plugin_runs(runs)


def test_the_methods_listing_shows_each_method_s_code(plugin, capsys):
    from hkdbench.benchmark.cli.main import main

    load_plugins(str(plugin))
    try:
        assert main(["methods"]) == 0
        code = method_code("logit_mse")
    finally:
        unregister_method("logit_mse")
    listing = capsys.readouterr().out
    assert "Hinton et al. 2015, Distilling the Knowledge in a Neural Network [code v1]" in listing
    assert f"a test method [code {code} from {plugin}]" in listing
