"""Run config files (issue 23, item 1): ``train -c FILE`` / ``teacher -c FILE`` take YAML with config.json's fields, a
run's own config.json replays that run (same hash), the flags and key=value overrides go on top; a bad file is one
line naming the file and the field, exit 2, nothing written. ``hkdbench config`` lists every field of the resolved
config with its value, default and help, all from the dataclasses' one source (field_docs)."""
import json
from pathlib import Path

import pytest
import yaml

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.config import REQUIRED, ConfigError, field_docs, load_config_file
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.recipes.resolve import RunRequest

TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=1"]


def _write(tmp_path, body, name="run.yaml"):
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return str(path)


def _resolve(path, kind="student", overrides=(), **flags):
    return RunRequest.from_file(path, kind).given(**flags).with_overrides(list(overrides)).resolve()


@pytest.mark.slow
def test_a_runs_own_config_json_replays_it_exactly(fmnist_available, done_teacher_store, tmp_path, capsys):
    runs, teacher_dir, student = done_teacher_store(tmp_path)
    assert main([*student, "--runs-dir", runs]) == 0
    (student_dir,) = [r for r in RunStore(runs).runs() if r.config().kind == "student"]
    before = sorted(p.name for p in Path(runs).iterdir())
    # the config alone resolves to the very run (its name carries the hash) for a student and for its teacher
    assert _resolve(str(student_dir.config_file)).run_name() == student_dir.path.name
    assert _resolve(str(teacher_dir.config_file), "teacher").run_name() == teacher_dir.path.name
    capsys.readouterr()
    # and the command finds it done: nothing trained, nothing new in the store
    assert main(["train", "-c", str(student_dir.config_file), "--runs-dir", runs]) == 0
    assert main(["teacher", "-c", str(teacher_dir.config_file), "--runs-dir", runs]) == 0
    assert sorted(p.name for p in Path(runs).iterdir()) == before
    out = capsys.readouterr().out
    assert f"{student_dir.path.name}: already done" in out and f"{teacher_dir.path.name}: already done" in out, out
    # an override on top is another run, the file's other settings kept
    cfg = _resolve(str(student_dir.config_file), overrides=["train.epochs=2"])
    assert cfg.run_name() != student_dir.path.name
    assert (cfg.train.epochs, cfg.data.train_subset, cfg.teacher_run) == (2, 64, student_dir.config().teacher_run)


def test_a_partial_yaml_file_then_flags_then_overrides(tmp_path):
    path = _write(tmp_path, """
student: vit_mini
teacher: resnet_mini
method: kd
method_cfg: {temperature: 4}
recipe: demo
data: {batch_size: 32, train_subset: 64}
train: {epochs: 2, seed: 1}
teacher_overrides: {train: {epochs: 3}}
""")
    cfg = _resolve(path)
    assert (cfg.student.name, cfg.teacher.name, cfg.recipe, cfg.method_cfg["temperature"]) == \
        ("vit_mini", "resnet_mini", "demo", 4.0)
    assert (cfg.data.batch_size, cfg.train.epochs, cfg.train.seed, cfg.optim.lr) == (32, 2, 1, 2e-3)  # lr: the recipe's
    assert cfg.teacher_overrides == ("train.epochs=3",)
    # in that order: the file, then the flags, then key=value (teacher.* onto the file's teacher overrides)
    cfg = _resolve(path, overrides=["train.epochs=5", "method.temperature=2", "teacher.train.epochs=6"],
                   student="swin_mini")
    assert (cfg.student.name, cfg.train.epochs, cfg.train.seed, cfg.method_cfg["temperature"]) == \
        ("swin_mini", 5, 1, 2.0)
    assert cfg.teacher_overrides == ("train.epochs=6",)  # (the demo recipe has 4)
    # the file's hyperparameters are its method's: another method of a cohort keeps its own defaults
    assert _resolve(path, method="dkd").method_settings == ()


def test_the_command_line_reads_the_file_in_every_grammar(tmp_path, monkeypatch):
    from hkdbench.benchmark.engine import trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda cfg, **_: seen.append(cfg) or trainer.RunResult("done", None))
    monkeypatch.setattr("hkdbench.benchmark.cli.run_commands.check_before_training", lambda cfg, device: None)
    path = _write(tmp_path, {"student": "vit_mini", "teacher": "resnet_mini", "recipe": "demo",
                             "train": {"epochs": 2}})
    assert main(["train", "train.epochs=3", "--config", path, "--seed", "7"]) == 0
    assert (seen[0].train.epochs, seen[0].train.seed, seen[0].method) == (3, 7, "kd")


@pytest.mark.parametrize("body,message", [
    ({"student": "vit_mini", "teacher": "resnet_mini", "optim": {"lrr": 0.1}},
     "unknown field(s) 'lrr' in optim; allowed: betas"),
    ({"student": "vit_mini", "trian": {"epochs": 1}}, "unknown field(s) 'trian' in RunConfig; allowed:"),
    ({"student": "vit_mini", "train": {"epochs": "many"}}, "train.epochs: expected an integer, got 'many'"),
    ({"student": "vit_mini", "data": 3}, "data: expected a mapping of DataConfig fields, got 3"),
    ({"student": {"name": "vit_mini", "weigths": "best"}}, "'weigths' in student"),
    ({"student": {"name": "vit_mini", "checkpoint_ema": True}}, "student.checkpoint_ema=True is not a setting"),
    ({"kind": "teacher", "student": "resnet_mini", "method": "none"}, "is a teacher run's config (kind: teacher); "
                                                                        "train it with `hkdbench teacher -c"),
    ({"kind": "sutdent"}, "kind must be 'student' or 'teacher', got 'sutdent'"),
    ({"student": "vit_mini", "teacher": "resnet_mini", "recipe": "demo", "data": {"batch_size": 0}},
     "data: data.batch_size and data.eval_batch_size must be >= 1"),
    ({"student": "vit_mini", "teacher": "resnet_mini", "recipe": "demo", "method_code": "v0"},
     "records method_code='v0', but this hkdbench derives 'v1'"),
    ("student: [vit_mini", "is not valid YAML"),
    ("- a\n- b\n", "holds list, not a mapping of run config fields"),
])
def test_a_bad_file_is_named_with_its_field_exit_2_nothing_written(tmp_path, runs_dir, capsys, body, message):
    path = _write(tmp_path, body)
    assert main(["train", "-c", path, "--runs-dir", runs_dir]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config file {path}" in err and message in err, err
    assert not Path(runs_dir).exists()


def test_an_overrides_error_is_not_blamed_on_the_file(tmp_path, capsys):
    path = _write(tmp_path, {"student": "vit_mini", "teacher": "resnet_mini", "recipe": "demo"})
    assert main(["config", "-c", path, "data.batch_size=0"]) == 2
    err = capsys.readouterr().err
    assert "data.batch_size and data.eval_batch_size must be >= 1" in err and "config file" not in err


@pytest.mark.parametrize("path,message", [("missing.yaml", "no such file"), (".", "is a directory")])
def test_a_file_that_cannot_be_read(tmp_path, path, message):
    with pytest.raises(ConfigError, match=message):
        load_config_file(str(tmp_path / path))


def test_an_unknown_field_suggests_the_one_meant_with_its_help(tmp_path, capsys):
    assert main(["config", "--student", "vit_mini", "--teacher", "resnet_mini", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'lr' -- peak learning rate (after the warm-up)?" in err
    assert "`hkdbench config` lists every field" in err


# --- hkdbench config ----------------------------------------------------------------------------------------------

def _leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and key != "method_cfg":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_config_lists_every_field_with_value_default_and_help(capsys):
    argv = ["config", "--student", "vit_mini", "--teacher", "resnet_mini", "--recipe", "demo", "optim.lr=0.01",
            "method.temperature=4", "--format", "json"]
    assert main(argv) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {r["key"]: r for r in listing["fields"]}
    cfg = _resolve(None, student="vit_mini", teacher="resnet_mini", recipe="demo",
                   overrides=["optim.lr=0.01", "method.temperature=4"])
    assert listing["run"] == cfg.run_name()
    values = dict(_leaves(cfg.to_dict()))
    expected = {k for k in values if k != "method_cfg"} | {f"method.{k}" for k in cfg.method_cfg}
    assert set(rows) == expected  # every field, nothing else
    for key, value in values.items():
        if key != "method_cfg":
            assert rows[key]["value"] == value, key
    docs = {d.key: d for d in field_docs()}
    for key, row in rows.items():
        assert row["help"], f"{key} has no help"
        if key in docs:  # the dataclasses' own default and help, the one source
            assert (row["default"], row["help"]) == (docs[key].default, docs[key].help)
    assert (rows["optim.lr"]["value"], rows["optim.lr"]["default"]) == (0.01, 0.05)
    assert (rows["method.temperature"]["value"], rows["method.temperature"]["default"]) == (4.0, 1.0)
    assert rows["kind"]["default"] == REQUIRED


def test_config_table_marks_what_differs_and_yaml_replays(tmp_path, capsys):
    argv = ["config", "--student", "vit_mini", "--teacher", "resnet_mini", "--recipe", "demo", "train.epochs=3"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    epochs = next(line for line in table if " train.epochs " in line)
    assert epochs.startswith("* ") and epochs.split()[1:4] == ["train.epochs", "3", "10"]
    assert "training epochs" in epochs
    assert main([*argv, "--format", "yaml"]) == 0
    path = _write(tmp_path, capsys.readouterr().out)
    assert main(["config", "-c", path, "--format", "json"]) == 0
    again = json.loads(capsys.readouterr().out)["run"]
    assert again == _resolve(None, student="vit_mini", teacher="resnet_mini", recipe="demo",
                             overrides=["train.epochs=3"]).run_name()


def test_config_of_a_teacher_run(capsys):
    assert main(["config", "--model", "resnet_mini", "--recipe", "demo", "--format", "json"]) == 0
    rows = {r["key"]: r["value"] for r in json.loads(capsys.readouterr().out)["fields"]}
    assert (rows["kind"], rows["student.name"], rows["method"], rows["teacher"]) == ("teacher", "resnet_mini", "none",
                                                                                      None)
    assert main(["config", "--model", "resnet_mini", "--student", "vit_mini"]) == 2
    assert "--model (a teacher run) excludes a student run's --student" in capsys.readouterr().err


# --- every option has help; --version ------------------------------------------------------------------------------

def _parsers(parser, path=("hkdbench",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_and_argument_has_help():
    from hkdbench.benchmark.cli.arguments import build_parser

    missing = [f"{' '.join(path)} {action.option_strings or action.dest}"
               for path, parser in _parsers(build_parser()) for action in parser._actions
               if not (action.help or "").strip()]
    assert not missing, missing
    assert len(list(_parsers(build_parser()))) > 15  # the walk reached the subcommands


def test_teacher_help_says_nothing_of_the_teacher_overrides_it_rejects(capsys):
    from hkdbench.benchmark.cli.arguments import build_parser

    for command, has in (("train", True), ("teacher", False)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert ("teacher.<section>.<field>=value" in out) is has, command
    assert main(["teacher", "--model", "resnet_mini", "teacher.train.epochs=3"]) == 2
    assert "set a student's teacher run" in capsys.readouterr().err


def test_version(capsys):
    import hkdbench

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"hkdbench {hkdbench.__version__}\n"
