"""Sweep processes: jobs for runs a racing sweep owns take no worker slot; a stopped local sweep leaves no
live workers behind."""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.sweep.plan import expand
from hkdbench.benchmark.sweep.preset import load_preset

from test_sweep import TINY, tiny_preset


def _students(preset):
    return expand(load_preset(preset)).students


@contextlib.contextmanager
def held_locks(store, specs):
    """Holds the runs' flocks as a racing sweep's live workers would."""
    with contextlib.ExitStack() as stack:
        for spec in specs:
            stack.enter_context(store.run_dir(spec.cfg).lock())
        yield


def test_a_job_whose_run_is_owned_exits_at_once_without_writing(tmp_path, capsys):
    from hkdbench.benchmark.sweep.job import OWNED, RunJob

    (spec,) = _students(tiny_preset(tmp_path, methods=["none"]))
    store = RunStore(tmp_path / "runs")
    rd = store.run_dir(spec.cfg)
    with held_locks(store, [spec]):
        start = time.monotonic()
        outcome = RunJob(spec.cfg.to_dict(), str(store.root), "cpu")()
        elapsed = time.monotonic() - start
    assert outcome == {"status": OWNED, "run": spec.name}
    assert elapsed < 10  # it does not wait for the owner to finish
    assert "is owned by another process" in capsys.readouterr().err
    assert sorted(p.name for p in rd.path.iterdir()) == ["lock"]  # no FAILED, config, log or checkpoint


@pytest.mark.usefixtures("fmnist_available")
def test_runs_claimed_after_planning_are_skipped_at_submission(tmp_path, monkeypatch):
    """A racing sweep's workers take the runs' locks between this sweep's planning and its submissions."""
    from hkdbench.benchmark.sweep.dispatch import Sweep

    preset = tiny_preset(tmp_path, methods=["none"], seeds=[0, 1])
    plan = expand(load_preset(preset))
    store = RunStore(tmp_path / "runs")
    out = io.StringIO()
    sweep = Sweep(plan, str(store.root), "cpu", out=out)
    planned = sweep.decide
    with contextlib.ExitStack() as racing:
        def decide_then_race(*args, **kwargs):
            decision = planned(*args, **kwargs)
            racing.enter_context(held_locks(store, plan.students))
            return decision

        monkeypatch.setattr(sweep, "decide", decide_then_race)
        result = sweep.run("local", parallel=1)
    text = out.getvalue()
    assert result.submitted == [] and result.failed == 0, text
    for spec in plan.students:
        assert f"skipped student run {spec.name}: owned by another process" in text
    assert not any((store.root / "_submitit").iterdir())  # no worker was started
    assert not any((store.run_dir(s.cfg).path / "jobs.jsonl").exists() for s in plan.students)


def _sweep_command(preset, runs, *extra):
    return [sys.executable, "-m", "hkdbench.benchmark.cli.main", "sweep", preset, "--executor", "local",
            "--runs-dir", str(runs), *extra]


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
def test_two_racing_identical_sweeps_train_every_run_once(tmp_path):
    preset, runs = tiny_preset(tmp_path, methods=["none"], seeds=[0, 1]), tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweeps = [subprocess.Popen(_sweep_command(preset, runs, "--parallel", "2"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], "\n".join(outputs)
    for spec in _students(preset):
        rd = RunStore(runs).run_dir(spec.cfg)
        assert rd.is_done and not rd.failed_file.exists()
        assert len(rd.metrics()) == spec.cfg.train.epochs  # nothing duplicated
        assert rd.log_file.read_text().count("steps/epoch") == 1  # trained by exactly one job


def _processes_mentioning(text):
    """Live processes whose command line names ``text`` (the test's run store)."""
    found = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            with contextlib.suppress(OSError):
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read().decode(errors="replace")
                state = open(f"/proc/{proc}/stat").read().rsplit(")", 1)[1].split()[0]
                if text in cmdline and state != "Z":
                    found.append((int(proc), cmdline.replace("\0", " ")))
    return found


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_local_sweep_stops_its_workers_and_resumes_to_the_same_result(tmp_path, sig):
    import torch

    from hkdbench.benchmark.engine.trainer import train

    preset = tiny_preset(tmp_path, methods=["none"], overrides={"data": {**TINY, "train_subset": 2048},
                                                                 "train": {"epochs": 2}})
    (spec,) = _students(preset)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(_sweep_command(preset, runs, "--parallel", "1"), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log = runs / spec.name / "log.txt"
    deadline = time.time() + 300
    while not (log.exists() and "steps/epoch" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)  # polls for the chosen point: the worker is training
    assert sweep.poll() is None, sweep.communicate()[0]
    sweep.send_signal(sig)
    out = sweep.communicate(timeout=180)[0]
    assert sweep.returncode == 128 + sig, out
    assert f"{sig.name}: stopping 1 running job(s)" in out and f"stopped: {spec.name}" in out, out
    assert _processes_mentioning(str(runs)) == []  # no worker left training
    rd = RunStore(runs).run_dir(spec.cfg)
    assert rd.has_checkpoint and not rd.is_done and "stop requested; checkpoint saved" in log.read_text()

    again = subprocess.run(_sweep_command(preset, runs), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming at epoch" in log.read_text()
    reference = train(spec.cfg, runs_dir=str(tmp_path / "reference"), progress=False)
    ours = torch.load(rd.path / "final.pt", weights_only=True)
    theirs = torch.load(reference.run_dir.path / "final.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert len(rd.metrics()) == spec.cfg.train.epochs


def test_status_asks_each_jobs_executor_and_cancel_stops_the_running_ones(tmp_path):
    """A job record goes back to the executor that wrote it (registry: one class per executor): a live local job
    is running, and ``cancel`` sends it SIGTERM (its worker would save a checkpoint and exit)."""
    from hkdbench.benchmark.core.store import append_jsonl
    from hkdbench.benchmark.sweep.executors import EXECUTORS
    from hkdbench.benchmark.sweep.status import cancel, run_states

    assert {name: cls.name for name, cls in EXECUTORS.items()} == {"inline": "inline", "local": "local",
                                                                   "slurm": "slurm"}
    (spec,) = _students(tiny_preset(tmp_path, methods=["none"]))
    store = RunStore(tmp_path / "runs")
    rd = store.run_dir(spec.cfg)
    rd.claim(spec.cfg)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        append_jsonl(rd.jobs_file, {"job_id": str(worker.pid), "executor": "local", "folder": str(tmp_path)})
        (state,) = run_states([spec], store)
        assert (state.status, state.job_id) == ("running", str(worker.pid)), state
        assert cancel([state], store) == [str(worker.pid)]
        assert worker.wait(timeout=30) == -signal.SIGTERM
    finally:
        worker.kill()
    (state,) = run_states([spec], store)
    assert (state.status, state.reason) == ("cancelled", f"local job {worker.pid} CANCELLED (the process is gone)")


def test_hkdbench_cancel_stops_a_presets_running_job_and_says_which(tmp_path, capsys):
    """``hkdbench cancel`` finds the running job through the run's job record and stops it through its executor;
    with nothing queued or running it says so and stops nothing."""
    from hkdbench.benchmark.cli.main import main
    from hkdbench.benchmark.core.store import append_jsonl

    preset = tiny_preset(tmp_path, methods=["none"])
    (spec,) = _students(preset)
    store = RunStore(tmp_path / "runs")
    argv = ["cancel", str(preset), "--runs-dir", str(store.root)]
    assert main(argv) == 0
    assert "no queued or running job to cancel" in capsys.readouterr().out
    rd = store.run_dir(spec.cfg)
    rd.claim(spec.cfg)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        append_jsonl(rd.jobs_file, {"job_id": str(worker.pid), "executor": "local", "folder": str(tmp_path)})
        assert main(argv) == 0
        assert f"cancelled 1 job(s): {worker.pid}" in capsys.readouterr().out
        assert worker.wait(timeout=30) == -signal.SIGTERM
    finally:
        worker.kill()
