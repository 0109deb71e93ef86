"""Cohorts: runs of one data stream trained in one process write, file by file, what each writes alone."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.data.stream import DataStream
from hkdbench.benchmark.engine.cohort import check_cohort, group_cohorts
from hkdbench.benchmark.engine.trainer import DivergedError, train, train_cohort
from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.core.store import RunStore
from hkdbench.methods import list_methods

# randomness in every place: mixup/cutmix and erasing in the stream, drop-path in the student
TINY = ["data.train_subset=192", "data.eval_subset=64", "data.batch_size=64", "data.img_size=16", "data.mixup=0.8",
        "data.cutmix=1.0", "data.reprob=0.25", "train.drop_path=0.1"]
TINY_TEACHER = ["train.epochs=1", "data.train_subset=192", "data.eval_subset=64", "data.batch_size=64"]
# what differs between two trainings of one run: how long it took, and how many runs trained with it
TIMING = {"epoch_time_s", "images_per_s", "train_time_s", "finished", "cohort_size"}


def cfg_of(method, epochs=2, extra=(), student="vit_mini", teacher="resnet_mini"):
    return resolve_run_config(kind="student", student=student, teacher=teacher, method=method, recipe="demo",
                              overrides=TINY + [f"train.epochs={epochs}", *extra], teacher_overrides=TINY_TEACHER)


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def assert_same_run(a, b):
    """Two run directories hold the same training: metrics, summary and every kept weights file."""
    assert a.path.name == b.path.name
    assert [without_timing(r) for r in a.metrics()] == [without_timing(r) for r in b.metrics()]
    assert without_timing(a.summary()) == without_timing(b.summary())
    for name in ("best.pt", "final.pt"):
        wa, wb = torch.load(a.path / name), torch.load(b.path / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_every_method_trained_in_a_cohort_equals_it_trained_alone(fmnist_available, tmp_path):
    methods = list(list_methods())
    cfgs = [cfg_of(m) for m in methods]
    check_cohort(cfgs)
    alone_dir, cohort_dir = tmp_path / "alone", tmp_path / "cohort"
    alone = [train(cfg, runs_dir=str(alone_dir), progress=False, echo=False) for cfg in cfgs]
    together = train_cohort(cfgs, runs_dir=str(cohort_dir), progress=False, echo=False)
    assert [r.status for r in together] == ["done"] * len(methods)
    for a, b in zip(alone, together):
        assert_same_run(a.run_dir, b.run_dir)
    log = together[1].run_dir.log_file.read_text()
    assert f"cohort of {len(methods)} runs on one data stream and one resnet_mini pass per step" in log


def test_the_stream_is_keyed_by_seed_epoch_and_step_not_by_what_else_draws(fmnist_available):
    cfg = cfg_of("kd")
    device = torch.device("cpu")
    train_loader, _, info = loaders.build_loaders(cfg.data, device, 0.875)
    mixup = loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
    stream = DataStream([train_loader], seed=3, device=device, mixup=mixup)
    plain = [b.images for _, (b,) in stream.batches(epoch=1)]
    drawn = []
    for _, (batch,) in stream.batches(epoch=1):  # a model drawing between the steps changes nothing
        drawn.append(batch.images)
        torch.rand(1000), torch.randn(7)
    assert all(torch.equal(a, b) for a, b in zip(plain, drawn))
    resumed = [b.images for _, (b,) in stream.batches(epoch=1, start_step=2)]
    assert all(torch.equal(a, b) for a, b in zip(plain[2:], resumed))
    other_epoch = [b.images for _, (b,) in stream.batches(epoch=2)]
    assert not torch.equal(plain[0], other_epoch[0])
    # and the stream leaves the global RNGs as it found them
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    next(stream.batches(epoch=0))
    assert torch.equal(torch.rand(3), expected)


def test_drawing_ahead_changes_no_batch_and_no_models_randomness(fmnist_available):
    """The trainer's Lookahead: the batches of batches(), in order, with the next one drawn early (at most one
    ahead) between a model's draws, which go on as if nothing had been drawn."""
    cfg = cfg_of("kd")
    device = torch.device("cpu")
    train_loader, _, info = loaders.build_loaders(cfg.data, device, 0.875)
    stream = DataStream([train_loader], seed=3, device=device,
                        mixup=loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing))
    plain = [(step, b.images, b.targets.soft) for step, (b,) in stream.batches(epoch=1, start_step=1)]
    torch.manual_seed(9)
    expected_model_draws = [torch.rand(4) for _ in range(2 * len(plain))]
    torch.manual_seed(9)
    ahead, seen, model_draws = stream.lookahead(epoch=1, start_step=1), [], []
    for step, (batch,) in ahead:
        model_draws.append(torch.rand(4))  # a dropout mask before the step's read
        ahead.draw_next()
        ahead.draw_next()  # a second call draws nothing more
        model_draws.append(torch.rand(4))
        seen.append((step, batch.images, batch.targets.soft))
    assert [s[0] for s in seen] == [p[0] for p in plain] == list(range(1, len(stream)))
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(seen, plain))
    assert all(torch.equal(a, b) for a, b in zip(model_draws, expected_model_draws))
    assert ahead.take_draw_seconds() > 0 and ahead.take_draw_seconds() == 0.0


def test_a_stopped_cohort_resumes_bit_for_bit(fmnist_available, tmp_path):
    cfgs = [cfg_of(m) for m in ("none", "kd", "fitnet")]
    whole = train_cohort(cfgs, runs_dir=str(tmp_path / "whole"), progress=False, echo=False)
    calls = []

    def stop_from_the_5th_step():  # read once per step: 3 of the teacher's run, then epoch 1's step 0 and 1
        calls.append(1)
        return len(calls) >= 5

    runs = str(tmp_path / "cut")
    cut = train_cohort(cfgs, runs_dir=runs, progress=False, echo=False, should_stop=stop_from_the_5th_step)
    assert [r.status for r in cut] == ["interrupted"] * 3
    saved = [torch.load(r.run_dir.checkpoint_file, weights_only=False) for r in cut]
    assert {(s["epoch"], s["step"]) for s in saved} == {(0, 2)}  # every member at the same step, mid-epoch
    resumed = train_cohort(cfgs, runs_dir=runs, resume=True, progress=False, echo=False)
    assert [r.status for r in resumed] == ["done"] * 3
    for a, b in zip(whole, resumed):
        assert_same_run(a.run_dir, b.run_dir)


def test_a_diverging_member_fails_alone_and_the_others_go_on(fmnist_available, tmp_path):
    cfgs = [cfg_of("kd"), cfg_of("fitnet", extra=["optim.lr=1e30"]), cfg_of("none")]
    results = train_cohort(cfgs, runs_dir=str(tmp_path / "c"), progress=False, echo=False)
    assert [r.status for r in results] == ["done", "failed", "done"]
    failed = json.loads(results[1].run_dir.failed_file.read_text())
    assert failed["epoch"] == 1 and isinstance(failed["step"], int) and "non-finite loss" in failed["reason"]
    with pytest.raises(DivergedError):
        train(cfgs[1], runs_dir=str(tmp_path / "a"), progress=False, echo=False)
    alone = train(cfgs[0], runs_dir=str(tmp_path / "a"), progress=False, echo=False)
    assert_same_run(alone.run_dir, results[0].run_dir)


def test_done_members_are_skipped_and_the_rest_train(fmnist_available, tmp_path):
    runs = str(tmp_path / "runs")
    cfgs = [cfg_of(m, epochs=1) for m in ("kd", "none")]
    first = train(cfgs[0], runs_dir=runs, progress=False, echo=False)
    stamp = first.run_dir.summary_file.stat().st_mtime_ns
    results = train_cohort(cfgs, runs_dir=runs, progress=False, echo=False)
    assert [r.status for r in results] == ["done", "done"]
    assert first.run_dir.summary_file.stat().st_mtime_ns == stamp
    alone = train(cfgs[1], runs_dir=str(tmp_path / "alone"), progress=False, echo=False)
    assert_same_run(alone.run_dir, results[1].run_dir)


def test_runs_of_different_streams_or_teachers_are_not_one_cohort():
    kd, other_seed = cfg_of("kd"), cfg_of("kd", extra=["train.seed=1"])
    other_teacher = cfg_of("kd", teacher="mixer_mini")
    with pytest.raises(ValueError, match="cannot share one data stream"):
        check_cohort([kd, other_seed])
    with pytest.raises(ValueError, match="cannot share one data stream"):
        check_cohort([kd, other_teacher])
    groups = group_cohorts([kd, other_seed, cfg_of("none"), other_teacher, cfg_of("fitnet")])
    names = [[c.method for c in g] for g in groups]
    assert names == [["kd", "none", "fitnet"], ["kd"], ["kd"]]


def test_cli_trains_several_methods_as_a_cohort_and_survives_kill_9(fmnist_available, tmp_path):
    """`hkdbench train --method a,b`: killed -9 mid-epoch, resumed with --resume, each run ends as an
    uninterrupted cohort's."""
    overrides = [*TINY, "data.train_subset=640", "train.epochs=2", *[f"teacher.{o}" for o in TINY_TEACHER]]
    cmd = [sys.executable, "-m", "hkdbench.benchmark.cli.main", "train", "--teacher", "resnet_mini", "--student",
           "vit_mini", "--method", "kd,none", "--recipe", "demo", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = str(tmp_path / "whole")
    subprocess.run(cmd + ["--runs-dir", whole], check=True, env=env, capture_output=True)
    runs = str(tmp_path / "killed")
    proc = subprocess.Popen(cmd + ["--runs-dir", runs], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = RunStore(runs)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill it after the first epoch's checkpoints, during the second
        students = [r for r in store.runs() if r.config().kind == "student" and r.has_checkpoint]
        if len(students) == 2 and all(len(r.metrics()) == 1 for r in students):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not any(r.is_done for r in store.runs() if r.config().kind == "student")
    subprocess.run(cmd + ["--runs-dir", runs, "--resume"], check=True, env=env, capture_output=True)
    done = {r.path.name: r for r in RunStore(runs).runs() if r.config().kind == "student"}
    reference = {r.path.name: r for r in RunStore(whole).runs() if r.config().kind == "student"}
    assert done.keys() == reference.keys() and len(done) == 2
    for name in done:
        assert_same_run(reference[name], done[name])


def test_a_cohort_runs_the_plain_teacher_pass_once_per_step(fmnist_available, tmp_path, monkeypatch):
    from hkdbench.benchmark.models.taps import TappedModel
    from hkdbench.benchmark.recipes.resolve import teacher_run_config

    runs = str(tmp_path / "runs")
    cfgs = [cfg_of(m, epochs=1) for m in ("kd", "fitnet", "dkd", "none")]
    train(teacher_run_config(cfgs[0]), runs_dir=runs, progress=False, echo=False)
    calls = []
    forward = TappedModel.forward

    def counted(self, x, stages=()):
        calls.append((self.name, tuple(stages), torch.is_grad_enabled()))
        return forward(self, x, stages)

    monkeypatch.setattr(TappedModel, "forward", counted)
    train_cohort(cfgs, runs_dir=runs, progress=False, echo=False)
    teacher_calls = [c for c in calls if c[0] == "resnet_mini"]
    steps = 192 // 64
    # one pass per step, without gradients, with the stages FitNet asks for (KD and DKD read the logits only)
    assert [(stages, grad) for _, stages, grad in teacher_calls] == [((1, 2, 3, 4), False)] * steps


def test_the_per_image_loader_path_is_keyed_too(fmnist_available, tmp_path):
    """data.in_memory=no (ImageNet's DataLoader with timm's per-image transforms): a cohort equals alone."""
    cfgs = [cfg_of(m, epochs=1, extra=["data.in_memory=no", "data.workers=2"]) for m in ("kd", "none")]
    together = train_cohort(cfgs, runs_dir=str(tmp_path / "c"), progress=False, echo=False)
    for cfg, result in zip(cfgs, together):
        assert_same_run(train(cfg, runs_dir=str(tmp_path / "a"), progress=False, echo=False).run_dir,
                        result.run_dir)
