"""Stops that lose nothing: metrics repaired from the checkpoint, torn lines reported, stray temp files removed."""
import dataclasses
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from hkdbench.benchmark.core.store import RunDir, RunStore
from hkdbench.benchmark.engine.trainer import train

from test_trainer import TINY, TINY_TEACHER, _assert_same_kept_files, _strip_times, tiny_cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    runs = tmp_path_factory.mktemp("finished") / "runs"
    cfg = tiny_cfg(epochs=3)
    # kept: these tests take the finished run back to a kill before DONE, which leaves the checkpoint in place (a
    # finished run removes it unless train.keep_checkpoint; not part of the run's identity)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_checkpoint=True))
    return cfg, runs, train(cfg, runs_dir=str(runs), progress=False).run_dir


def _copy(finished_run, tmp_path):
    cfg, runs, rd = finished_run
    shutil.copytree(runs, tmp_path / "runs")
    return cfg, RunDir(tmp_path / "runs" / rd.path.name), rd


@pytest.mark.slow
def test_kill_before_the_last_metrics_write_resumes_to_complete_metrics(finished_run, tmp_path):
    cfg, rd, original = _copy(finished_run, tmp_path)
    for name in ("DONE", "summary.json", "final.pt"):  # killed after the last checkpoint, before metrics/finish
        (rd.path / name).unlink()
    lines = rd.metrics_file.read_text().splitlines(keepends=True)
    rd.metrics_file.write_text("".join(lines[:2]))
    result = train(cfg, runs_dir=str(rd.path.parent), resume=True, progress=False)
    assert result.status == "done"
    assert rd.metrics_file.read_bytes() == original.metrics_file.read_bytes()
    for name in ("final.pt", "best.pt"):  # the weights agree with the uninterrupted run's
        got, want = torch.load(rd.path / name), torch.load(original.path / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert {k: v for k, v in rd.summary().items() if "time" not in k and k != "finished"} == \
        {k: v for k, v in original.summary().items() if "time" not in k and k != "finished"}


@pytest.mark.slow
def test_a_torn_metrics_line_is_reported_then_repaired_on_resume(finished_run, tmp_path):
    cfg, rd, original = _copy(finished_run, tmp_path)
    text = original.metrics_file.read_text()
    rd.metrics_file.write_text(text[: len(text) - 40])  # the last line cut mid-record
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        assert [m["epoch"] for m in rd.metrics()] == [1, 2]
    (rd.path / "DONE").unlink()
    (rd.path / "summary.json").unlink()
    train(cfg, runs_dir=str(rd.path.parent), resume=True, progress=False)
    assert rd.metrics_file.read_text() == text


def test_stray_temp_files_are_removed_on_the_next_open_under_the_lock(finished_run, tmp_path):
    cfg, rd, _ = _copy(finished_run, tmp_path)
    strays = [".checkpoint.pt.ab12_xyz", ".final.pt.k9k9k9k9", ".DONE.0a1b2c3d", ".metrics.jsonl.zzzzzzzz"]
    for name in strays:
        (rd.path / name).write_bytes(b"partial")
    (rd.path / ".keepme").write_text("not a temp file")
    train(cfg, runs_dir=str(rd.path.parent), progress=False)  # already done: opening it cleans up
    assert not [name for name in strays if (rd.path / name).exists()]
    assert (rd.path / ".keepme").exists() and rd.is_done


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(fmnist_available, tmp_path,
                                                                                   signum):
    """The signal lands once epoch 1's metrics exist (mid-run); the process exits 128+signum saying how to resume."""
    args = ["--teacher", "resnet_mini", "--student", "mixer_mini", "--method", "kd", "--recipe", "demo",
            *TINY, "train.epochs=6", *[f"teacher.{o}" for o in TINY_TEACHER]]
    cli = [sys.executable, "-m", "hkdbench.benchmark.cli.main", "train"]
    reference = subprocess.run([*cli, "--runs-dir", str(tmp_path / "a"), *args], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    runs_b = tmp_path / "b"
    proc = subprocess.Popen([*cli, "--runs-dir", str(runs_b), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(runs_b.glob("kd_*/metrics.jsonl")):
        time.sleep(0.02)  # polling for the file, not a timed guess at when to signal
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and "--resume" in err
    assert "Traceback" not in err
    student_dir = next(r for r in RunStore(str(runs_b)).runs() if r.path.name.startswith("kd_"))
    assert student_dir.has_checkpoint and not student_dir.is_done
    done = subprocess.run([*cli, "--runs-dir", str(runs_b), "--resume", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref_dir = next(r for r in RunStore(str(tmp_path / "a")).runs() if r.path.name.startswith("kd_"))
    _assert_same_kept_files(ref_dir, student_dir)
    assert _strip_times(ref_dir.metrics()) == _strip_times(student_dir.metrics())


def test_collect_warns_about_a_torn_metrics_line_naming_the_file(tmp_path):
    from hkdbench.analysis.collect import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "to')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: line 2 is not valid JSON"):
        assert read_metrics(tmp_path) == [{"epoch": 1}]
