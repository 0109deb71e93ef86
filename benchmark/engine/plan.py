"""What ``train`` and ``teacher`` would train, read from the run store without writing to it (``--dry-run``), and
the one line that says where a student's settings differ from those of the teacher run it distils from.

The plan follows the trainer's rules: a student run is skipped when done (trained again under ``--restart``) and
needs ``--resume`` or ``--restart`` when it has a checkpoint; its teacher run is trained first, resumed whatever
the flags, and only when one of the students that read the teacher trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.store import RunDir, RunStore


@dataclass(frozen=True)
class PlannedRun:
    cfg: RunConfig
    role: str                   # 'teacher run', 'student run', 'probe teacher run'
    status: str                 # the store's word (RunDir.status): done, running, partial, pending, failed
    action: str                 # what this command does with the run
    trains: bool
    refused: bool = False       # a checkpoint without --resume or --restart: the command stops with an error
    note: Optional[str] = None  # the teacher run's settings that differ from its student's

    @property
    def name(self) -> str:
        return self.cfg.run_name()


def plan_runs(cfgs: Sequence[RunConfig], store: RunStore, resume: bool = False,
              restart: bool = False) -> List[PlannedRun]:
    """The runs of one command (a run, or a cohort's), in the order it trains them: the probe teacher runs it
    reads (never trained here), the teacher run, then the runs given."""
    given = [_given(cfg, store.run_dir(cfg), resume, restart) for cfg in cfgs]
    teacher = _teacher_run(given, store)
    return _probe_teacher_runs(cfgs, store, teacher) + ([teacher] if teacher else []) + given


def _given(cfg: RunConfig, rd: RunDir, resume: bool, restart: bool) -> PlannedRun:
    role, status = f"{cfg.kind} run", rd.status()
    if restart and status != "pending":
        return PlannedRun(cfg, role, status, "--restart: trains it again from epoch 1", True)
    if rd.is_done:
        return PlannedRun(cfg, role, status, "skipped", False)
    if status == "running":
        return PlannedRun(cfg, role, status, "another process holds its lock: this command waits for it", True)
    if rd.has_checkpoint and not resume:
        return PlannedRun(cfg, role, status, f"{_resumes_at(rd)} with --resume; --restart starts it over", False,
                          refused=True)
    return PlannedRun(cfg, role, status, _resumes_at(rd) if rd.has_checkpoint else "trains from epoch 1", True)


def _teacher_run(given: List[PlannedRun], store: RunStore) -> Optional[PlannedRun]:
    """The teacher run the students distil from, when one is trained here (not a checkpoint, nor timm's weights
    as they are); the trainer reads it for the first student that trains and uses a teacher."""
    from hkdbench.benchmark.engine.teacher import teacher_source

    readers = [(r, source) for r in given if (source := teacher_source(r.cfg)) is not None and source.is_run]
    if not readers:
        return None
    student, source = next(((r, s) for r, s in readers if r.trains), readers[0])
    t_cfg = source.run_config
    rd = store.run_dir(t_cfg)
    status, note = rd.status(), teacher_settings_note(student.cfg, t_cfg)
    if rd.is_done or not student.trains:
        action = (f"its {student.cfg.teacher.weights} weights are loaded" if student.trains else
                  f"not {'loaded' if rd.is_done else 'trained'} (no run that reads it trains)")
        return PlannedRun(t_cfg, "teacher run", status, action, False, note=note)
    if status == "running":
        action = "another process holds its lock: this command waits for it"
    else:  # the trainer always resumes a teacher run
        action = _resumes_at(rd) if rd.has_checkpoint else "trains first, from epoch 1"
    return PlannedRun(t_cfg, "teacher run", status, action, True, note=note)


def _probe_teacher_runs(cfgs: Sequence[RunConfig], store: RunStore,
                        teacher: Optional[PlannedRun]) -> List[PlannedRun]:
    """The teacher runs named by ``train.probe_teachers`` other than the one trained here: read, never trained."""
    names = sorted({n for c in cfgs if c.train.probe_every for n in c.train.probe_teachers}
                   - ({teacher.name} if teacher else set()))
    dirs = [RunDir(store.root / name) for name in names]
    # one without a config is missing: the trainer's check has already failed unless no run here reads it
    return [PlannedRun(rd.config(), "probe teacher run", rd.status(), "read by the CKA probe", False)
            for rd in dirs if rd.config_file.exists()]


def _resumes_at(rd: RunDir) -> str:
    from hkdbench.benchmark.engine.records import checkpoint_position

    position = checkpoint_position(rd)
    if position is None:
        return f"resumes from {rd.checkpoint_file.name} (unreadable here: the resume says why)"
    epoch, step = position
    return f"resumes at epoch {epoch + 1}" + (f", step {step}" if step else "")


# -- the settings a run trains with -------------------------------------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_settings(cfg: RunConfig) -> str:
    """The settings that decide a run's stream and length, e.g. ``fashion-mnist, 256 of 60000 images
    (data.train_subset=256), 32 px, batch 128, recipe demo: 1 epoch x 2 steps/epoch``."""
    from hkdbench.benchmark.data.datasets import subset_size, training_split_size
    from hkdbench.benchmark.data.loaders import train_steps_per_epoch

    data = cfg.data
    split = training_split_size(data)
    kept = subset_size(split, data.train_subset)
    images = f"{kept} images" if kept == split else f"{kept} of {split} images (data.train_subset={data.train_subset})"
    if data.val_split:
        from hkdbench.benchmark.data.datasets import train_val_indices

        held_out = len(train_val_indices(data)[1])
        images += f", {held_out} of them held out to validate on (data.val_split={data.val_split:g})"
    return (f"{data.dataset}, {images}, {data.img_size} px, batch {data.batch_size}, recipe {cfg.recipe}: "
            f"{_plural(cfg.train.epochs, 'epoch')} x {_plural(train_steps_per_epoch(data), 'step')}/epoch")


def _differences(student: RunConfig, teacher: RunConfig) -> List[Tuple[str, int, int, object]]:
    """(setting, the student's, the teacher run's, the override value that gives the teacher the student's) for
    each of images, epochs and batch size that differ. The image size is not compared: a teacher run always takes
    its student's, as its dataset and root (recipes.teacher_run_config), so one split serves both counts."""
    from hkdbench.benchmark.data.datasets import subset_size, training_split_size

    out = []
    a, b = student.data.train_subset, teacher.data.train_subset
    if a != b:  # counted only then: listing a large split's files takes a while
        n = training_split_size(student.data)
        if subset_size(n, a) != subset_size(n, b):
            out.append(("data.train_subset", subset_size(n, a), subset_size(n, b), a))
    for field, mine, theirs in (("train.epochs", student.train.epochs, teacher.train.epochs),
                                ("data.batch_size", student.data.batch_size, teacher.data.batch_size)):
        if mine != theirs:
            out.append((field, mine, theirs, mine))
    return out


_READS = {"data.train_subset": lambda n: f"{n} images", "train.epochs": lambda n: _plural(n, "epoch"),
          "data.batch_size": lambda n: f"batch {n}"}


def teacher_settings_note(student: RunConfig, teacher: RunConfig) -> Optional[str]:
    """One line when the teacher run trains on other images, epochs or batch size than its student (its settings
    are its own: ``teacher.<section>.<field>=value``), e.g. ``teacher run NAME: 60000 images x 4 epochs (its own
    settings; the student: 256 images x 1 epoch; set teacher.data.train_subset=256 teacher.train.epochs=1 to
    match)``; None when they agree."""
    differ = _differences(student, teacher)
    if not differ:
        return None

    def describe(column: int) -> str:
        length = " x ".join(_READS[d[0]](d[column]) for d in differ if d[0] != "data.batch_size")
        batch = [_READS[d[0]](d[column]) for d in differ if d[0] == "data.batch_size"]
        return ", ".join(filter(None, [length, *batch]))

    overrides = " ".join(f"teacher.{field}={value}" for field, _, _, value in differ)
    return (f"teacher run {teacher.run_name()}: {describe(2)} (its own settings; the student: {describe(1)}; "
            f"set {overrides} to match)")


def format_plan(runs: Sequence[PlannedRun], store: RunStore) -> str:
    """The dry run's report: each run with its settings and state, then what would be trained."""
    lines = [f"dry run: the runs of this command in training order; nothing is trained or written (run store "
             f"{store.root})"]
    for i, run in enumerate(runs, 1):
        lines.append(f"{i}. {run.role} {run.name}: {run.status}; {run.action}")
        lines.append(f"   {describe_settings(run.cfg)}")
        if run.cfg.train.probe_every and run.cfg.train.probe_teachers:
            lines.append(f"   CKA-probed against {', '.join(run.cfg.train.probe_teachers)}")
        if run.note:
            lines.append(f"   {run.note}")
    training = [r for r in runs if r.trains]
    counts = [_plural(sum(r.role == role for r in training), role) for role in ("teacher run", "student run")
              if any(r.role == role for r in training)]
    students = sum(r.role == "student run" for r in training)
    lines.append(f"would train: {', then '.join(counts)}{' in one cohort' if students > 1 else ''}" if training
                 else "would train: nothing")
    return "\n".join(lines)
