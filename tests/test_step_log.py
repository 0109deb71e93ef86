"""Issue 23, item 5: per-step records (steps.jsonl) and tracker scalars every train.log_interval steps, beside the
per-epoch ones; read back with TensorBoard's own event reader."""
import math
import statistics
import time

import pytest
import torch

from hkdbench.benchmark.core.store import RunDir
from hkdbench.benchmark.engine.step_log import StepLog
from hkdbench.benchmark.engine.trainer import train, train_cohort
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config

TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.img_size=16"]  # 4 steps/epoch
TINY_TEACHER = ["train.epochs=1", "data.train_subset=256", "data.eval_subset=128", "data.batch_size=64"]
TIMING = "images_per_s"


def cfg_of(method="kd", epochs=2, extra=()):
    return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=method,
                              recipe="demo", overrides=TINY + [f"train.epochs={epochs}", *extra],
                              teacher_overrides=TINY_TEACHER)


def without_timing(records):
    return [{k: v for k, v in r.items() if k != TIMING} for r in records]


def events(run_dir: RunDir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir.tracking_dir / "tensorboard"))
    accumulator.Reload()
    return accumulator


def assert_events_hold(run_dir: RunDir):
    """Every per-step value of steps.jsonl is a ``step/`` scalar at its step, and every epoch value of metrics.jsonl
    a scalar at its epoch; nothing else, nothing twice."""
    tb = events(run_dir)
    steps, epochs = run_dir.steps(), run_dir.metrics()
    assert steps and epochs
    for key in [k for k in steps[0] if k not in ("step", "epoch")]:
        got = [(s.step, s.value) for s in tb.Scalars(f"step/{key}")]
        assert [step for step, _ in got] == [r["step"] for r in steps], key
        assert [value for _, value in got] == pytest.approx([r[key] for r in steps], rel=1e-6), key
    for key in ("loss/kd", "lr", "train_loss", "top1"):
        got = [(s.step, s.value) for s in tb.Scalars(key)]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in epochs], key


def epoch_means(steps, key):
    by_epoch = {}
    for r in steps:
        by_epoch.setdefault(r["epoch"], []).append(r[key])
    return [statistics.fmean(v) for _, v in sorted(by_epoch.items())]


# -- the log itself ---------------------------------------------------------------------------------------------------

class Tracker:
    def __init__(self):
        self.steps = []

    def log_step(self, record):
        self.steps.append(record)


def test_records_every_interval_and_at_each_epochs_last_step(tmp_path):
    tracker, run_dir = Tracker(), RunDir(tmp_path)
    log = StepLog(run_dir, tracker, interval=2, steps_per_epoch=5)
    for epoch in range(2):
        for step in range(5):
            values = {"loss/ce": 1.0 + step, "loss/kd": 0.5, "stat/tau": 4.0, "lr": 0.1 * (step + 1), "correct": 3}
            log.add(values, epoch, step, images=8, seconds=0.5)
    # steps 2, 4 and the last (5) of each epoch, at the optimiser steps done
    assert [r["step"] for r in tracker.steps] == [2, 4, 5, 7, 9, 10]
    assert [r["epoch"] for r in tracker.steps] == [1, 1, 1, 2, 2, 2]
    first, last_of_epoch = tracker.steps[0], tracker.steps[2]
    assert first == {"step": 2, "epoch": 1, "loss/ce": 2.0, "loss/kd": 0.5, "stat/tau": 4.0, "train_loss": 2.5,
                     "lr": pytest.approx(0.2), "images_per_s": 16.0}  # 2 steps of 8 images in 1 s
    assert last_of_epoch["images_per_s"] == 16.0 and last_of_epoch["loss/ce"] == 5.0  # 1 step since step 4
    assert run_dir.steps() == tracker.steps  # the file holds what the tracker got


def test_interval_zero_records_nothing_and_a_process_without_the_run_dir_writes_no_file(tmp_path):
    tracker = Tracker()
    StepLog(RunDir(tmp_path), tracker, interval=0, steps_per_epoch=3).add({"loss/ce": 1.0, "lr": 0.1}, 0, 2, 8, 1.0)
    assert tracker.steps == [] and not RunDir(tmp_path).steps_file.exists()
    StepLog(None, tracker, interval=1, steps_per_epoch=3).add({"loss/ce": 1.0, "lr": 0.1}, 0, 0, 8, 1.0)
    assert len(tracker.steps) == 1 and not RunDir(tmp_path).steps_file.exists()


def test_a_resume_keeps_the_records_through_its_checkpoints_step_and_drops_a_torn_line(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.append_steps([{"step": s, "epoch": 1, "loss/ce": float(s)} for s in (2, 4, 6)])
    with open(run_dir.steps_file, "ab") as f:
        f.write(b'{"step": 8, "epo')  # a kill mid-write
    with pytest.warns(UserWarning, match=r"steps\.jsonl: line 4 is not valid JSON"):
        assert [r["step"] for r in run_dir.steps()] == [2, 4, 6]
    run_dir.keep_steps_through(4)
    assert [r["step"] for r in run_dir.steps()] == [2, 4]
    run_dir.append_steps([{"step": 6, "epoch": 1, "loss/ce": 6.5}])  # whole lines again after the repair
    assert run_dir.steps()[-1] == {"step": 6, "epoch": 1, "loss/ce": 6.5}
    run_dir.keep_steps_through(0)  # a run started afresh: nothing kept, no file
    assert not run_dir.steps_file.exists()


def test_log_interval_is_not_part_of_the_runs_identity():
    assert cfg_of(extra=["train.log_interval=1"]).run_hash() == cfg_of(extra=["train.log_interval=0"]).run_hash()


# -- runs -------------------------------------------------------------------------------------------------------------

def test_tensorboard_holds_the_per_step_records_and_the_epoch_records(fmnist_available, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = cfg_of(extra=["train.log=tensorboard", "train.log_interval=1"])
    run_dir = train(cfg, runs_dir=str(tmp_path), progress=False, echo=False).run_dir
    steps = run_dir.steps()
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"loss/ce", "loss/kd", "train_loss", "lr", "images_per_s"} <= steps[0].keys()
    assert all(r["images_per_s"] > 0 and math.isfinite(r["images_per_s"]) for r in steps)
    assert_events_hold(run_dir)
    # every step recorded: their mean per epoch is the epoch's record
    for key in ("loss/ce", "loss/kd"):
        assert epoch_means(steps, key) == pytest.approx([r[key] for r in run_dir.metrics()], rel=1e-9)
    from hkdbench import api

    table = api.load_steps(tmp_path)  # the teacher run's records too (trained first, same log settings)
    mine = table[table["run"] == run_dir.path.name]
    assert list(mine["step"]) == list(range(1, 9)) and set(table["kind"]) == {"student", "teacher"}
    assert list(mine["train_loss"]) == pytest.approx([r["train_loss"] for r in steps], rel=1e-12)


def test_a_run_stopped_mid_epoch_and_killed_past_its_checkpoint_resumes_each_step_once(fmnist_available, tmp_path):
    pytest.importorskip("tensorboard")
    extra = ["train.log=tensorboard", "train.log_interval=3"]
    reference = train(cfg_of(extra=extra), runs_dir=str(tmp_path / "a"), progress=False, echo=False).run_dir
    cfg = cfg_of(extra=extra)
    train(teacher_run_config(cfg), runs_dir=str(tmp_path / "b"), progress=False, echo=False)
    count = {"n": 0}

    def stop_after_six():
        count["n"] += 1
        return count["n"] == 6  # after epoch 2's second step: the records of steps 3 and 4 (epoch 1's last) written

    first = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, echo=False, should_stop=stop_after_six)
    assert first.status == "interrupted"
    run_dir = first.run_dir
    assert torch.load(run_dir.checkpoint_file, weights_only=False)["step"] == 2
    assert [r["step"] for r in run_dir.steps()] == [3, 4]
    # a later attempt killed past the checkpoint: a record of step 7 and a torn line, its events too
    run_dir.append_steps([{"step": 7, "epoch": 2, "loss/ce": 99.0, "lr": 0.0, "train_loss": 99.0}])
    with open(run_dir.steps_file, "ab") as f:
        f.write(b'{"step": 8')
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir.tracking_dir / "tensorboard")) as killed:
        killed.add_scalar("step/loss/ce", 99.0, 7)
    time.sleep(1.1)  # the resumed attempt's event file is named by a later second, so read after this one
    assert train(cfg, runs_dir=str(tmp_path / "b"), progress=False, echo=False, resume=True).status == "done"
    assert without_timing(run_dir.steps()) == without_timing(reference.steps())
    assert [r["step"] for r in run_dir.steps()] == [3, 4, 7, 8]
    assert_events_hold(run_dir)


def test_a_run_killed_before_its_first_checkpoint_starts_its_records_afresh(fmnist_available, tmp_path):
    pytest.importorskip("tensorboard")
    cfg = cfg_of(epochs=1, extra=["train.log=tensorboard", "train.log_interval=1"])
    train(teacher_run_config(cfg), runs_dir=str(tmp_path), progress=False, echo=False)
    count = {"n": 0}

    def stop_after_two():
        count["n"] += 1
        return count["n"] == 2

    run_dir = train(cfg, runs_dir=str(tmp_path), progress=False, echo=False, should_stop=stop_after_two).run_dir
    assert [r["step"] for r in run_dir.steps()] == [1, 2]
    run_dir.checkpoint_file.unlink()  # as if killed at step 2, before any checkpoint
    time.sleep(1.1)  # the next attempt's event file is named by a later second, so read after this one
    assert train(cfg, runs_dir=str(tmp_path), progress=False, echo=False, resume=True).status == "done"
    assert [r["step"] for r in run_dir.steps()] == [1, 2, 3, 4]
    assert_events_hold(run_dir)  # the first attempt's scalars at steps 1 and 2 are gone


def test_each_cohort_member_logs_its_own_steps_as_it_would_alone(fmnist_available, tmp_path):
    pytest.importorskip("tensorboard")
    cfgs = [cfg_of(method, extra=["train.log=tensorboard", "train.log_interval=2"]) for method in ("kd", "fitnet")]
    alone = [train(cfg, runs_dir=str(tmp_path / "alone"), progress=False, echo=False).run_dir for cfg in cfgs]
    together = [r.run_dir for r in train_cohort(cfgs, runs_dir=str(tmp_path / "cohort"), progress=False, echo=False)]
    for a, b in zip(alone, together):
        assert without_timing(a.steps()) == without_timing(b.steps())
        assert [r["step"] for r in b.steps()] == [2, 4, 6, 8]
        assert_events_hold(b)
    assert together[0].steps()[0].keys() != together[1].steps()[0].keys()  # kd's terms, fitnet's


def test_emulated_ranks_log_the_mean_of_their_ranks_at_each_step(fmnist_available, tmp_path):
    cfg = cfg_of(extra=["train.world=2", "train.log_interval=1"])
    run_dir = train(cfg, runs_dir=str(tmp_path), progress=False, echo=False).run_dir
    steps = run_dir.steps()
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and steps[-1]["epoch"] == 2
    for key in ("loss/ce", "loss/kd"):
        assert epoch_means(steps, key) == pytest.approx([r[key] for r in run_dir.metrics()], rel=1e-9), key


def test_recording_every_step_adds_no_host_read(fmnist_available, tmp_path):
    """The whole training of a run, once without records and once with one at every step and TensorBoard: the same
    host reads (counted by patching torch, as tests/test_host_sync.py does), so a record reads nothing new."""
    pytest.importorskip("tensorboard")
    from collections import Counter

    from hkdbench.benchmark.tools.host_sync import count_host_syncs

    def reads(folder, extra):
        cfg = cfg_of(epochs=1, extra=extra)
        train(teacher_run_config(cfg), runs_dir=str(tmp_path / folder), progress=False, echo=False)
        result, counted = count_host_syncs(lambda: train(cfg, runs_dir=str(tmp_path / folder), progress=False,
                                                         echo=False), "cpu")
        assert result.status == "done"
        return Counter(counted)

    quiet = reads("quiet", ["train.log_interval=0"])
    watched = reads("watched", ["train.log_interval=1", "train.log=tensorboard"])
    assert sum(quiet.values()) > 0 and watched == quiet
    assert len(RunDir(next((tmp_path / "watched").glob("kd_*"))).steps()) == 4


def test_collect_skips_a_torn_step_line_naming_the_file_and_keeps_the_others(tmp_path):
    from hkdbench.analysis.collect import collect_steps

    from test_analysis import write_run

    run = write_run(tmp_path, "kd", "resnet_mini", "vit_mini", 0, 80.0, epochs=2)  # 4 records, steps 1..4
    with open(run / "steps.jsonl", "a") as f:
        f.write('{"step": 5, "epo\n')
    with pytest.warns(UserWarning, match=r"steps\.jsonl: line 5 is not valid JSON"):
        table = collect_steps(tmp_path)
    assert list(table["step"]) == [1, 2, 3, 4] and set(table["run"]) == {run.name}
