"""A teacher run as a student's teacher: refused when it failed or diverged, and loaded only when its summary,
metrics and weights are whole, so that a student never starts (nor writes its run directory) on a teacher it
cannot use."""
from __future__ import annotations

from typing import Any, Dict

from hkdbench.benchmark.engine.checkpoint import CheckpointError, load_fitting, load_weights
from hkdbench.benchmark.engine.divergence import describe, nonfinite_losses, nonfinite_tensors
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.models.taps import TappedModel
from hkdbench.benchmark.core.store import DamagedRunFileError, RunDir


class TeacherRunError(HkdbenchError, RuntimeError):
    """A teacher run that cannot teach: it failed, diverged, or its files are damaged."""


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
