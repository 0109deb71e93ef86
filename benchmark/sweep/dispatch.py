"""Submitting a sweep: which runs to do (the run store decides: done runs are skipped, cut-off ones resumed,
failed ones only with --retry-failed), the sweep's manifest (``sweep.json``), the dry run, and the submission
through one executor of ``executors/`` (inline, local, slurm), teachers first. With ``cohort`` the student runs
to do are grouped into cohorts (``plan.make_cohorts``), one job each; teacher runs are always their own jobs.

What is never done: taking a result from ``job.result()``. Every job trains its runs in the run store and the
store says what is finished, cut off, failed or being trained (the run's flock); re-submitting a finished sweep
runs nothing. Every submission appends a line to each of its runs' ``<run>/jobs.jsonl`` and to the sweep's
``<runs>/_sweeps/<sweep id>/submissions.jsonl`` (with a ``cohort`` field, the cohort's id and runs, for a
cohort's job); ``status`` joins them with the run store (``status.py``).
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional, Sequence, Tuple

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.core.store import (INVOKED_AT, INVOKED_COHORT, INVOKED_COMMAND, INVOKED_EXECUTOR, RUN_CELLS,
                                           RUN_CONFIG, RUN_KIND, RUN_NAME, RUN_TEACHER_RUN, SUBMITTED_AT, SUBMITTED_RUN,
                                           SWEEP_ID, SWEEP_INVOCATIONS, SWEEP_PRESET, SWEEP_RUNS, SWEEP_RUNS_DIR,
                                           RunStore, append_jsonl, timestamp)
from hkdbench.benchmark.sweep.executors import get_executor
from hkdbench.benchmark.sweep.executors.base import SubmitOptions, SweepResult
from hkdbench.benchmark.sweep.job import RunJob
from hkdbench.benchmark.sweep.plan import Cohort, RunSpec, SweepPlan, make_cohorts
from hkdbench.benchmark.sweep.preset import Preset, missing_requirements
from hkdbench.benchmark.sweep.status import RunState, _count, format_state_table, run_states


class Sweep:
    def __init__(self, plan: SweepPlan, runs_dir: Optional[str] = None, device: Optional[str] = None,
                 out=None, cohort: bool = False):
        self.plan = plan
        self.cohort = cohort  # student runs to do train in cohorts, one job each
        self.preset: Preset = plan.preset
        self.store = RunStore(runs_dir)
        self.root = self.store.root.resolve()
        self.device = device
        self.out = out or sys.stdout
        self.records = self.store.sweep_dir(plan.sweep_id())
        self.sweep_dir = self.records.path
        self.folder = self.store.submitit_folder

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    # -- planning -------------------------------------------------------------------------------------------------
    def decide(self, retry_failed: bool = False) -> Tuple[List[RunState], List[RunState]]:
        """(to submit, to skip): done runs, queued/running ones and (without ``retry_failed``) failed ones are
        skipped; pending, partial (resumed from their checkpoint) and cancelled ones are submitted."""
        todo, skip = [], []
        for st in run_states(self.plan.runs, self.store):
            if st.status in ("done", "running", "queued") or (st.status == "failed" and not retry_failed):
                skip.append(st)
            else:
                todo.append(st)
        return todo, skip

    def write_manifest(self, executor: Optional[str] = None, command: Optional[str] = None) -> None:
        """``sweep.json``: the preset, every run's config and, one entry per ``run``, when, how (executor) and
        with which command line the sweep was invoked (the report's provenance)."""
        from hkdbench.benchmark.core.config import to_dict

        invocations = self.records.manifest().get(SWEEP_INVOCATIONS, []) if self.records.exists else []
        if executor is not None:
            invocations.append({INVOKED_AT: timestamp(), INVOKED_EXECUTOR: executor, INVOKED_COMMAND: command,
                                INVOKED_COHORT: self.cohort})
        body = {SWEEP_ID: self.plan.sweep_id(), SWEEP_PRESET: to_dict(self.preset), SWEEP_RUNS_DIR: str(self.root),
                SWEEP_INVOCATIONS: invocations,
                SWEEP_RUNS: [{RUN_NAME: r.name, RUN_KIND: r.kind, RUN_TEACHER_RUN: r.teacher_run,
                              RUN_CELLS: [list(c) for c in r.cells], RUN_CONFIG: r.cfg.to_dict()}
                             for r in self.plan.runs]}
        self.records.write_manifest(body)

    def dry_run(self, executor: str, retry_failed: bool = False) -> None:
        todo, skip = self.decide(retry_failed)
        p = self.preset
        self.say(f"sweep {self.plan.sweep_id()}: preset {p.name}, dataset {p.dataset}, "
                 f"{len(self.plan.cells)} cells = {len(p.pair_list())} pairs x {len(p.methods)} methods x "
                 f"{len(p.seeds)} seeds -> {len(self.plan.students)} student runs + {len(self.plan.teachers)} "
                 f"teacher runs")
        missing = missing_requirements(p)
        if missing:
            self.say(f"note: {', '.join(missing)} must be given at submission (e.g. {missing[0]}=PATH)")
        self.say(f"methods: {', '.join(p.methods)}; seeds: {', '.join(map(str, p.seeds))}")
        self.say("pairs (teacher -> student: student recipe, teacher recipe):")
        from hkdbench.benchmark.models.zoo import zoo_entry

        for i, (t, s) in enumerate(p.pair_list(), 1):
            specs = [r for r in self.plan.students if (t, s) in {(c[0], c[1]) for c in r.cells}]
            spec = next((r for r in specs if r.cfg.teacher is not None), specs[0])
            t_recipe = spec.cfg.teacher_recipe or (
                f"checkpoint {spec.cfg.teacher.checkpoint}" if spec.cfg.teacher and spec.cfg.teacher.checkpoint else
                f"timm pretrained {spec.cfg.teacher.pretrained}" if spec.cfg.teacher else "-")
            if spec.cfg.teacher_recipe and spec.cfg.teacher.pretrained:
                t_recipe += f" from timm pretrained {spec.cfg.teacher.pretrained}"
            self.say(f"  {i:2d}. {t} ({zoo_entry(t).family}) -> {s} ({zoo_entry(s).family}): {spec.cfg.recipe}, "
                     f"teacher {t_recipe}")
        self.say("")
        self.say(format_state_table(todo + skip, order=self.plan.runs))
        self.say("")
        t_todo = [s for s in todo if s.spec.kind == "teacher"]
        s_todo = [s for s in todo if s.spec.kind == "student"]
        cohorts = make_cohorts([s.spec for s in s_todo], self.cohort)
        submitter = get_executor(executor)(self)
        self.say(f"would submit ({executor}): {len(t_todo)} teacher run(s)"
                 + (submitter.teachers_submitted_as if t_todo else "")
                 + f", then {len(s_todo)} student run(s)"
                 + (f" in {len(cohorts)} cohort(s), one job each" if self.cohort else "")
                 + (submitter.students_submitted_as if t_todo else ""))
        readers = [r for t in t_todo for r in self.outputs_readers(Cohort([t.spec]))]
        if readers:
            self.say(f"  the teacher runs' jobs also compute the stored teacher outputs that {len(readers)} student "
                     "run(s) read (train.teacher_outputs=stored)")
        for c in cohorts if self.cohort else []:
            self.say(f"  {c.describe()}")
        note = submitter.dry_run_note()
        if note:
            self.say(note)
        self.say(f"skipped: {len(skip)} ({_count(skip)})")

    # -- submission -----------------------------------------------------------------------------------------------
    def run(self, executor: str, retry_failed: bool = False, parallel: int = 0, wait: bool = False,
            command: Optional[str] = None, check_inputs: bool = True) -> SweepResult:
        submitter = get_executor(executor)(self)
        if parallel < 0:  # the local executor would wait forever for a free slot
            raise ConfigError(f"parallel must be >= 0 (0: CPUs / slurm.cpus_per_task), got {parallel}")
        missing = missing_requirements(self.preset)
        if missing:
            raise ConfigError(f"preset {self.preset.name} needs {', '.join(missing)} (e.g. {missing[0]}=PATH)")
        if check_inputs:  # off where the data or checkpoints exist only on the compute nodes
            from hkdbench.benchmark.engine.preflight import check_sweep_inputs

            check_sweep_inputs(spec.cfg for spec in self.plan.runs)
        todo, skip = self.decide(retry_failed)
        self.write_manifest(executor, command)
        self.say(f"sweep {self.plan.sweep_id()}: {len(self.plan.runs)} runs; {len(todo)} to run, "
                 f"{len(skip)} skipped ({_count(skip)}); run store {self.root}")
        for st in todo:
            if st.status == "failed" and retry_failed:
                self.store.run_dir(st.spec.cfg).failed_file.unlink(missing_ok=True)
        teachers = [Cohort([s.spec]) for s in todo if s.spec.kind == "teacher"]
        students = make_cohorts([s.spec for s in todo if s.spec.kind == "student"], self.cohort)
        return submitter.submit(teachers, students, skip, SubmitOptions(parallel, wait))

    def job(self, cohort: Cohort) -> RunJob:
        """The job of one run, or of a cohort's runs."""
        threads = self.preset.slurm.cpus_per_task
        cfgs = [s.cfg.to_dict() for s in cohort.specs]
        return RunJob(cfgs[0] if len(cfgs) == 1 else cfgs, str(self.root), self.device, threads,
                      self.preset.slurm.stop_wait, outputs_for=[s.cfg.to_dict() for s in self.outputs_readers(cohort)])

    def outputs_readers(self, cohort: Cohort) -> List[RunSpec]:
        """A teacher run's student runs that read its stored outputs and are not done: its job computes those
        outputs after training it, so that the student jobs, which wait for it, find them (none for other jobs)."""
        from hkdbench.benchmark.engine.cohort import cohort_reads_stored, group_cohorts, reads_stored

        teachers = {s.name for s in cohort.specs if s.kind == "teacher"}
        readers = [s for s in self.plan.students if s.teacher_run in teachers and reads_stored(s.cfg)
                   and not self.store.run_dir(s.cfg).is_done]
        if not self.cohort:
            return readers
        # in cohorts, a reader whose cohort runs the teacher live (it holds FitNet, PAT) shares that pass instead
        live = {c.run_name() for group in group_cohorts([s.cfg for s in self.plan.students])
                if not cohort_reads_stored(group) for c in group}
        return [s for s in readers if s.name not in live]

    def record(self, cohort: Cohort, executor: str, job_id: str, stdout: str = "", stderr: str = "") -> None:
        """The job's line in each of its runs' ``jobs.jsonl`` and in the sweep's ``submissions.jsonl``."""
        record = {"job_id": job_id, "executor": executor, "sweep": self.plan.sweep_id(), "stdout": stdout,
                  "stderr": stderr, "folder": str(self.folder), SUBMITTED_AT: timestamp()}
        if cohort.grouped:
            record["cohort"] = cohort.record()
        for spec in cohort.specs:
            rd = self.store.run_dir(spec.cfg)
            rd.claim(spec.cfg)
            append_jsonl(rd.jobs_file, record)
            self.records.record_submission({**record, SUBMITTED_RUN: rd.path.name})  # as the report finds it

    def untaken(self, cohort: Cohort, prefix: str = "") -> Optional[Cohort]:
        """The cohort less the runs :meth:`taken` (each one said, after ``prefix``); None when none is left."""
        free = []
        for spec in cohort.specs:
            taken = self.taken(spec)
            if taken:
                self.say(f"{prefix}skipped {spec.kind} run {spec.name}: {taken}")
            else:
                free.append(spec)
        return Cohort(free, cohort.grouped) if free else None

    def report_members(self, cohort: Cohort, job_id: str, log: str = "") -> int:
        """After a job ended: one line per run, finished / FAILED / left to another process (its lock is held:
        the job found it owned); returns how many failed."""
        failed = 0
        for spec in cohort.specs:
            rd = self.store.run_dir(spec.cfg)
            if not rd.is_done and rd.is_locked():
                self.say(f"left to another process: {spec.name} (job {job_id} found its lock held and exited "
                         "without training it)")
                continue
            failed += not rd.is_done
            self.say(f"{'finished' if rd.is_done else 'FAILED'}: {spec.name} (job {job_id}"
                     + ("" if rd.is_done or not log else f", log {log}") + ")")
        return failed

    def taken(self, spec: RunSpec) -> str:
        """Why ``spec`` no longer needs a job (checked again right before submitting it, since a racing sweep
        in the same store may have finished or started it meanwhile), or ''."""
        rd = self.store.run_dir(spec.cfg)
        if rd.is_done:
            return "finished meanwhile by another process"
        if rd.is_locked():  # flock: held only by a live process
            return "owned by another process (its lock is held)"
        return ""

    def wait(self, names: Sequence[str], poll_s: float = 2.0) -> int:
        """Waits until none of the runs is queued or running; returns how many did not finish."""
        specs = [s for s in self.plan.runs if s.name in set(names)]
        while True:
            states = run_states(specs, self.store)
            if not any(s.status in ("queued", "running") for s in states):
                return sum(s.status != "done" for s in states)
            time.sleep(poll_s)


