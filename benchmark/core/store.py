"""The run store: one directory per run, named by what it is and the hash of its resolved config
(:func:`run_name`: ``kd_resnet_mini_to_vit_mini_<dataset>_s0_<hash>``, ``teacher_<model>_...``,
``student_<model>_...`` for the student alone, ``overhead_<method>_...``).

    <runs>/<name>_<hash>/
        config.json      the resolved config (written once; a different config never lands in this directory)
        env.json         python/torch/timm versions, git sha, device, world size
        metrics.jsonl    one line per finished epoch
        steps.jsonl      one line every train.log_interval steps (the step's loss terms, lr, images/s), appended;
                         a resume drops the lines past its checkpoint
        tracking/        TensorBoard events and W&B files (train.log)
        checkpoint.pt    the latest training state (atomic: temp file + rename)
        best.pt          the student's (a teacher run's model's) weights at its best evaluated epoch by top-1,
                         rewritten when an epoch beats it (timm's model_best); a state dict of the bare timm model
        final.pt         the weights of the last epoch (timm's last), written when the run completes
        best_ema.pt      with train.ema_decay > 0: the EMA's weights at the EMA's best epoch (its own top-1),
        final_ema.pt       and at the last epoch (as OFA-KD's train.py keeps a saver per EMA)
        summary.json     the result, written only when the run completed
        DONE             completion marker (written last)
        FAILED           a JSON reason, for runs that diverged or crashed
        lock             held (flock) by the process training the run
        jobs.jsonl       one line per submission of the run (job id, executor, log paths)
    <runs>/_sweeps/<sweep id>/
        sweep.json       the sweep's manifest: preset, every run's config, one entry per invocation
        submissions.jsonl  one line per job the sweep submitted
    <runs>/_submitit/    submitit's job folders (logs, pickled jobs and results)
    <runs>/_teacher_outputs/<teacher model>_<key>/   a teacher's outputs on one data stream (engine/teacher_outputs.py)
        manifest.json    what made them (teacher weights, stream, precision, contents), its shapes, each shard's SHA-256
        epoch_<e>.pt     the logits (and pre-logits) of every step and rank of epoch e, in the pass's dtype
        lock             held (flock) by the process writing them

This module is torch-free (the analysis reads the store through it); the torch side (weights, checkpoints) is
``engine/records.py``, which takes its file names from :class:`RunDir`.

Every write is atomic, so a kill at any moment leaves either the previous or the new file, never half of one;
steps.jsonl, appended, at worst a torn last line, which its reader skips and the resume removes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from hkdbench.benchmark.core.config import OverheadConfig, RunConfig, overhead_config_from_dict, run_config_from_dict
# The naming rule is core/names.py's (the config names a run through it without importing the store); the store is
# where every other module gets a name from.
from hkdbench.benchmark.core.names import (OVERHEAD_KIND, STUDENT_ALONE, TEACHER_RUN,  # noqa: F401
                                           first_run_name, is_teacher_run_name, legacy_run_names, run_name,
                                           teacher_model_from_name)
from hkdbench.benchmark.core.errors import HkdbenchError, StoreError

DEFAULT_RUNS_DIR = "runs"
SWEEPS_DIR = "_sweeps"
SUBMITIT_DIR = "_submitit"
TEACHER_OUTPUTS_DIR = "_teacher_outputs"
CONFIG_FILE = "config.json"  # the file that makes a directory a run directory


def describe_run(config: Dict[str, Any]) -> Dict[str, Any]:
    """What a run is, from its config.json as any version stored it (:meth:`RunDir.config_record`): its kind, method,
    teacher and student models, and for a training run its dataset, recipe, seed and epochs."""
    if config.get("kind") == OVERHEAD_KIND:
        return {k: config.get(k) for k in ("method", "student", "teacher", "seed")} | {"kind": OVERHEAD_KIND}
    teacher, train = config.get("teacher") or {}, config.get("train") or {}
    return {"kind": config.get("kind"), "method": config.get("method"),
            "teacher": teacher.get("name") if isinstance(teacher, dict) else None,
            "student": (config.get("student") or {}).get("name"), "dataset": (config.get("data") or {}).get("dataset"),
            "recipe": config.get("recipe"), "seed": train.get("seed"), "epochs": train.get("epochs")}


# -- metric keys -------------------------------------------------------------------------------------------------
# The keys of metrics.jsonl's records that the engine, the methods and the probes write and the analysis reads.
LOSS_PREFIX = "loss/"          # loss/<term>: a loss term of the method (summed into the training loss)
STAT_PREFIX = "stat/"          # stat/<name>: a statistic the method logs
CONFLICT_PREFIX = "conflict/"  # conflict/<value>: the gradient-conflict probe (probes/hooks.py), per epoch
CONFLICT_COSINE = CONFLICT_PREFIX + "cosine"          # mean cosine(g_task, g_distill) over the measured steps
CONFLICT_FRACTION = CONFLICT_PREFIX + "fraction"      # share of measured steps with a negative cosine
CONFLICT_NORM_RATIO = CONFLICT_PREFIX + "norm_ratio"  # mean ||g_distill|| / ||g_task||
# steps.jsonl (every train.log_interval steps): the step's loss/<term> and stat/<name> values, "lr", "train_loss"
# and "images_per_s", at STEP_KEY, the run's optimiser steps done (the trackers' x); a tracker shows them under
# STEP_PREFIX, apart from the per-epoch values of the same names
STEP_KEY = "step"
STEP_PREFIX = "step/"
# cka/<kernel>/t{i}_s{j}: CKA of teacher stage i and student stage j against the run's own teacher;
# cka@<teacher run>/<kernel>/t{i}_s{j}: the same against a named teacher run (train.probe_teachers of a student alone)
OWN_CKA = "cka"
NAMED_CKA = "cka@"
_CKA_KEY = re.compile(rf"{OWN_CKA}(?:{NAMED_CKA[-1]}(?P<teacher_run>[^/]+))?/(?P<kernel>[^/]+)"
                      r"/t(?P<teacher_stage>\d+)_s(?P<student_stage>\d+)")


def cka_prefix(teacher_run: Optional[str] = None) -> str:
    """The prefix of the CKA keys against the run's own teacher, or against the teacher run named ``teacher_run``."""
    return OWN_CKA if teacher_run is None else f"{NAMED_CKA}{teacher_run}"


def cka_key(prefix: str, kernel: str, teacher_stage: int, student_stage: int) -> str:
    return f"{prefix}/{kernel}/t{teacher_stage}_s{student_stage}"


@dataclass(frozen=True)
class CkaKey:
    teacher_run: Optional[str]  # None: the run's own teacher
    kernel: str
    teacher_stage: int
    student_stage: int


def parse_cka_key(key: str) -> Optional[CkaKey]:
    """What a CKA key of metrics.jsonl measured; None for any other key."""
    hit = _CKA_KEY.fullmatch(key)
    if hit is None:
        return None
    return CkaKey(hit["teacher_run"], hit["kernel"], int(hit["teacher_stage"]), int(hit["student_stage"]))


def runs_root(path: Optional[str] = None) -> Path:
    return Path(path or os.environ.get("HKDBENCH_RUNS", DEFAULT_RUNS_DIR))


def check_folder(path: str | Path, what: str) -> Path:
    """``path`` is, or can be made, a folder: no NUL, no name longer than its filesystem takes, not a file and not
    below one. Raises StoreError naming ``what`` (e.g. '--out') before anything is written; returns the path."""
    path = Path(path)
    if "\0" in str(path):
        raise StoreError(f"{what} {str(path)!r} contains a NUL character, which no path may hold")
    limit = _name_max(path)
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > limit), None)
    if too_long is not None:
        raise StoreError(f"{what}: a name in the path is {len(os.fsencode(too_long))} bytes long ({too_long[:24]}"
                         f"...); the filesystem takes at most {limit} bytes per file or folder name")
    for folder in (path, *path.parents):
        if folder.exists():
            if folder.is_dir():
                return path
            where = "is a file" if folder == path else f"lies below {folder}, which is a file"
            raise StoreError(f"{what} {path} {where}, not a folder: give a folder (one that does not exist yet is "
                             "created)")
    return path


def _name_max(path: Path) -> int:
    """The longest file name (bytes) of the filesystem ``path`` is on (from its nearest folder that exists)."""
    for folder in (path, *path.parents):
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return 255


def open_temp(path: Path) -> tuple[int, str]:
    """A new temp file ``.<name>.XXXXXXXX`` beside ``path``, opened for writing. Unlike mkstemp (always 0600)
    it gets the mode the umask gives (0644 under umask 022), so colleagues sharing a run store can read results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(tempfile.TMP_MAX):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


class StoreWriteError(HkdbenchError, RuntimeError):
    """A write to the run store failed (disk full, read-only, no permission); the file written before is intact."""


# the errors that mean "this store cannot take the write", as opposed to a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


NEARLY_FULL_BYTES = 64 * 2 ** 20


def describe_write_error(path: Path, err: BaseException) -> str:
    """What failed, why, and what to do: the message of a StoreWriteError."""
    code = getattr(err, "errno", None)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: {os.strerror(code)}; the run store is not writable here. Pass --runs-dir "
                "(or set HKDBENCH_RUNS) to a writable directory, or fix its permissions")
    free = _free_bytes(Path(path).parent)
    free_text = f"{free / 2 ** 20:.0f} MiB free" if free is not None else "free space unknown"
    cause = os.strerror(code) if code is not None else f"{type(err).__name__}: {err}"
    # torch's zip writer hides the errno ("unexpected pos ..."): judge by what is left on the filesystem
    nearly_full = free is not None and free < NEARLY_FULL_BYTES
    full = "the disk is full" if code in (errno.ENOSPC, errno.EDQUOT) or nearly_full else "is the disk full?"
    return (f"cannot write {path} ({cause}); {full} ({free_text} on its filesystem). Nothing was half-written: "
            f"the previous {Path(path).name}, if any, is intact. Free space, then continue with --resume")


def _free_bytes(path: Path) -> Optional[int]:
    for folder in (path, *path.parents):
        if folder.exists():
            return shutil.disk_usage(folder).free
    return None


def _is_write_failure(err: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError of its zip writer ("unexpected pos ...", "failed writing")
    return isinstance(err, RuntimeError) or (isinstance(err, OSError) and err.errno in WRITE_ERRNOS)


@contextlib.contextmanager
def atomic_replace(path: Path) -> Iterator[str]:
    """Yields a temp file beside ``path`` to write; renames it onto ``path`` when the block succeeds, else
    removes it (a failed write leaves the old file and no partial one) and explains a disk-full/read-only error."""
    try:
        fd, tmp = open_temp(path)
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise StoreWriteError(describe_write_error(path, err)) from err
        raise
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_write_failure(err) and not isinstance(err, StoreWriteError):
            raise StoreWriteError(describe_write_error(path, err)) from err
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_replace(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# Every file of the store is strict JSON (RFC 8259: no bare NaN or Infinity, which strict readers reject). A
# non-finite number is written as null, and the mapping that holds it names it under this key with the value's
# spelling ('nan', 'inf', '-inf'); the store's readers put the number back.
NONFINITE_KEY = "nonfinite"


def to_strict_json(obj: Any) -> Any:
    """``obj`` with each non-finite float made null; a mapping lists its own under NONFINITE_KEY (an item of a list
    is only made null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        seen = {k: repr(float(v)) for k, v in obj.items() if isinstance(v, float) and not math.isfinite(v)}
        out = {k: to_strict_json(v) for k, v in obj.items()}
        return {**out, NONFINITE_KEY: seen} if seen else out
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    return obj


def from_strict_json(obj: Any) -> Any:
    """The inverse of :func:`to_strict_json`: the numbers a mapping names under NONFINITE_KEY put back. A file
    written before the store was strict (bare NaN) reads as it always did."""
    if isinstance(obj, dict):
        out = {k: from_strict_json(v) for k, v in obj.items() if k != NONFINITE_KEY}
        seen = obj.get(NONFINITE_KEY)
        if isinstance(seen, dict):
            out.update({k: float(v) for k, v in seen.items() if out.get(k) is None and v in ("nan", "inf", "-inf")})
        return out
    if isinstance(obj, list):
        return [from_strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (:func:`to_strict_json`); anything else non-finite is an error, not a bare NaN."""
    return json.dumps(to_strict_json(obj), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    return from_strict_json(json.loads(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json_or_none(path: Path) -> Optional[Dict[str, Any]]:
    """A JSON file's content; None when it is missing or does not parse."""
    try:
        return loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path, hint: str = "") -> List[Dict[str, Any]]:
    """The records of a JSON-lines file ([] when it is missing); a line that does not parse (torn by a kill or an
    edit) is skipped with a warning naming the file and the line, never silently."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = loads(line.decode())
        except ValueError:  # UnicodeDecodeError too: a line of other bytes
            record, what = None, "not valid JSON"
        else:
            what = "not a JSON object"
        if isinstance(record, dict):
            records.append(record)
        else:
            warnings.warn(f"{path}: line {number} is {what} (torn or edited); skipped.{hint}", stacklevel=3)
    return records


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps(record, sort_keys=True) + "\n")


def check_writable(path: Path) -> None:
    """Before a run's first write: its directory (or the nearest existing folder above it) must be writable."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not os.access(folder, os.W_OK):
                raise StoreWriteError(describe_write_error(folder, OSError(errno.EROFS if _read_only(folder)
                                                                           else errno.EACCES, "")))
            return


def _read_only(folder: Path) -> bool:
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


def _open_lock_file(folder: Path, lock_file: Path):
    """``lock_file`` in ``folder`` (created), open for a flock; a store that cannot be written is a StoreWriteError
    naming the file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return open(lock_file, "a+")
    except OSError as err:
        if err.errno in WRITE_ERRNOS:
            raise StoreWriteError(describe_write_error(lock_file, err)) from err
        raise


def git_sha() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def timestamp() -> str:
    """Now, in the run store's :data:`hkdbench.TIME_FORMAT`."""
    from hkdbench import TIME_FORMAT

    return time.strftime(TIME_FORMAT)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# (which, ema) -> file name; which is 'best' or 'last' (config.WEIGHTS_KINDS)
WEIGHTS_FILES = {("best", False): "best.pt", ("last", False): "final.pt",
                 ("best", True): "best_ema.pt", ("last", True): "final_ema.pt"}


# the name mkstemp gives an atomic write's temp file: "." + target name + "." + 8 random characters
_TEMP_FILE = re.compile(r"\.(.+)\.[a-z0-9_]{8}")


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / CONFIG_FILE)
    env_file = property(lambda self: self.path / "env.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    steps_file = property(lambda self: self.path / "steps.jsonl")  # one line every train.log_interval steps
    checkpoint_file = property(lambda self: self.path / "checkpoint.pt")
    summary_file = property(lambda self: self.path / "summary.json")
    done_file = property(lambda self: self.path / "DONE")
    failed_file = property(lambda self: self.path / "FAILED")
    log_file = property(lambda self: self.path / "log.txt")
    jobs_file = property(lambda self: self.path / "jobs.jsonl")
    lock_file = property(lambda self: self.path / "lock")
    tracking_dir = property(lambda self: self.path / "tracking")  # TensorBoard events, W&B's offline files

    def weights_file(self, which: str, ema: bool = False) -> Path:
        """Where the run keeps its ``which`` ('best' or 'last') weights (the EMA's with ``ema``)."""
        if (which, ema) not in WEIGHTS_FILES:
            raise ValueError(f"weights must be 'best' or 'last', got {which!r}")
        return self.path / WEIGHTS_FILES[which, ema]

    # -- state ----------------------------------------------------------------------------------------------------
    @property
    def is_done(self) -> bool:
        return self.done_file.exists() and self.summary_file.exists()

    @property
    def is_failed(self) -> bool:
        return self.failed_file.exists() and not self.is_done

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.exists()

    def status(self) -> str:
        if self.is_done:
            return "done"
        if self.is_failed:
            return "failed"
        if self.is_locked():
            return "running"
        if self.has_checkpoint:
            return "partial"
        return "pending"

    def config(self) -> RunConfig:
        """A training run's config; a config.json this version cannot read as one is named, with what to do."""
        return self._typed_config(run_config_from_dict, overhead=False)

    def overhead_config(self) -> OverheadConfig:
        """An overhead measurement's config (benchmark/tools/overhead.py), read as :meth:`config` reads a run's."""
        return self._typed_config(overhead_config_from_dict, overhead=True)

    def _typed_config(self, build: Callable[[Dict[str, Any]], Any], overhead: bool) -> Any:
        body = self.config_record()
        what = "an overhead config" if overhead else "a run config"
        if (body.get("kind") == OVERHEAD_KIND) != overhead:
            other = "a training run's" if overhead else "an overhead measurement's (no weights, no epochs)"
            raise StoreError(f"{self.config_file} holds {other} config, not {what}")
        try:
            return build(body)
        except HkdbenchError as err:
            raise StoreError(f"{self.config_file} does not hold {what} ({err.message()}); {_MOVE_IT}") from None

    def config_record(self) -> Dict[str, Any]:
        """config.json as stored, whatever version of hkdbench wrote it (the analysis reads every run's, also of
        fields this version does not know); a damaged one is named, with what to do."""
        try:
            body = loads(self.config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedRunFileError(f"{self.config_file} is not valid JSON ({err}); {_MOVE_IT}",
                                      NOT_JSON) from None
        if not isinstance(body, dict):
            raise DamagedRunFileError(f"{self.config_file} holds a JSON {type(body).__name__}, not a run config; "
                                      f"{_MOVE_IT}", NOT_AN_OBJECT)
        return body

    def summary(self) -> Dict[str, Any]:
        """summary.json; a damaged one is named, with what to do."""
        return _read_record(self.summary_file, "the run's result: train it again with --restart, or put back a "
                                               "good copy")

    def env(self) -> Dict[str, Any]:
        """env.json: the versions, git sha, device and world size the run ran with (engine/environment.py)."""
        return _read_record(self.env_file, "the run's hardware and versions: put back a good copy")

    def failure(self) -> Dict[str, Any]:
        """FAILED: the reason and details of a failed run."""
        return _read_record(self.failed_file, "the record of why the run failed: delete it to train the run again")

    def metrics(self) -> List[Dict[str, Any]]:
        """The epoch records; a torn line is skipped with a warning whose advice fits the run's state: an unfinished
        run's next open rewrites the file from its checkpoint, a finished one is never opened again."""
        if self.is_done:
            hint = (" The run is DONE, so nothing rewrites the file (--resume skips it): its summary stands, the "
                    "curves lack that epoch; --restart trains the run again")
        else:
            hint = " Resume the run (--resume) to rewrite the file from its checkpoint"
        return read_jsonl(self.metrics_file, hint)

    def steps(self) -> List[Dict[str, Any]]:
        """The per-step records (STEP_KEY ascending); a line torn by a kill is skipped with a warning (a resume
        rewrites the file through its checkpoint's step)."""
        return read_jsonl(self.steps_file, "" if self.is_done else " Resume the run to rewrite the file")

    def jobs(self) -> List[Dict[str, Any]]:
        """The run's submission records, oldest first."""
        return read_jsonl(self.jobs_file)

    # -- writes ---------------------------------------------------------------------------------------------------
    def claim(self, cfg: RunConfig) -> None:
        """Creates the directory for ``cfg``, or checks that the existing one holds the same config."""
        check_writable(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        body = cfg.to_dict()
        if self.config_file.exists():
            # the same run whatever its non-result settings (train.log, data.workers, ...) or fields added since
            if self.config().run_hash() != cfg.run_hash():
                raise StoreError(f"{self.path} holds a different config (hash collision or a hand edit); "
                                 "refusing to overwrite another run")
        else:
            atomic_write_json(self.config_file, body)

    def remove_stray_temp_files(self) -> List[str]:
        """Deletes the temp files of atomic writes cut off by a kill (``.checkpoint.pt.XXXXXXXX``, ...).
        Call it only under the run's lock: a live writer holds that lock, so no temp file in use is removed."""
        removed = []
        for path in self.path.glob(".*"):
            if path.is_file() and _TEMP_FILE.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path.name)
        return sorted(removed)

    def write_metrics(self, records: List[Dict[str, Any]]) -> None:
        atomic_write_bytes(self.metrics_file, "".join(dumps(r, sort_keys=True) + "\n" for r in records).encode())

    def append_steps(self, records: List[Dict[str, Any]]) -> None:
        """Adds per-step records in one write of whole lines: a kill tears at most the last line, which the reader
        skips."""
        if records:
            with open(self.steps_file, "ab") as f:
                f.write("".join(dumps(r, sort_keys=True) + "\n" for r in records).encode())

    def keep_steps_through(self, step: int) -> None:
        """Drops the per-step records after optimiser step ``step`` (those a killed attempt logged past its
        checkpoint, which the resumed run logs again) and any torn line, atomically; no file when none is kept."""
        if not self.steps_file.exists():
            return
        with warnings.catch_warnings():  # a torn line is what this repairs
            warnings.simplefilter("ignore")
            kept = [r for r in self.steps() if isinstance(r.get(STEP_KEY), int) and r[STEP_KEY] <= step]
        if kept:
            atomic_write_bytes(self.steps_file, "".join(dumps(r, sort_keys=True) + "\n" for r in kept).encode())
        else:
            self.steps_file.unlink()

    def mark_failed(self, reason: str, **details: Any) -> None:
        atomic_write_json(self.failed_file, {"reason": reason, **details,
                                             "time": timestamp()})

    def mark_done(self, summary: Dict[str, Any]) -> None:
        atomic_write_json(self.summary_file, summary)
        with contextlib.suppress(FileNotFoundError):
            self.failed_file.unlink()
        atomic_write_bytes(self.done_file, b"")

    def remove_checkpoint(self) -> None:
        """Drops the resume state of a DONE run (its kept weights and summary stay): only a resume reads it."""
        if self.is_done:
            with contextlib.suppress(FileNotFoundError):
                self.checkpoint_file.unlink()

    def store_measurement(self, cfg: OverheadConfig, env: Dict[str, Any], summary: Dict[str, Any]) -> None:
        """A finished measurement run (the overhead benchmark's, under the run's lock): its config, environment
        and result, replacing an earlier measurement of the same config."""
        self.reset()
        atomic_write_json(self.config_file, cfg.to_dict())
        atomic_write_json(self.env_file, env)
        self.mark_done(summary)

    def reset(self) -> None:
        """Forgets the run's progress (``--restart``); keeps config.json."""
        kept = [self.path / name for name in WEIGHTS_FILES.values()]
        for f in (self.checkpoint_file, self.summary_file, self.done_file, self.failed_file, self.metrics_file,
                  self.steps_file, *kept):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        shutil.rmtree(self.tracking_dir, ignore_errors=True)  # a restarted run's curves start afresh

    # -- locking --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        """An exclusive flock on ``lock``: never two processes training the same run."""
        with _open_lock_file(self.path, self.lock_file) as f:
            flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(f, flags)
            except BlockingIOError:
                raise RunLockedError(f"{self.path} is being trained by another process") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_locked(self) -> bool:
        return _flock_held(self.lock_file)


def _flock_held(lock_file: Path) -> bool:
    """Whether a live process holds the flock on ``lock_file``."""
    if not lock_file.exists():
        return False
    with open(lock_file) as f:  # read-only: status works on a store it cannot write (flock needs none)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


class RunLockedError(HkdbenchError, RuntimeError):
    pass


_MOVE_IT = "the run directory is damaged: move it away (or delete it) and run again"


# The fields of a sweep's records, written by the sweep (sweep/dispatch.py) and read by `hkdbench status|report
# <sweep>` and the report's provenance. sweep.json: the sweep's id, its preset, its run store, one entry per `hkdbench
# sweep` that submitted it (when, with which executor and command line, in cohorts or not) and its runs (each with its
# name, kind, the teacher run it needs, the grid cells it serves and its config). submissions.jsonl: one line per run a
# job trained, the job's record with the run's directory name and the time.
SWEEP_ID, SWEEP_PRESET, SWEEP_RUNS_DIR = "sweep", "preset", "runs_dir"
SWEEP_INVOCATIONS, SWEEP_RUNS = "invocations", "runs"
INVOKED_AT, INVOKED_EXECUTOR, INVOKED_COMMAND, INVOKED_COHORT = "time", "executor", "command", "cohort"
RUN_NAME, RUN_KIND, RUN_TEACHER_RUN, RUN_CELLS, RUN_CONFIG = "name", "kind", "teacher_run", "cells", "config"
SUBMITTED_RUN, SUBMITTED_AT = "run", "time"


def _manifest_problem(body: Any) -> str:
    """What is wrong with the fields a sweep.json holds ('' when nothing; each reader needs only some of them)."""
    if not isinstance(body, dict):
        return f"a JSON {type(body).__name__}, not an object"
    runs = body.get(SWEEP_RUNS, [])
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get(RUN_CONFIG), dict)
                                             and isinstance(r.get(RUN_KIND), str) for r in runs):
        return f"its '{SWEEP_RUNS}' are not a list of runs, each with its '{RUN_KIND}' and '{RUN_CONFIG}'"
    if not isinstance(body.get(SWEEP_INVOCATIONS, []), list):
        return f"its '{SWEEP_INVOCATIONS}' are not a list"
    return ""


NOT_JSON, NOT_AN_OBJECT = "not valid JSON", "not a JSON object"  # what is wrong with a damaged record, in brief


class DamagedRunFileError(StoreError, ValueError):
    """A file of a run directory exists but does not hold what the store wrote there; ``why`` says what is wrong in
    brief (:data:`NOT_JSON`, :data:`NOT_AN_OBJECT`), for a reader that names the file in words of its own."""

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


def _read_record(path: Path, what: str) -> Dict[str, Any]:
    """A JSON object the store wrote (a summary, a FAILED record); one that does not parse is named."""
    try:
        record = loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedRunFileError(f"{path} is damaged ({NOT_JSON}: {err}); it holds {what}", NOT_JSON) from None
    if not isinstance(record, dict):
        raise DamagedRunFileError(f"{path} is damaged (a JSON {type(record).__name__}, not an object); it holds "
                                  f"{what}", NOT_AN_OBJECT)
    return record


class RunStore:
    def __init__(self, root: Optional[str | Path] = None):
        what = "--runs-dir" if root else "HKDBENCH_RUNS" if os.environ.get("HKDBENCH_RUNS") else "the run store"
        self.root = check_folder(runs_root(str(root) if root else None), what)

    def run_dir(self, cfg: RunConfig | OverheadConfig) -> RunDir:
        """The run's directory: under its name, or under the name an earlier version gave it where the run is
        stored there (:func:`legacy_run_names`), so that a finished run is found and not trained again."""
        named = RunDir(self.root / run_name(cfg))
        if named.config_file.exists():
            return named
        stored = (RunDir(self.root / name) for name in legacy_run_names(cfg))
        return next((rd for rd in stored if rd.config_file.exists()), named)

    def runs(self) -> List[RunDir]:
        if not self.root.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.root.iterdir()) if (p / CONFIG_FILE).exists()]

    def all_runs(self) -> List[RunDir]:
        """Every run directory under the root at any depth (stores copied side by side under one folder), sorted;
        the root must exist. A folder whose name starts with '.' (a temp copy) holds none."""
        if not self.root.is_dir():
            raise StoreError(f"run store {str(self.root)!r} does not exist (--runs-dir, or HKDBENCH_RUNS)")
        found = sorted(p.parent for p in self.root.rglob(CONFIG_FILE) if not p.parent.name.startswith("."))
        return [RunDir(path) for path in found]

    def sweep_dir(self, sweep_id: str) -> "SweepDir":
        return SweepDir(self.root / SWEEPS_DIR / sweep_id)

    def sweeps(self) -> List["SweepDir"]:
        """The store's sweeps that have a manifest, by id."""
        found = (SweepDir(path) for path in sorted((self.root / SWEEPS_DIR).glob("*")))
        return [sweep for sweep in found if sweep.exists]

    @property
    def submitit_folder(self) -> Path:
        return self.root / SUBMITIT_DIR

    def teacher_outputs_dir(self, name: str) -> "TeacherOutputsDir":
        return TeacherOutputsDir(self.root / TEACHER_OUTPUTS_DIR / name)

    def teacher_outputs(self) -> List["TeacherOutputsDir"]:
        """The store's stored teacher outputs that have a manifest, by name."""
        found = (TeacherOutputsDir(path) for path in sorted((self.root / TEACHER_OUTPUTS_DIR).glob("*")))
        return [outputs for outputs in found if outputs.manifest_file.exists()]


class TeacherOutputsDir:
    """A teacher's stored outputs on one data stream: ``manifest.json`` (what made them, each finished epoch's shard
    and its SHA-256, written after the shard), ``epoch_<e>.pt`` shards (atomic), ``lock``. A shard that the manifest
    does not list, or lists with another SHA-256, is not taken."""

    def __init__(self, path: Path):
        self.path = Path(path)

    manifest_file = property(lambda self: self.path / "manifest.json")
    lock_file = property(lambda self: self.path / "lock")

    def shard_file(self, epoch: int) -> Path:
        return self.path / f"epoch_{epoch}.pt"

    def manifest(self) -> Optional[Dict[str, Any]]:
        """manifest.json, None when there is none yet; a damaged one raises DamagedRunFileError."""
        return _read_record(self.manifest_file, "the stored teacher outputs' manifest") \
            if self.manifest_file.exists() else None

    def write_manifest(self, body: Dict[str, Any]) -> None:
        atomic_write_json(self.manifest_file, body)

    def remove_stray_temp_files(self) -> List[str]:
        """Temp files a killed writer left (call under the lock)."""
        return RunDir.remove_stray_temp_files(self)  # type: ignore[arg-type]  # the same rule on its folder

    def is_locked(self) -> bool:
        return _flock_held(self.lock_file)

    def describe(self) -> str:
        """One line for ``hkdbench status``: whose outputs, what they hold, how many epochs, being written or not."""
        manifest = self.manifest() or {}
        made_by = manifest.get("made_by", {})
        teacher = made_by.get("teacher", {})
        source = teacher.get("run") or teacher.get("pretrained") or "checkpoint"
        state = "being written" if self.is_locked() else "idle"
        return (f"teacher outputs {self.path.name}: {teacher.get('model', '?')} ({source}), "
                f"{' + '.join(made_by.get('contents', []))}, seed {made_by.get('stream', {}).get('seed', '?')}, "
                f"{len(manifest.get('shards', {}))} epoch(s) stored, {state}")

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive flock on ``lock``: one writer at a time (readers of finished shards need none: a shard is
        renamed into place whole and listed in the manifest after)."""
        with _open_lock_file(self.path, self.lock_file) as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


class SweepDir:
    """A sweep's records: ``sweep.json`` (its manifest) and ``submissions.jsonl``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    manifest_file = property(lambda self: self.path / "sweep.json")
    submissions_file = property(lambda self: self.path / "submissions.jsonl")

    @property
    def exists(self) -> bool:
        return self.manifest_file.exists()

    def manifest(self) -> Dict[str, Any]:
        """sweep.json: the sweep's id, preset, run store, invocations and runs (the fields :data:`SWEEP_ID` and those
        beside it); a file without them is named as damaged."""
        try:
            body = loads(self.manifest_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            body, why = None, f"not valid JSON: {err}"
        else:
            why = _manifest_problem(body)
        if why:
            raise StoreError(f"{self.manifest_file} is damaged ({why}); it is the sweep's record of its runs: "
                             "submit the sweep again (its runs are kept) to rewrite it, or put back a good copy")
        return body

    def write_manifest(self, body: Dict[str, Any]) -> None:
        atomic_write_json(self.manifest_file, body)

    def record_submission(self, record: Dict[str, Any]) -> None:
        append_jsonl(self.submissions_file, record)

    def submissions(self) -> List[Dict[str, Any]]:
        return read_jsonl(self.submissions_file)
