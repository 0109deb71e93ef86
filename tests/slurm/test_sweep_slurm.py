"""Sweeps on the real local Slurm cluster (fixture ``slurm_cluster``), through the ``hkdbench`` command line.

1. a sweep with a teacher is submitted as two job arrays (teachers, then students with ``afterok``); the
   results are read from the run store; submitting the finished sweep again runs nothing;
2. a running job is preempted (``scancel --signal=USR2``, what Slurm sends on preemption or before the time
   limit): it saves a mid-epoch checkpoint, requeues itself, resumes and ends with the same weights and
   metrics as an uninterrupted run; another job of the same array is cancelled and ``hkdbench status``
   reports it with the reason and the log path, and its SIGTERM left a mid-epoch checkpoint; a new submission
   re-runs only the cancelled run;
3. a cohort sweep (``--cohort``) is one array task per cohort, its members sharing the task's job id, the
   students' array depending on the teachers' (``afterok``).

Tiny runs (16 px, a few thousand images at most, 1 CPU thread each).
"""
import contextlib
import io
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.usefixtures("fmnist_available")

TINY = {"train_subset": 256, "eval_subset": 256, "batch_size": 64, "img_size": 16}


def _preset(tmp_path: Path, name: str, **fields) -> str:
    body = {"name": name, "dataset": "fashion-mnist", "recipe": "demo", "slurm": {"time": 60, "signal_delay_s": 30},
            **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def _hkdbench(*args: str) -> str:
    """``hkdbench ARGS`` in this process (the jobs themselves run under Slurm); its standard output."""
    from hkdbench.benchmark.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, f"hkdbench {' '.join(args)} failed ({code}):\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue()


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _run_dirs(runs: Path):
    return {p.name: p for p in runs.iterdir() if (p / "config.json").exists()}


def _active_jobs():
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=20).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def test_sweep_as_job_arrays_then_resubmit_runs_nothing(slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    preset = _preset(tmp_path, "tiny", teachers=["resnet_mini"], students=["vit_mini"], methods=["none", "kd"],
                     seeds=[0], overrides={"data": TINY, "train": {"epochs": 2}},
                     teacher_overrides={"data": TINY, "train": {"epochs": 1}})
    out = _hkdbench("sweep", preset, "--executor", "slurm", "--runs-dir", str(runs), "--wait")
    assert "submitted 1 teacher run(s) as job array" in out
    assert "(dependency afterok:" in out and "submitit logs:" in out
    dirs = _run_dirs(runs)
    assert len(dirs) == 3 and all((d / "DONE").exists() for d in dirs.values())
    kd = next(d for n, d in dirs.items() if n.startswith("kd_"))
    summary = json.loads((kd / "summary.json").read_text())
    assert summary["teacher_top1"] is not None and summary["epochs"] == 2
    # the teacher was trained once, by its own job, before the students started
    teacher_dir = next(d for n, d in dirs.items() if n.startswith("teacher_"))
    (t_job,) = [json.loads(line) for line in (teacher_dir / "jobs.jsonl").read_text().splitlines()]
    assert "training it first" not in (kd / "log.txt").read_text()
    assert (teacher_dir / "log.txt").read_text().count("done; best top-1") == 1
    stamps = {n: (d / "final.pt").stat().st_mtime_ns for n, d in dirs.items()}

    again = _hkdbench("sweep", preset, "--executor", "slurm", "--runs-dir", str(runs))
    assert "0 to run, 3 skipped (3 done)" in again and "submitted" not in again
    assert {n: (d / "final.pt").stat().st_mtime_ns for n, d in _run_dirs(runs).items()} == stamps
    status = _hkdbench("status", preset, "--runs-dir", str(runs))
    assert "3 runs: 3 done" in status and t_job["job_id"] in status


def test_preempted_job_resumes_bit_exact_and_cancelled_job_is_reported(slurm_cluster, tmp_path):
    from hkdbench.benchmark.core.store import RunDir
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset
    from hkdbench.benchmark.engine.trainer import train

    runs = tmp_path / "runs"
    data = {**TINY, "train_subset": 4096}  # 64 steps per epoch: seconds of training, time to interrupt it
    preempt = _preset(tmp_path, "preempt", students=["vit_mini"], teachers=["resnet_mini"], methods=["none"],
                      seeds=[0], overrides={"data": data, "train": {"epochs": 2}})
    cancel = _preset(tmp_path, "cancel", students=["vit_mini"], teachers=["resnet_mini"], methods=["none"],
                     seeds=[0], overrides={"data": data, "train": {"epochs": 50}})  # runs until cancelled
    for preset in (preempt, cancel):
        assert "submitted 1 student run(s)" in _hkdbench("sweep", preset, "--executor", "slurm", "--runs-dir",
                                                         str(runs))
    (p_spec,), (c_spec,) = expand(load_preset(preempt)).students, expand(load_preset(cancel)).students
    p_dir, c_dir = runs / p_spec.name, runs / c_spec.name
    job_of = {d: json.loads((d / "jobs.jsonl").read_text().splitlines()[-1])["job_id"] for d in (p_dir, c_dir)}

    def training(d):
        return (d / "log.txt").exists() and "steps/epoch" in (d / "log.txt").read_text()

    # preempt one run once it is training (USR2, what Slurm sends before the time limit or on preemption)
    _wait_for(lambda: training(p_dir), 120, "the first run to start training")
    time.sleep(1.0)
    subprocess.run(["scancel", "--signal=USR2", job_of[p_dir]], check=True, timeout=20)
    # cancel the other one while it trains
    _wait_for(lambda: training(c_dir), 120, "the second run to start training")
    subprocess.run(["scancel", job_of[c_dir]], check=True, timeout=20)

    # the reference: the preempted run's config, uninterrupted, in this process
    reference = train(p_spec.cfg, runs_dir=str(tmp_path / "reference"), progress=False)

    _wait_for(lambda: (p_dir / "DONE").exists(), 180, "the preempted run to finish after its requeue")
    log = (p_dir / "log.txt").read_text()
    # mid-epoch, in whichever epoch the signal landed (a fast machine may be in epoch 2 already)
    stopped = re.search(r"stop requested; checkpoint saved at epoch (\d+), step (\d+)", log)
    assert stopped and int(stopped.group(2)) > 0, log
    assert f"resuming at epoch {stopped.group(1)}, step {stopped.group(2)}" in log, log
    ours = torch.load(p_dir / "final.pt", weights_only=True)
    theirs = torch.load(reference.run_dir.path / "final.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in RunDir(p_dir).metrics()] == \
        [{k: v for k, v in r.items() if k not in timing} for r in reference.run_dir.metrics()]
    stderr = Path(json.loads((p_dir / "jobs.jsonl").read_text().splitlines()[-1])["stderr"]).read_text()
    assert "Caught signal SIGUSR2" in stderr and "requeueing" in stderr

    _wait_for(lambda: job_of[c_dir] not in _active_jobs(), 60, "the cancelled job to leave the queue")
    # scancel sends SIGTERM, which submitit ignores: the job stopped after its step and kept a checkpoint
    assert "stop requested; checkpoint saved at epoch" in (c_dir / "log.txt").read_text()
    assert (c_dir / "checkpoint.pt").exists() and not list(c_dir.glob(".checkpoint.pt.*"))
    status = _wait_for(lambda: (lambda s: s if "cancelled" in s else None)(
        _hkdbench("status", cancel, "--runs-dir", str(runs))), 30, "sacct to report the cancellation")
    assert f"slurm job {job_of[c_dir]} CANCELLED" in status and "log: " in status and "1 cancelled" in status
    sweep_dir = next(d for d in (runs / "_sweeps").iterdir() if d.name.startswith("cancel-"))
    assert "1 runs: 1 cancelled" in _hkdbench("status", str(sweep_dir))
    # a new submission resumes the cancelled run from that checkpoint
    dry = _hkdbench("sweep", cancel, "--executor", "slurm", "--runs-dir", str(runs), "--dry-run")
    assert "then 1 student run(s)" in dry
    # and the preempted-then-finished one is skipped
    again = _hkdbench("sweep", preempt, "--executor", "slurm", "--runs-dir", str(runs))
    assert "0 to run, 1 skipped (1 done)" in again and "submitted" not in again


def test_cohort_sweep_one_array_task_per_cohort_after_the_teachers(slurm_cluster, tmp_path):
    from hkdbench.benchmark.sweep.plan import expand, make_cohorts
    from hkdbench.benchmark.sweep.preset import load_preset

    runs = tmp_path / "runs"
    preset = _preset(tmp_path, "cohort", teachers=["resnet_mini"], students=["vit_mini"], methods=["none", "kd"],
                     seeds=[0, 1], overrides={"data": TINY, "train": {"epochs": 1}},
                     teacher_overrides={"data": TINY, "train": {"epochs": 1}})
    plan = expand(load_preset(preset))
    cohorts = make_cohorts(plan.students, grouped=True)
    assert [len(c.specs) for c in cohorts] == [2, 2]  # none and kd of each seed
    out = _hkdbench("sweep", preset, "--executor", "slurm", "--cohort", "--runs-dir", str(runs), "--wait")
    teacher = re.search(r"submitted 1 teacher run\(s\) as job array (\d+)", out)
    students = re.search(r"submitted 4 student run\(s\) in 2 cohort\(s\) as job array (\d+) \(dependency "
                         r"afterok:(\d+)(?:_0)?\)", out)  # the teacher's own job (a one-task array: its id alone)
    assert teacher and students and students.group(2) == teacher.group(1), out
    dirs = _run_dirs(runs)
    assert len(dirs) == 5 and all((d / "DONE").exists() for d in dirs.values())
    # one array task per cohort: its members share the task's job id and record the cohort
    tasks = {}
    for c in cohorts:
        records = [json.loads((runs / name / "jobs.jsonl").read_text().splitlines()[-1]) for name in c.names]
        (job_id,) = {r["job_id"] for r in records}
        assert job_id.startswith(f"{students.group(1)}_")
        assert all(r["cohort"] == {"id": c.id, "runs": c.names} for r in records)
        tasks[c.id] = job_id
    assert len(set(tasks.values())) == 2
    # afterok: Slurm started the cohorts' tasks after the teacher's job ended (and no student trained it)
    times = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,Start,End", "-j",
                            f"{teacher.group(1)},{students.group(1)}"], capture_output=True, text=True,
                           timeout=20).stdout
    spans = {line.split("|")[0]: line.split("|")[1:] for line in times.splitlines() if line.strip()}
    (teacher_end,) = [end for job, (_, end) in spans.items() if job.split("_")[0] == teacher.group(1)]
    assert all(spans[task][0] >= teacher_end for task in tasks.values()), times
    for c in cohorts:
        kd = next(runs / s.name for s in c.specs if s.cfg.method == "kd")
        assert "training it first" not in (kd / "log.txt").read_text()
    status = _hkdbench("status", preset, "--runs-dir", str(runs))
    assert "5 runs: 5 done" in status
    for c in cohorts:
        assert f"  cohort {c.id} (job {tasks[c.id]}, 2 runs): none done, kd done" in status
    again = _hkdbench("sweep", preset, "--executor", "slurm", "--cohort", "--runs-dir", str(runs))
    assert "0 to run, 5 skipped (5 done)" in again and "submitted" not in again
