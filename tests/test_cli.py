"""The command line as a user drives it."""
import itertools

import pytest

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.store import RunStore
from hkdbench.methods import list_methods, unregister_method
from _support import FAMILY_MODELS, LOGIT_MSE_PLUGIN

TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16",
        "train.epochs=1"]
TINY_TEACHER = [f"teacher.{o}" for o in TINY]


def _train(runs_dir, teacher, student, method, *extra):
    return main(["train", "--teacher", teacher, "--student", student, "--method", method, "--recipe", "demo",
                 "--runs-dir", runs_dir, *TINY_TEACHER, *TINY, *extra])


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_train_every_family_pair_for_one_short_epoch(fmnist_available, runs_dir, method, capsys):
    for teacher, student in itertools.product(FAMILY_MODELS.values(), FAMILY_MODELS.values()):
        assert _train(runs_dir, teacher, student, method) == 0, f"{teacher} -> {student}"
    runs = RunStore(runs_dir).runs()
    students = [r for r in runs if r.config().kind == "student"]
    assert len(students) == 25 and all(r.is_done for r in students)
    assert len([r for r in runs if r.config().kind == "teacher"]) == 5  # one per teacher, reused


@pytest.mark.parametrize("method", sorted(set(list_methods()) - {"kd", "fitnet"}))
def test_train_every_method_through_the_cli(fmnist_available, runs_dir, method):
    """Every registered method, one short epoch, on a pair with a token teacher and a token student."""
    assert _train(runs_dir, "swin_mini", "vit_mini", method) == 0
    (run,) = [r for r in RunStore(runs_dir).runs() if r.config().method == method]
    assert run.is_done and run.summary()["method"] == method


@pytest.mark.parametrize("argv,message", [
    (["train", "--teacher", "resnet_mini", "--student", "vit_tiny"], "unknown model 'vit_tiny'; known models:"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "ofakd"],
     "unknown method 'ofakd'; known methods:"),
    (["train", "--student", "vit_mini", "--method", "kd"], "needs a teacher"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--dataset", "cifar100", "--data-root",
      "/nonexistent"], "cifar100 not found"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--dataset", "svhn"], "known datasets"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--recipe", "fast"], "known recipes"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "optim.momentun=0.9"], "allowed: betas"),
    (["teacher", "--model", "resnet_mini", "--resume", "--restart"], "exclude each other"),
    (["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--teacher-checkpoint", "t.pth",
      "--teacher-weights", "last"], "a teacher checkpoint is loaded as it is"),
])
def test_bad_input_fails_at_once_with_what_is_allowed(argv, message, capsys, runs_dir):
    assert main([*argv, "--runs-dir", runs_dir]) == 2
    assert message in capsys.readouterr().err
    assert not RunStore(runs_dir).runs(), "nothing is written for a run that cannot start"


def test_nan_from_a_huge_learning_rate_fails_the_run(fmnist_available, runs_dir, capsys):
    rc = main(["teacher", "--model", "resnet_mini", "--recipe", "demo", "--runs-dir", runs_dir, *TINY,
               "optim.lr=1e30", "optim.warmup_epochs=0"])
    assert rc == 2
    assert "non-finite loss" in capsys.readouterr().err
    (run,) = RunStore(runs_dir).runs()
    assert run.status() == "failed" and not run.summary_file.exists()


def test_methods_and_models_listings(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("none", "kd", "fitnet"):
        assert f"\n{name} " in "\n" + out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "swin_pico" in out and "vit_mini" in out


def test_methods_pair_reports_extra_parameters(capsys):
    assert main(["methods", "--pair", "swin_mini", "resnet_mini", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in list_methods()}
    assert "0.000M" in rows["kd"] and "0.000M" not in rows["fitnet"]


def test_a_user_method_in_its_own_file_runs_through_the_cli(fmnist_available, runs_dir, tmp_path, monkeypatch):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(LOGIT_MSE_PLUGIN)
    monkeypatch.setenv("HKDBENCH_METHODS", str(plugin))
    try:
        assert _train(runs_dir, "resnet_mini", "vit_mini", "logit_mse", "method.weight=2") == 0
        (run,) = [r for r in RunStore(runs_dir).runs() if r.config().method == "logit_mse"]
        assert run.is_done and "loss/mse" in run.metrics()[0]
        assert run.config().method_cfg == {"weight": 2.0}
    finally:
        unregister_method("logit_mse")


def test_teacher_from_an_old_timm_checkpoint(fmnist_available, runs_dir, tmp_path):
    import torch

    from hkdbench.benchmark.models.zoo import create_model
    from test_checkpoints import _to_timm_065_swin_layout

    teacher = create_model("swin_mini", 10, in_chans=1, img_size=16)
    path = tmp_path / "swin_mini_fmnist.pth"
    torch.save(_to_timm_065_swin_layout(teacher.model.state_dict()), path)
    rc = main(["train", "--teacher", "swin_mini", "--teacher-checkpoint", str(path), "--student", "resnet_mini",
               "--method", "kd", "--recipe", "demo", "--runs-dir", runs_dir, *TINY])
    assert rc == 0
    (run,) = RunStore(runs_dir).runs()  # no teacher run: the checkpoint was used
    assert run.config().teacher.checkpoint == str(path) and run.summary()["teacher_top1"] is not None
    assert (run.summary()["teacher_weights"], run.summary()["teacher_run"]) == ("checkpoint", None)


def test_demo_quick_prints_the_comparison_table(fmnist_available, runs_dir, capsys):
    assert main(["demo", "--quick", "--runs-dir", runs_dir]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "method" not in line]
    assert [line.split("|")[1].strip() for line in table] == ["none", "kd", "fitnet"]
    assert "teacher top-1" in out
    teacher = float(out.split("teacher top-1 ")[1].split()[0])
    best = max(float(line.split("|")[2]) for line in table)
    assert ("Note: the teacher" in out) == (teacher < best)  # said exactly when the teacher is the weaker model
    # a second demo reuses every finished run
    assert main(["demo", "--quick", "--runs-dir", runs_dir]) == 0
    assert capsys.readouterr().out.count("already done") == 3


@pytest.mark.usefixtures("fmnist_available")
def test_analysis_commands_write_by_default_where_the_report_keeps_their_files(tmp_path, done_teacher_store,
                                                                               monkeypatch, capsys):
    runs, _, _ = done_teacher_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["collect", "--runs-dir", runs]) == 0
    printed = capsys.readouterr().out
    assert "runs: results/runs.csv" in printed and (tmp_path / "results" / "epochs.csv").exists()
    assert main(["report", "--runs-dir", runs]) == 0
    assert (tmp_path / "results" / "README.md").exists() and not (tmp_path / "analysis_out").exists()
    from hkdbench.benchmark.cli.arguments import build_parser

    parser = build_parser()
    assert [parser.parse_args([name]).out for name in ("collect", "table", "plot", "report")] == \
        ["results", "results/tables", "results/figures", "results"]


def test_the_demo_says_when_its_teacher_is_worse_than_a_student():
    from hkdbench.benchmark.engine.demo import weak_teacher_note

    rows = [{"method": "none", "best_top1": 60.0, "teacher_top1": 55.0},
            {"method": "kd", "best_top1": 62.5, "teacher_top1": 55.0}]
    note = weak_teacher_note(rows, quick=True)
    assert "teacher (55.00 % top-1) is worse than the student kd (62.50 %)" in note
    assert "not knowledge from a better model" in note and "without --quick" in note
    assert "teacher.train.epochs" in weak_teacher_note(rows, quick=False)
    assert weak_teacher_note([{**r, "teacher_top1": 70.0} for r in rows]) is None
