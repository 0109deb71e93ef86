"""``train``/``teacher --dry-run``: every run the command would train, in order, with its length and state, and
nothing written; and the line that says where a teacher run's settings differ from its student's."""
import re

import pytest

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.recipes.resolve import RECIPES, resolve_run_config
from hkdbench.benchmark.core.store import RunDir

TINY = ["data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=1"]
TINY_TEACHER = [f"teacher.{o}" for o in TINY + ["data.train_subset=64"]]
STUDENT = ["--teacher", "resnet_mini", "--student", "resnet_mini", "--recipe", "demo"]


def _tree(root):
    """Every path under ``root`` with its size and modification time: what a write would change."""
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _names(overrides, method="kd"):
    """(the teacher run's name, the student run's), as the command resolves them."""
    cfg = resolve_run_config(kind="student", student="resnet_mini", teacher="resnet_mini", method=method,
                             recipe="demo", overrides=[o for o in overrides if not o.startswith("teacher.")],
                             teacher_overrides=[o[len("teacher."):] for o in overrides if o.startswith("teacher.")])
    return cfg.teacher_run, cfg.run_name()


def _entries(out):
    """The plan's numbered entries: each its first line and the lines indented under it."""
    entries, lines = [], out.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\d+\. ", line):
            body = [line]
            for more in lines[i + 1:]:
                if not more.startswith("   "):
                    break
                body.append(more)
            entries.append(body)
    return entries


def test_a_full_set_teacher_is_listed_first_with_its_own_length_and_nothing_is_written(fmnist_available, tmp_path,
                                                                                        capsys):
    runs = tmp_path / "runs"
    overrides = ["data.train_subset=256", "train.epochs=1"]
    before = _tree(tmp_path)
    assert main(["train", "--teacher", "resnet_mini", "--student", "resnet_mini", "--runs-dir", runs, *overrides,
                 "--dry-run"]) == 0
    assert _tree(tmp_path) == before and not runs.exists()
    demo = RECIPES["demo"]
    steps, epochs = 60000 // demo["data"]["batch_size"], demo["train"]["epochs"]
    teacher, student = _names(overrides)
    (t_head, t_settings, t_note), (s_head, s_settings) = _entries(capsys.readouterr().out)
    assert t_head == f"1. teacher run {teacher}: pending; trains first, from epoch 1"
    assert t_settings.strip() == f"fashion-mnist, 60000 images, 32 px, batch 128, recipe demo: {epochs} epochs x " \
                                 f"{steps} steps/epoch"
    assert t_note.strip() == (f"teacher run {teacher}: 60000 images x {epochs} epochs (its own settings; the "
                              "student: 256 images x 1 epoch; set teacher.data.train_subset=256 teacher.train.epochs=1 "
                              "to match)")
    assert s_head == f"2. student run {student}: pending; trains from epoch 1"
    assert s_settings.strip() == ("fashion-mnist, 256 of 60000 images (data.train_subset=256), 32 px, batch 128, "
                                  "recipe demo: 1 epoch x 2 steps/epoch")


def test_after_training_both_are_done_and_the_settings_line_is_in_the_run_log(fmnist_available, tmp_path, capsys):
    runs = tmp_path / "runs"
    overrides = [*TINY_TEACHER, *TINY, "data.train_subset=32"]  # the teacher run trains on 64 images
    teacher, student = _names(overrides)
    note = (f"teacher run {teacher}: 64 images (its own settings; the student: 32 images; set "
            "teacher.data.train_subset=32 to match)")
    assert main(["train", *STUDENT, "--runs-dir", runs, *overrides]) == 0
    out = capsys.readouterr().out
    assert note in out.splitlines()
    assert note in RunDir(runs / student).log_file.read_text().splitlines()
    trained_steps = dict(re.findall(r"^(\S+): \S+ \S+ -> resnet_mini on fashion-mnist, 1 epochs, (\d+) steps/epoch",
                                    out, re.M))

    before = _tree(tmp_path)
    assert main(["train", *STUDENT, "--runs-dir", runs, *overrides, "--dry-run"]) == 0
    assert _tree(tmp_path) == before
    out = capsys.readouterr().out
    (t_head, t_settings, t_note), (s_head, s_settings) = _entries(out)
    assert t_head.startswith(f"1. teacher run {teacher}: done;") and t_note.strip() == note
    assert s_head == f"2. student run {student}: done; skipped"
    assert out.splitlines()[-1] == "would train: nothing"
    # the steps of the plan are those the runs trained
    assert t_settings.endswith(f"1 epoch x {trained_steps[teacher]} steps/epoch")
    assert s_settings.endswith(f"1 epoch x {trained_steps[student]} step/epoch") and trained_steps[student] == "1"


def test_a_cut_off_run_resumes_at_its_checkpoint(fmnist_available, tmp_path, capsys):
    from hkdbench.benchmark.engine.trainer import train

    runs = tmp_path / "runs"
    teacher_overrides = [o[len("teacher."):] for o in TINY_TEACHER]
    cfg = resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo", overrides=teacher_overrides)
    assert train(cfg, runs_dir=str(runs), progress=False, should_stop=lambda: True).status == "interrupted"
    before = _tree(tmp_path)
    teacher = ["teacher", "--model", "resnet_mini", "--recipe", "demo", "--runs-dir", runs, *teacher_overrides,
               "--dry-run"]
    # as the run itself: without --resume the command stops, saying so
    assert main(teacher) == 2
    out, err = capsys.readouterr()
    assert _entries(out)[0][0] == (f"1. teacher run {cfg.run_name()}: partial; resumes at epoch 1, step 1 with "
                                   "--resume; --restart starts it over")
    assert "has a checkpoint from an earlier, unfinished run; pass --resume" in err
    assert main([*teacher, "--resume"]) == 0
    resumes = f"1. teacher run {cfg.run_name()}: partial; resumes at epoch 1, step 1"
    assert _entries(capsys.readouterr().out)[0][0] == resumes
    assert main([*teacher, "--restart"]) == 0
    assert "--restart: trains it again from epoch 1" in _entries(capsys.readouterr().out)[0][0]
    # a student's teacher run is resumed whatever the flags
    assert main(["train", *STUDENT, "--runs-dir", runs, *TINY_TEACHER, *TINY, "data.train_subset=64",
                 "--dry-run"]) == 0
    (t_head, _), (s_head, _) = _entries(capsys.readouterr().out)
    assert t_head == resumes
    assert s_head.endswith(": pending; trains from epoch 1")
    assert _tree(tmp_path) == before


def test_a_cohort_lists_its_teacher_run_then_every_member(fmnist_available, tmp_path, capsys):
    overrides = ["data.train_subset=256", "train.epochs=1", "train.probe_every=1"]
    assert main(["train", *STUDENT, "--method", "none,kd,fitnet", "--runs-dir", tmp_path / "runs", *overrides,
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    entries = _entries(out)
    teacher, _ = _names(overrides)
    # the student alone's name differs from its name alone: it is probed against the cohort's teacher run
    assert [e[0].split(":")[0] for e in entries] == [
        f"1. teacher run {teacher}", entries[1][0].split(":")[0],
        *(f"{i}. student run {_names(overrides, m)[1]}" for i, m in ((3, "kd"), (4, "fitnet")))]
    assert entries[1][0].startswith("2. student run student_resnet_mini_fashion-mnist_s0_")
    assert f"   CKA-probed against {teacher}" in entries[1]  # the student alone, against the cohort's teacher run
    assert out.splitlines()[-1] == "would train: 1 teacher run, then 3 student runs in one cohort"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "ofakd"],
    ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "optim.lrr=3"],
    ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--dataset", "cifar100", "--data-root", "/none"],
    ["teacher", "--model", "resnet_mini", "--resume", "--restart"],
    ["train", "--student", "resnet_mini", "--method", "none", "train.probe_every=1",
     "train.probe_teachers=[teacher_x]"],
])
def test_bad_input_fails_as_without_dry_run(argv, tmp_path, capsys):
    runs = str(tmp_path / "runs")
    assert main([*argv, "--runs-dir", runs]) == 2
    error = capsys.readouterr().err
    assert main([*argv, "--runs-dir", runs, "--dry-run"]) == 2
    assert capsys.readouterr().err == error and error
    assert not (tmp_path / "runs").exists()


def test_the_settings_line_names_only_what_differs(fmnist_available):
    from hkdbench.benchmark.engine.plan import teacher_settings_note
    from hkdbench.benchmark.recipes.resolve import teacher_run_config

    def note(*overrides):
        cfg = resolve_run_config(kind="student", student="resnet_mini", teacher="resnet_mini", method="kd",
                                 recipe="demo", overrides=[o for o in overrides if not o.startswith("teacher.")],
                                 teacher_overrides=[o[8:] for o in overrides if o.startswith("teacher.")])
        return teacher_settings_note(cfg, teacher_run_config(cfg))

    epochs = RECIPES["demo"]["train"]["epochs"]
    assert note() is None
    assert note("data.train_subset=60000") is None  # the whole set, spelled as a subset
    assert note("data.batch_size=64").endswith(": batch 128 (its own settings; the student: batch 64; set "
                                               "teacher.data.batch_size=64 to match)")
    assert note("train.epochs=1", "teacher.data.train_subset=500").endswith(
        f": 500 images x {epochs} epochs (its own settings; the student: 60000 images x 1 epoch; set "
        "teacher.data.train_subset=0 teacher.train.epochs=1 to match)")
