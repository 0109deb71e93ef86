"""What an executor provides (:class:`Executor`), what a submission returns (:class:`SweepResult`), and the
submitit executors' shared knowledge of their result files (:class:`SubmititExecutor`).

A job is one :class:`~hkdbench.benchmark.sweep.plan.Cohort` (one run, or with ``sweep --cohort`` the student runs
trained together), trained by a :class:`~hkdbench.benchmark.sweep.job.RunJob`. The sweep (``dispatch.Sweep``)
decides which runs to do and records each submitted job in the store (``Sweep.record``: a line in the run's
``jobs.jsonl`` with ``executor``, ``job_id``, ``folder``, ...). ``status`` hands those records back to the
executor that wrote them, which says where each job stands and can cancel it.
"""
from __future__ import annotations

import abc
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from hkdbench.benchmark.sweep.dispatch import Sweep
    from hkdbench.benchmark.sweep.plan import Cohort
    from hkdbench.benchmark.sweep.status import RunState

JobRecord = Mapping[str, Any]  # one line of a run's jobs.jsonl


@dataclass(frozen=True)
class SubmitOptions:
    parallel: int = 0                         # local: jobs at a time (0: CPUs / slurm.cpus_per_task)
    wait: bool = False                        # slurm: wait until the submitted runs end


@dataclass
class SweepResult:
    sweep_dir: Path
    submitted: List[Tuple[str, str]]          # (run name, job id)
    skipped: List["RunState"]
    folder: Optional[Path] = None
    failed: int = 0
    stopped_by: int = 0                       # the signal that stopped the sweep (its workers saved and exited)

    @property
    def exit_code(self) -> int:
        return 128 + self.stopped_by if self.stopped_by else int(self.failed > 0)


class Executor(abc.ABC):
    """One way to run a sweep's jobs. A new executor is a subclass in its own module of ``executors/`` and one
    line in :data:`~hkdbench.benchmark.sweep.executors.EXECUTORS`; it provides:

    * ``name`` (what ``job_id`` records and ``--executor`` say) and a one-line ``description``;
    * ``options_section``: the preset section its options are read from (the section's dataclass validates them),
      None for none;
    * :meth:`submit`: runs or submits the sweep's jobs, teachers first;
    * :meth:`states`: where its recorded jobs stand, in Slurm's words (``PENDING``, ``RUNNING``, ``COMPLETED``,
      ``FAILED``, ``CANCELLED``, ...), which ``status`` maps to a run's status;
    * :meth:`cancel`: stops its recorded jobs (each saves a checkpoint where it can);
    * optionally :meth:`outcome` (a finished job's return value, for ``status``), and for the dry run
      :meth:`dry_run_note` and how it submits the teachers' and the students' jobs (``*_submitted_as``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    options_section: ClassVar[Optional[str]] = None
    teachers_submitted_as: ClassVar[str] = ""   # completes "would submit: N teacher run(s)..."
    students_submitted_as: ClassVar[str] = ""   # completes "..., then M student run(s)..." (when teachers are due)

    def __init__(self, sweep: "Sweep") -> None:
        self.sweep = sweep

    @property
    def options(self) -> Any:
        """This executor's section of the sweep's preset."""
        return getattr(self.sweep.preset, self.options_section) if self.options_section else None

    @abc.abstractmethod
    def submit(self, teachers: List["Cohort"], students: List["Cohort"], skip: List["RunState"],
               options: SubmitOptions) -> SweepResult:
        """Runs or submits one job per cohort, the teachers' before the students' that need them."""

    def dry_run_note(self) -> str:
        """What a dry run adds about the submission ('' for nothing)."""
        return ""

    @classmethod
    @abc.abstractmethod
    def states(cls, jobs: Sequence[JobRecord]) -> Dict[str, Tuple[str, str]]:
        """job id -> (state, reason) for those of ``jobs`` (its own records) it can tell."""

    @classmethod
    @abc.abstractmethod
    def cancel(cls, jobs: Sequence[JobRecord]) -> List[str]:
        """Stops the jobs; returns the ids it reached."""

    @classmethod
    def outcome(cls, job: JobRecord) -> Optional[Tuple[str, Any]]:
        """('success', the job's return value) or ('error', its traceback) once it ended; None when unknown."""
        return None

    @classmethod
    def error(cls, job: JobRecord) -> str:
        """The last line of the exception a failed job raised, if known."""
        outcome = cls.outcome(job)
        if outcome is None or outcome[0] != "error":
            return ""
        lines = [ln for ln in str(outcome[1]).strip().splitlines() if ln.strip()]
        return lines[-1] if lines else ""


class SubmititExecutor(Executor):
    """An executor whose jobs are submitit's: each ended job leaves its pickled result in the job's folder."""

    @classmethod
    def outcome(cls, job: JobRecord) -> Optional[Tuple[str, Any]]:
        path = Path(job.get("folder", "")) / f"{job.get('job_id')}_0_result.pkl"
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                kind, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 (a torn or foreign file: no result to read)
            return None
        return kind, payload
