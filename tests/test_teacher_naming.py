"""A student run names its teacher run by that run's hash (issue 12, bug a): equivalent teacher overrides (another
order, 3.0 for 3, a value the recipe already has) give one student run."""
import json

import pytest

from hkdbench.benchmark.core.config import run_config_from_dict
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config
from hkdbench.benchmark.sweep.plan import expand
from hkdbench.benchmark.sweep.preset import load_preset


def _student(teacher_overrides, **kw):
    return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd",
                              recipe="demo", teacher_overrides=teacher_overrides, **kw)


def test_equivalent_teacher_overrides_give_one_student_run():
    spellings = [["train.epochs=3", "data.eval_subset=2000"], ["data.eval_subset=2000", "train.epochs=3"],
                 ["train.epochs=3.0", "data.eval_subset=2000"],
                 ["train.epochs=3", "data.eval_subset=2000", "optim.name=adamw"]]  # adamw: the demo's already
    configs = [_student(s) for s in spellings]
    assert len({c.run_name() for c in configs}) == 1
    assert configs[0].teacher_overrides == ("data.eval_subset=2000", "train.epochs=3")
    # the name it carries is the teacher run's own, and that run has the overrides
    teacher = teacher_run_config(configs[0])
    assert configs[0].teacher_run == teacher.run_name()
    assert (teacher.train.epochs, teacher.data.eval_subset) == (3, 2000)


def test_a_different_teacher_run_is_a_different_student_run():
    base = _student(["train.epochs=3"])
    assert _student(["train.epochs=5"]).run_name() != base.run_name()
    assert _student(["train.epochs=5"]).teacher_run != base.teacher_run
    assert _student(["train.epochs=3"], teacher_weights="last").run_name() != base.run_name()
    # an override that changes nothing is no override: the same run as none at all
    assert _student(["train.epochs=4"]).run_name() == _student([]).run_name()  # demo: 4 epochs


def test_train_and_sweep_spellings_meet_in_one_run(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("dataset: fashion-mnist\nrecipe: demo\nteachers: [resnet_mini]\nstudents: [vit_mini]\n"
                      "methods: [kd]\n")
    plan = expand(load_preset(str(preset), ["teacher.train.epochs=3.0", "teacher.data.eval_subset=2000"]))
    (student,) = plan.students
    (teacher,) = plan.teachers
    assert student.name == _student(["data.eval_subset=2000", "train.epochs=3"]).run_name()
    assert student.cfg.teacher_run == teacher.name == student.teacher_run


def test_the_stored_config_rebuilds_the_same_names():
    cfg = _student(["train.epochs=3"])
    again = run_config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.run_name() == cfg.run_name() and teacher_run_config(again).run_name() == cfg.teacher_run


@pytest.mark.parametrize("bad", ["train.epochs=-1", "optim.lrr=1"])
def test_a_bad_teacher_override_names_the_teacher_run(bad):
    from hkdbench.benchmark.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"teacher override \(teacher\.<section>\.<field>=value\)"):
        _student([bad])
