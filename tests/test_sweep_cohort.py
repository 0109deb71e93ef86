"""``hkdbench sweep --cohort``: the student runs that share a data stream and a teacher train as one job each, on
the inline and local executors (Slurm: tests/slurm/test_sweep_slurm.py); the job's records, its outcome, its
stop-and-requeue and the status table's cohorts. The engine trains for real (tiny runs)."""
import json
import threading
import time

import pytest

from hkdbench.benchmark.engine.trainer import train
from hkdbench.benchmark.recipes.resolve import teacher_run_config
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.sweep.plan import cohort_id, expand, make_cohorts
from hkdbench.benchmark.sweep.preset import load_preset

from test_sweep import TINY, hkdbench, tiny_preset


def _students(preset):
    return {s.cfg.method: s for s in expand(load_preset(preset)).students}


def _jobs(runs, spec):
    return RunStore(runs).run_dir(spec.cfg).jobs()


def test_cohorts_of_a_plan_one_per_stream_and_teacher(tmp_path):
    preset = tiny_preset(tmp_path, methods=["none", "kd", "dkd"], seeds=[0, 1])
    plan = expand(load_preset(preset))
    cohorts = make_cohorts(plan.students, grouped=True)
    # one cohort per seed, the student-alone run in it; in the plan's order
    assert [[s.cfg.method for s in c.specs] for c in cohorts] == [["none", "kd", "dkd"]] * 2
    assert [{s.cfg.train.seed for s in c.specs} for c in cohorts] == [{0}, {1}]
    assert all(c.grouped and c.record() == {"id": c.id, "runs": c.names} for c in cohorts)
    assert cohorts[0].id != cohorts[1].id and cohorts[0].id == cohort_id(list(reversed(cohorts[0].names)))
    alone = make_cohorts(plan.students, grouped=False)  # without --cohort: one job per run, no cohort record
    assert [c.names for c in alone] == [[s.name] for s in plan.students]
    assert all(c.record() is None for c in alone)


def test_dry_run_lists_the_cohorts(tmp_path):
    preset = tiny_preset(tmp_path, methods=["none", "kd", "dkd"], seeds=[0, 1])
    cohorts = make_cohorts(expand(load_preset(preset)).students, grouped=True)
    code, out, err = hkdbench("sweep", preset, "--cohort", "--dry-run", "--executor", "slurm",
                              "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    assert ("would submit (slurm): 1 teacher run(s) as a first job array, then 6 student run(s) in 2 cohort(s), "
            "one job each as job arrays, each after its own teacher's task (afterok)") in out
    for seed, c in enumerate(cohorts):
        assert f"  cohort {c.id}: vit_mini seed {seed}, teacher resnet_mini: none, kd, dkd (3 runs)" in out
    code, out, _ = hkdbench("sweep", preset, "--dry-run", "--runs-dir", tmp_path / "runs")
    assert code == 0 and "then 6 student run(s)\n" in out and "cohort" not in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.usefixtures("fmnist_available")
def test_inline_cohort_sweep_a_diverged_member_fails_alone_and_a_rerun_submits_nothing(tmp_path):
    # kd's weight is NaN: its loss diverges at the first step, while none and dkd of its cohort go on
    preset = tiny_preset(tmp_path, methods=["none", "kd", "dkd"], method_overrides={"kd": {"kd_weight": float("nan")}})
    runs = tmp_path / "runs"
    specs = _students(preset)
    (cohort,) = make_cohorts(list(specs.values()), grouped=True)
    code, out, _ = hkdbench("sweep", preset, "--cohort", "--runs-dir", runs)
    assert code == 1, out  # a failed run fails the sweep
    assert f"[2/2] cohort {cohort.id} (3 runs)" in out
    assert f"FAILED: DivergedError: cohort {cohort.id}: 1 of 3 runs failed: {specs['kd'].name}: non-finite loss" \
        in out
    store = RunStore(runs)
    assert [store.run_dir(specs[m].cfg).status() for m in ("none", "kd", "dkd")] == ["done", "failed", "done"]
    records = [_jobs(runs, specs[m]) for m in ("none", "kd", "dkd")]
    assert all(len(r) == 1 for r in records)
    assert len({r[0]["job_id"] for r in records}) == 1 and records[0][0]["job_id"].startswith("inline-")
    assert all(r[0]["cohort"] == {"id": cohort.id, "runs": cohort.names} for r in records)
    (sweep_dir,) = (runs / "_sweeps").iterdir()
    submissions = [json.loads(line) for line in (sweep_dir / "submissions.jsonl").read_text().splitlines()]
    assert sorted(s["run"] for s in submissions if "cohort" in s) == sorted(cohort.names)
    assert [s.get("cohort") for s in submissions if s["run"].startswith("teacher_")] == [None]

    code, status, _ = hkdbench("status", sweep_dir)
    assert code == 0
    job_id = records[0][0]["job_id"]
    assert f"  cohort {cohort.id} (job {job_id}, 3 runs): none done, kd failed, dkd done" in status
    rows = [line.split() for line in status.splitlines() if line.startswith(("done ", "failed "))]
    assert {row[-1]: (row[0], row[-2]) for row in rows if row[1] == "student"} == {
        specs["none"].name: ("done", cohort.id), specs["kd"].name: ("failed", cohort.id),
        specs["dkd"].name: ("done", cohort.id)}
    assert "4 runs: 3 done, 1 failed" in status

    stamps = {p.name: p.stat().st_mtime_ns for p in runs.glob("*/log.txt")}
    code, again, _ = hkdbench("sweep", preset, "--cohort", "--runs-dir", runs)
    assert code == 0 and "0 to run, 4 skipped (3 done, 1 failed)" in again and "[1/" not in again
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("*/log.txt")} == stamps
    assert all(len(_jobs(runs, s)) == 1 for s in specs.values())


@pytest.mark.usefixtures("fmnist_available")
def test_local_cohort_sweep_one_job_for_the_cohort(tmp_path):
    preset, runs = tiny_preset(tmp_path, methods=["none", "kd"]), tmp_path / "runs"
    specs = _students(preset)
    (cohort,) = make_cohorts(list(specs.values()), grouped=True)
    code, out, err = hkdbench("sweep", preset, "--cohort", "--executor", "local", "--parallel", "2",
                              "--runs-dir", runs)
    assert code == 0, out + err
    (job_id,) = {_jobs(runs, s)[-1]["job_id"] for s in specs.values()}
    assert f"submitted student cohort {cohort.id} ({', '.join(cohort.names)}) as local job {job_id}" in out
    for spec in specs.values():  # the local executor's bookkeeping, one line per member
        assert f"finished: {spec.name} (job {job_id})" in out
        assert RunStore(runs).run_dir(spec.cfg).is_done
        assert _jobs(runs, spec)[-1]["cohort"] == {"id": cohort.id, "runs": cohort.names}
    assert f"  cohort {cohort.id} (job {job_id}, 2 runs): none done, kd done" in out
    assert "3 runs: 3 done" in out
    code, again, _ = hkdbench("sweep", preset, "--cohort", "--executor", "local", "--runs-dir", runs)
    assert code == 0 and "0 to run, 3 skipped (3 done)" in again and "submitted" not in again


def _train_teacher(spec, runs):
    train(teacher_run_config(spec.cfg), runs_dir=str(runs), progress=False, echo=False)


@pytest.mark.usefixtures("fmnist_available")
def test_a_cohort_job_leaves_an_owned_member_to_its_owner_and_lists_every_status(tmp_path):
    from hkdbench.benchmark.sweep.job import OWNED, RunJob

    specs = _students(tiny_preset(tmp_path, methods=["none", "kd"]))
    runs = tmp_path / "runs"
    _train_teacher(specs["kd"], runs)
    store = RunStore(runs)
    names = [specs["none"].name, specs["kd"].name]
    with store.run_dir(specs["kd"].cfg).lock():  # a racing sweep's live job trains kd
        outcome = RunJob([specs[m].cfg.to_dict() for m in ("none", "kd")], str(runs), "cpu")()
    assert outcome == {"status": "done", "cohort": cohort_id(names),
                       "runs": {specs["none"].name: "done", specs["kd"].name: OWNED}}
    assert store.run_dir(specs["none"].cfg).is_done
    kd = store.run_dir(specs["kd"].cfg)
    assert not kd.is_done and not kd.failed_file.exists() and not kd.has_checkpoint


@pytest.mark.usefixtures("fmnist_available")
def test_checkpoint_of_a_cohort_job_requeues_every_member(tmp_path):
    """What submitit's USR2 handler does, without Slurm: checkpoint() while the cohort's job trains."""
    from hkdbench.benchmark.sweep.job import RunJob

    preset = tiny_preset(tmp_path, methods=["none", "kd"], overrides={"data": {**TINY, "train_subset": 2048},
                                                                       "train": {"epochs": 2}})
    specs = _students(preset)
    runs = tmp_path / "runs"
    _train_teacher(specs["kd"], runs)
    job = RunJob([specs[m].cfg.to_dict() for m in ("none", "kd")], str(runs), "cpu", 1, stop_wait_s=120)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(job()))
    worker.start()
    logs = [runs / s.name / "log.txt" for s in specs.values()]
    deadline = time.time() + 120
    while not any(p.exists() and "steps/epoch" in p.read_text() for p in logs) and time.time() < deadline:
        time.sleep(0.1)  # polls for the chosen point: the cohort is training
    time.sleep(0.5)
    delayed = job.checkpoint()
    worker.join(120)
    assert outcome["status"] == "interrupted"
    assert outcome["runs"] == {s.name: "interrupted" for s in specs.values()}
    store = RunStore(runs)
    for spec in specs.values():  # every member stopped with a checkpoint, none finished
        rd = store.run_dir(spec.cfg)
        assert rd.has_checkpoint and not rd.is_done
        assert "stop requested; checkpoint saved" in rd.log_file.read_text()
    requeued = delayed.function
    assert isinstance(requeued, RunJob) and requeued is not job and requeued.cfgs == job.cfgs
    assert delayed.result() == {"status": "done", "cohort": cohort_id(requeued.names),
                                "runs": {s.name: "done" for s in specs.values()}}
    for spec in specs.values():
        rd = store.run_dir(spec.cfg)
        assert rd.is_done and "resuming at epoch" in rd.log_file.read_text()
        assert len(rd.metrics()) == 2


def test_on_slurm_each_cohort_waits_for_its_own_teachers_job_only(tmp_path):
    """Two teachers: the students of each form one array after that teacher's task (afterok:<array>_<task>); the
    student alone (no teacher) and students of a finished teacher wait for nothing."""
    from hkdbench.benchmark.sweep.executors.slurm import _by_dependency

    preset = tiny_preset(tmp_path, teachers=["resnet_mini", "mixer_mini"], methods=["none", "kd", "fitnet"])
    plan = expand(load_preset(preset))
    cohorts = make_cohorts(plan.students, grouped=True)
    by_teacher = {c.specs[-1].cfg.teacher.name: c for c in cohorts}
    resnet_run, mixer_run = (next(t.name for t in plan.teachers if t.cfg.student.name == n)
                             for n in ("resnet_mini", "mixer_mini"))
    groups = _by_dependency(cohorts, {resnet_run: "700_0", mixer_run: "700_1"})
    assert groups == [("afterok:700_0", [by_teacher["resnet_mini"]]), ("afterok:700_1", [by_teacher["mixer_mini"]])]
    # the resnet teacher already done (no job): its cohort, which holds the student alone, waits for nothing
    assert _by_dependency(cohorts, {mixer_run: "700_1"})[0] == (None, [by_teacher["resnet_mini"]])


def test_a_probed_sweep_probes_the_student_alone_against_each_of_its_teachers(tmp_path):
    """With CKA probes on, the student-alone run of a two-teacher sweep names both teacher runs
    (train.probe_teachers), waits for both on Slurm, and after an inline cohort sweep has CKA against each."""
    from hkdbench.benchmark.sweep.executors.slurm import _by_dependency

    probed = {"overrides": {"data": TINY, "train": {"epochs": 2, "probe_every": 1, "probe_images": 64}}}
    preset = tiny_preset(tmp_path, teachers=["resnet_mini", "mixer_mini"], methods=["none", "kd"], **probed)
    plan = expand(load_preset(preset))
    teacher_runs = {t.cfg.student.name: t.name for t in plan.teachers}
    (alone,) = [s for s in plan.students if s.cfg.method == "none"]
    assert alone.cfg.train.probe_teachers == tuple(sorted(teacher_runs.values()))
    assert sorted(alone.needs) == sorted(teacher_runs.values()) and alone.teacher_run is None
    assert [s.needs for s in plan.students if s.cfg.method == "kd"] == [[s.teacher_run] for s in plan.students
                                                                        if s.cfg.method == "kd"]
    cohorts = make_cohorts(plan.students, grouped=True)
    jobs = {teacher_runs["resnet_mini"]: "700_0", teacher_runs["mixer_mini"]: "700_1"}
    groups = dict(_by_dependency(cohorts, jobs))
    with_alone = next(c for c in cohorts if alone in c.specs)
    assert with_alone in groups["afterok:700_0:700_1"]  # its kd waits for one teacher, its none for both
    # without probes the student alone names no teacher run: the plan (and the run's name) as before
    plain = expand(load_preset(tiny_preset(tmp_path, name="plain", teachers=["resnet_mini", "mixer_mini"])))
    assert all(s.cfg.train.probe_teachers == () for s in plain.students)

    runs = tmp_path / "runs"
    code, out, _ = hkdbench("sweep", preset, "--cohort", "--runs-dir", runs)
    assert code == 0, out
    last = RunStore(runs).run_dir(alone.cfg).metrics()[-1]
    for name in teacher_runs.values():
        assert sum(k.startswith(f"cka@{name}/linear/") for k in last) == 16
