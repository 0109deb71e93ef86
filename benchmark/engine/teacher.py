"""The teacher's source: the one place that decides where a run's teacher comes from (:func:`teacher_source`), asked
by training, evaluation, the dry-run plan, the input checks and sweeps. A teacher comes from

* ``checkpoint``: a state dict file (``teacher.checkpoint``), loaded as it is;
* ``pretrained``: timm's pretrained weights used as they are (ImageNet weights on ImageNet);
* ``run``: a teacher run of the store (the run has a ``teacher_recipe``; the run's config is
  ``recipes.teacher_run_config``'s, its name ``cfg.teacher_run``), trained once per teacher config and shared by
  every student that names it. A student loads its best or last weights (``teacher.weights``), trains it first when
  it has not finished, and refuses it when it failed, diverged or is damaged: before any of its own files is written.

Also here: the teacher runs that a student without a teacher of its own is CKA-probed against
(``train.probe_teachers``), read from the store by name, never trained for it."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from hkdbench.methods import get_method

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.store import DamagedRunFileError, RunDir, RunStore
from hkdbench.benchmark.engine.divergence import describe, nonfinite_losses, nonfinite_tensors
from hkdbench.benchmark.engine.records import CheckpointError, kept_weights_scores, load_weights
from hkdbench.benchmark.engine.state_dicts import load_fitting, load_state_dict_into
from hkdbench.benchmark.models.taps import TappedModel
from hkdbench.benchmark.models.zoo import create_model
from hkdbench.benchmark.recipes.resolve import teacher_run_config

CHECKPOINT, PRETRAINED, RUN = "checkpoint", "pretrained", "run"


class TeacherRunError(HkdbenchError, RuntimeError):
    """A teacher run that cannot teach: it failed, diverged, or its files are damaged."""


class TeacherUnavailableError(HkdbenchError, RuntimeError):
    """A stop request arrived while the teacher of this run was being trained (its checkpoint is saved)."""


class ProbeTeacherMissingError(HkdbenchError, RuntimeError):
    """A teacher run named by ``train.probe_teachers`` has not finished (nothing of the run is written)."""


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher of ``cfg`` (the run that distils from it) comes from: ``kind`` is CHECKPOINT, PRETRAINED
    or RUN."""

    cfg: RunConfig
    kind: str

    @property
    def name(self) -> str:
        return self.cfg.teacher.name

    @property
    def is_run(self) -> bool:
        return self.kind == RUN

    @cached_property
    def run_config(self) -> RunConfig:
        """The config of the teacher run (a RUN source)."""
        return teacher_run_config(self.cfg)

    def run_dir(self, store: RunStore) -> RunDir:
        return store.run_dir(self.run_config)

    def build(self, num_classes: int, in_chans: int) -> TappedModel:
        """The teacher's model with the weights of a CHECKPOINT or PRETRAINED source (a teacher run's are loaded
        into it by :func:`load_for_student`)."""
        teacher = create_model(self.name, num_classes, in_chans=in_chans, img_size=self.cfg.data.img_size,
                               pretrained=None if self.is_run else self.cfg.teacher.pretrained,
                               pretrained_sha256=self.cfg.teacher.pretrained_sha256)
        if self.kind == CHECKPOINT:
            load_state_dict_into(teacher.model, self.cfg.teacher.checkpoint, self.cfg.teacher.checkpoint_ema)
        return teacher

    def provenance(self) -> Dict[str, Optional[str]]:
        """Which teacher weights the run used, as its summary records them."""
        if self.kind == CHECKPOINT:
            return {"teacher_weights": "checkpoint", "teacher_run": None}
        if self.kind == PRETRAINED:
            return {"teacher_weights": f"pretrained:{self.cfg.teacher.pretrained}", "teacher_run": None}
        return {"teacher_weights": self.cfg.teacher.weights, "teacher_run": self.cfg.teacher_run}

    def label(self) -> str:
        """The teacher's weights in words (``hkdbench eval --teacher``)."""
        if self.kind == CHECKPOINT:
            return f"checkpoint {self.cfg.teacher.checkpoint}"
        if self.kind == PRETRAINED:
            return f"timm pretrained {self.cfg.teacher.pretrained}"
        return f"{self.cfg.teacher.weights} weights of {self.cfg.teacher_run}"


def teacher_source(cfg: RunConfig) -> Optional[TeacherSource]:
    """Where ``cfg``'s teacher comes from; None when the run uses none (a teacher run, the student alone)."""
    if cfg.teacher is None or not get_method(cfg.method).uses_teacher:
        return None
    if cfg.teacher.checkpoint:
        return TeacherSource(cfg, CHECKPOINT)
    return TeacherSource(cfg, PRETRAINED if cfg.teacher_recipe is None else RUN)


def teacher_provenance(cfg: RunConfig) -> Dict[str, Optional[str]]:
    source = teacher_source(cfg)
    return source.provenance() if source else {"teacher_weights": None, "teacher_run": None}


# -- a teacher run as a student's teacher ---------------------------------------------------------------------------

def load_for_student(source: TeacherSource, store: RunStore, num_classes: int, in_chans: int,
                     say: Callable[[str], None], train_run: Callable[[RunConfig], None]
                     ) -> Tuple[TappedModel, Optional[float]]:
    """The teacher and its top-1 (None when not yet known: a checkpoint's or timm's weights are measured by the
    trainer). A teacher run that has not finished is trained first by ``train_run``."""
    teacher = source.build(num_classes, in_chans)
    if not source.is_run:
        return teacher, None
    t_dir = ensure_teacher_run(source, store, say, train_run)
    which = source.cfg.teacher.weights
    recorded = load_teacher_run(teacher, t_dir, which)
    scores = kept_weights_scores(recorded, which)  # best.pt of a run with data.val_split: its selected epoch
    say(f"teacher {source.name}: the {which} weights of {t_dir.path.name} "
        f"(epoch {recorded.get(f'{scores}_epoch', '?')}, top-1 {recorded[f'{scores}_top1']:.2f})")
    return teacher, recorded[f"{scores}_top1"]


def ensure_teacher_run(source: TeacherSource, store: RunStore, say: Callable[[str], None],
                       train_run: Callable[[RunConfig], None]) -> RunDir:
    """The teacher run's directory, the run trained first when it has not finished (a FAILED one is refused)."""
    t_dir = source.run_dir(store)
    refuse_failed(t_dir)
    if not t_dir.is_done:
        say(f"teacher {source.name}: no finished run at {t_dir.path}; training it first")
        train_run(source.run_config)
    return t_dir


def refuse_failed(t_dir: RunDir) -> None:
    """A teacher run marked FAILED is not trained again for a student: a diverged run diverges again with the same
    settings."""
    if not t_dir.is_failed:
        return
    reason = t_dir.failure().get("reason", "no reason recorded")
    raise TeacherRunError(f"teacher run {t_dir.path.name} FAILED ({reason}); it cannot be a teacher. Change its "
                          "settings (teacher.<section>.<field>=value, e.g. teacher.optim.lr), or after a crash "
                          f"delete {t_dir.failed_file} to let it train again")


def load_teacher_run(teacher: TappedModel, t_dir: RunDir, which: str) -> Dict[str, Any]:
    """Loads the teacher run's ``which`` weights into ``teacher`` and returns its summary; a run that diverged
    (non-finite losses in its metrics, non-finite weights) or whose files are damaged is refused, named."""
    try:
        summary = t_dir.summary()
        seen = {k: v for record in t_dir.metrics() for k, v in nonfinite_losses(record).items()}
        state = load_weights(t_dir, which)
        bad = nonfinite_tensors(state.items())
        if seen or bad:
            raise TeacherRunError(f"diverged ({describe(seen, bad)}) though marked DONE (by an older hkdbench); "
                                  "it cannot be a teacher: train it again with --restart and other settings")
        load_fitting(teacher.model, state, str(t_dir.weights_file(which)))
    except TeacherRunError as err:
        raise TeacherRunError(f"teacher run {t_dir.path.name}: {err}") from None
    except (DamagedRunFileError, CheckpointError) as err:  # a damaged summary or weights file, named by its reader
        raise TeacherRunError(f"teacher run {t_dir.path.name} cannot be a teacher: {err}") from None
    if f"{which}_top1" not in summary:
        raise TeacherRunError(f"teacher run {t_dir.path.name}: {t_dir.summary_file} has no {which}_top1; the file "
                              "is damaged: train the run again with --restart")
    return summary


# -- the teacher runs a student alone is probed against ---------------------------------------------------------------

def check_probe_teachers(cfgs: Sequence[RunConfig], store: RunStore) -> None:
    """Raises ProbeTeacherMissingError, before anything is written, when a run to train names a probe teacher run
    (``train.probe_teachers``) that has not finished and is not the cohort's own teacher (trained first)."""
    trained_here = {c.teacher_run for c in cfgs}
    for cfg in cfgs:
        missing = [name for name in cfg.train.probe_teachers
                   if name not in trained_here and not RunDir(store.root / name).is_done]
        if missing and not store.run_dir(cfg).is_done:
            raise ProbeTeacherMissingError(
                f"{cfg.run_name()}: train.probe_teachers names teacher run(s) with no finished run in "
                f"{store.root}: {', '.join(missing)}. Train them first (a sweep trains its teachers before its "
                f"students), or leave them out of train.probe_teachers")


def load_probe_teachers(cfg: RunConfig, store: RunStore, num_classes: int, in_chans: int,
                        device) -> Dict[str, TappedModel]:
    """Run name -> the best weights of each teacher run ``cfg`` is CKA-probed against; each must have been trained
    on the run's dataset and resolution."""
    if not (cfg.train.probe_teachers and cfg.train.probe_every):
        return {}
    models = {}
    for name in cfg.train.probe_teachers:
        t_dir = RunDir(store.root / name)
        t_cfg = t_dir.config()
        if (t_cfg.data.dataset, t_cfg.data.img_size) != (cfg.data.dataset, cfg.data.img_size):
            raise ProbeTeacherMissingError(
                f"{cfg.run_name()}: probe teacher {name} was trained on {t_cfg.data.dataset} at "
                f"{t_cfg.data.img_size} px, this run on {cfg.data.dataset} at {cfg.data.img_size} px")
        teacher = create_model(t_cfg.student.name, num_classes, in_chans=in_chans, img_size=cfg.data.img_size)
        teacher.model.load_state_dict(load_weights(t_dir, "best"))
        models[name] = teacher.to(device).eval()
    return models
