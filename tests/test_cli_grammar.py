"""One grammar for every subcommand (issue 12, bug c): key=value overrides anywhere, list options spelled one way,
teacher overrides spelled as in sweep, a sweep named by its id, override values read by their field's type."""
import pytest

from hkdbench.benchmark.cli.arguments import build_parser
from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.sweep.plan import expand
from hkdbench.benchmark.sweep.preset import load_preset
from test_sweep import hkdbench


@pytest.fixture
def trained_configs(monkeypatch):
    """``hkdbench train`` up to the trainer: the configs it would train, nothing trained."""
    from hkdbench.benchmark.engine import trainer

    seen = []

    def fake_train(cfg, **_):
        seen.append(cfg)
        return trainer.RunResult("done", None)

    monkeypatch.setattr(trainer, "train", fake_train)
    return seen


def test_train_takes_overrides_before_between_and_after_options(fmnist_available, trained_configs, runs_dir):
    argv = ["train", "optim.lr=0.01", "--student", "vit_mini", "train.epochs=2", "--teacher", "resnet_mini",
            "--recipe", "demo", "teacher.train.epochs=3", "--runs-dir", runs_dir, "data.batch_size=32"]
    assert main(argv) == 0
    (cfg,) = trained_configs
    assert (cfg.optim.lr, cfg.train.epochs, cfg.data.batch_size) == (0.01, 2, 32)
    assert cfg.teacher_overrides == ("train.epochs=3",)


def test_train_and_sweep_spell_teacher_overrides_alike(fmnist_available, trained_configs, runs_dir, tmp_path):
    assert main(["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--recipe", "demo",
                 "--runs-dir", runs_dir, "teacher.train.epochs=3", "teacher.data.eval_subset=64"]) == 0
    plan = expand(load_preset(None, ["recipe=demo", "teacher.data.eval_subset=64", "teacher.train.epochs=3.0"],
                              {"teachers": ["resnet_mini"], "students": ["vit_mini"], "methods": ["kd"]}))
    assert trained_configs[0].run_name() == plan.students[0].name
    assert "--teacher-override" not in build_parser().format_help()


@pytest.mark.parametrize("command", [["overhead", "--teacher", "a", "--student", "b"], ["sweep"], ["status", "demo"]])
def test_list_options_are_comma_separated_or_repeated_in_every_subcommand(command):
    parser = build_parser()
    comma = parser.parse_args([*command, "--methods", "kd,ofa"])
    repeated = parser.parse_args([*command, "--methods", "kd", "--methods", "ofa"])
    both = parser.parse_args([*command, "--methods", "kd", "--methods", "ofa,"])
    assert comma.methods == repeated.methods == both.methods == ["kd", "ofa"]
    assert parser.parse_args(command).methods is None
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "--methods", ","])


def test_status_names_an_inline_sweep_by_its_id(fmnist_available, tmp_path):
    preset = ["recipe=demo", "train.epochs=1", "data.train_subset=64", "data.eval_subset=64",
              "data.batch_size=32", "data.img_size=16"]
    runs = tmp_path / "runs"
    code, out, err = hkdbench("sweep", "--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "none",
                              *preset, "--executor", "inline", "--runs-dir", runs)
    assert code == 0, err
    sweep_id = out.split("sweep dir ")[-1].strip().rsplit("/", 1)[-1]
    code, status, err = hkdbench("status", sweep_id, "--runs-dir", runs)
    assert code == 0, err
    assert status.startswith(f"sweep {sweep_id} (") and "1 runs: 1 done" in status
    code, _, err = hkdbench("status", "no-such-sweep", "--runs-dir", runs)
    assert code == 2 and "unknown preset 'no-such-sweep'" in err


def _cfg(*overrides):
    return resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo", overrides=list(overrides))


@pytest.mark.parametrize("word", ["no", "yes", "auto"])
def test_a_string_field_keeps_yes_and_no(word):
    assert _cfg(f"data.in_memory={word}").data.in_memory == word


@pytest.mark.parametrize("word,value", [("true", True), ("yes", True), ("on", True), ("YES", True), ("True", True),
                                        ("false", False), ("no", False), ("off", False), ("Off", False)])
def test_a_bool_field_takes_true_false_yes_no_on_off(word, value):
    assert _cfg(f"data.download={word}").data.download is value


@pytest.mark.parametrize("word", ["maybe", "1", "2"])
def test_a_bool_field_refuses_other_words(word):
    with pytest.raises(ConfigError, match=r"data.download: expected a boolean \(true/yes/on or false/no/off"):
        _cfg(f"data.download={word}")


def test_preset_files_follow_the_same_rule(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("recipe: demo\nteachers: [resnet_mini]\nstudents: [vit_mini]\nmethods: [none]\n"
                      "overrides: {data: {in_memory: no, download: off}}\n")
    (spec,) = expand(load_preset(str(preset))).runs
    assert (spec.cfg.data.in_memory, spec.cfg.data.download) == ("no", False)
