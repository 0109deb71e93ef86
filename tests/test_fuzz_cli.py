"""The command line fuzzed (issue 26, item 3), in-process through ``cli.main(argv)``, with Hypothesis: config overrides
(every field of the config dataclasses, odd values), command-line numbers and names, damaged store files and odd
paths. Every input must end in one of two ways:

* exit 0 with a result (the plan of a dry run, a status table, an evaluation, written files), or
* exit 2 with a one-line message that names the field, flag or file at fault, and nothing written;

never a traceback, never a bug's exit (70), never a write before an error. Nothing trains: runs are planned with
``--dry-run``; the one store that is read (a tiny sweep's teacher and student runs, trained once per session) is
copied for each example. Deterministic (``derandomize``) and without an example database (Hypothesis keeps only its
character tables in .hypothesis/, ignored by git). Per kind of input, how many ran and how they ended is printed at
the end (``COUNTS``); HKDBENCH_FUZZ_SCALE=10 runs ten times as many examples of each test."""
import collections
import contextlib
import dataclasses
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.config import DataConfig, OptimConfig, TrainConfig

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SCALE = float(os.environ.get("HKDBENCH_FUZZ_SCALE", "1"))  # more (or fewer) examples per test


COUNTS = collections.Counter()


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, int(examples * SCALE)))


# the tiny sweep of the store the damaged-file and path examples read (teacher run, kd student run, sweep records)
DATA = ["data.train_subset=64", "data.eval_subset=32", "data.batch_size=32"]
GRID = ["--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "kd", "--seeds", "0", "recipe=demo",
        "train.epochs=1", *DATA, "teacher.train.epochs=1", *[f"teacher.{d}" for d in DATA]]
TEACHER = ["teacher", "--model", "resnet_mini", "--recipe", "demo", *DATA]
STUDENT = ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "kd", "--recipe", "demo", *DATA]

# odd values of every kind: non-finite, negative, huge, empty, wrong type, not UTF-8 (a surrogate-escaped byte)
ODD_VALUES = ["inf", "-inf", ".inf", "-.inf", "nan", ".nan", "-1", "0", "-0.0", "1e308", "1e-320", str(10 ** 30),
              "[]", "[1, 2, 3]", "[inf]", "[nan, 1]", "{}", "{a: 1}", "''", "null", "~", "true", "no", "abc", "ü",
              "\udcff", "1,2", "0x10", "3.5", "-3.5", "1e3", "[", "}", "'", "a: b", "- x", "!!python/none"]


def _fields(section, cls):
    return [f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.init]


CONFIG_KEYS = (_fields("data", DataConfig) + _fields("optim", OptimConfig) + _fields("train", TrainConfig)
               + ["method.temperature", "data.nope", "optim", "train..epochs", "model.name", "teacher.train.epochs",
                  "teacher.optim.lr", "teacher.data.img_size", "teacher.data", "method.kd.temperature"])

values = st.one_of(st.sampled_from(ODD_VALUES), st.integers(-10 ** 20, 10 ** 20).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=6))


def _tree(root):
    """Every path under ``root`` with its size and modification time: what a command wrote."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            out[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns) if name in filenames else None
    return out


def _run(argv):
    """main(argv) with stdout and stderr as a terminal's: byte streams, strict UTF-8 (a path that is not UTF-8 must
    not fail the command); returns (exit code, stdout, stderr)."""
    streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
               for _ in range(2)]
    with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
        code = main(argv)
    return (code, *(s.buffer.getvalue().decode("utf-8", "surrogateescape") for s in streams))


def _check(argv, world, names, kind, result_in=None):
    """Runs ``argv``; asserts the outcome is exit 0 with a result or exit 2 with a message naming one of ``names``
    and nothing written under ``world`` (except ``result_in`` on success)."""
    before = _tree(world)
    code, out, err = _run(argv)
    COUNTS[kind, code] += 1
    assert "Traceback" not in out + err, err
    assert code in (0, 2), f"exit {code} for {argv}: {err}"
    errors = [line for line in err.splitlines() if ": error: " in line]
    if code == 2:
        assert len(errors) == 1, err
        assert any(name and name in errors[0] for name in names), f"{argv}: the message names none of {names}: {err}"
        assert _tree(world) == before, f"{argv} wrote before failing: {err}"
    else:
        assert out.strip() or result_in is not None, f"{argv}: exit 0 without a result"
        after = {k: v for k, v in _tree(world).items() if result_in is None or not k.startswith(result_in)}
        assert after == {k: v for k, v in before.items() if result_in is None or not k.startswith(result_in)}
    return code, err


@pytest.fixture(scope="module", autouse=True)
def offline_hub_and_counts(request):
    """No example may reach the network (a --teacher-pretrained name is looked up in the hub cache only); at the end,
    one line per kind of input: how many ran and how they ended (the figures in docs/reference/failures.md)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for kind in sorted({kind for kind, _ in COUNTS}):
            ends = ", ".join(f"{n} exit {code}" for (k, code), n in sorted(COUNTS.items()) if k == kind)
            print(f"\nfuzz: {kind}: {sum(n for (k, _), n in COUNTS.items() if k == kind)} inputs ({ends})", end="")


@pytest.fixture(scope="module")
def world_template(tmp_path_factory, fmnist_available_module):
    """A store with a finished tiny sweep (teacher run, kd student run, sweep.json, job records)."""
    root = tmp_path_factory.mktemp("world")
    runs = root / "runs"
    assert main(["sweep", *GRID, "--executor", "inline", "--runs-dir", str(runs)]) == 0
    (sweep,) = (runs / "_sweeps").iterdir()
    (teacher,) = runs.glob("teacher_*")
    (student,) = runs.glob("kd_*")
    (root / "afile").write_text("a file, not a folder")
    for command in ("teacher --dry-run", "train --resume --dry-run"):  # they plan the stored runs
        code, out, _ = _run(DAMAGED_COMMANDS[command](World.at(root), None))
        assert code == 0 and "done" in out and "pending" not in out, out
    return root, {"sweep": sweep.name, "teacher": teacher.name, "student": student.name}


@pytest.fixture(scope="module")
def fmnist_available_module():
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")


class World:
    """A fresh copy of the template for one example (removed after it)."""

    def __init__(self, template):
        root, self.names = template
        self.root = Path(tempfile.mkdtemp(prefix="fuzz-"))
        shutil.copytree(root, self.root, dirs_exist_ok=True)
        self.runs = self.root / "runs"

    @classmethod
    def at(cls, root):
        world = cls.__new__(cls)
        world.root, world.runs, world.names = root, root / "runs", {}
        return world

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        shutil.rmtree(self.root, ignore_errors=True)


# -- 1. config overrides ------------------------------------------------------------------------------------------

COMMANDS = {"teacher": TEACHER, "train": STUDENT,
            "sweep": ["sweep", "--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "kd", "--seeds", "0",
                      "recipe=demo", *DATA]}


@fuzz(400)
@given(command=st.sampled_from(sorted(COMMANDS)),
       overrides=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), values), min_size=1, max_size=3))
def test_config_overrides(fmnist_available, command, overrides):
    with tempfile.TemporaryDirectory() as world:
        items = [f"{key}={value}" for key, value in overrides]
        names = [n for key, value in overrides for n in _names(key, value)]
        argv = [*COMMANDS[command], *items, "--dry-run", "--runs-dir", os.path.join(world, "runs")]
        code, _ = _check(argv, world, names, "config override")
        assert code == 2 or not os.path.exists(os.path.join(world, "runs"))  # a dry run writes nothing


def _names(key, value):
    """What a message about ``key=value`` may name it by: the key, its field, a section that is not one of a run's
    (method, teacher, model, ...: the message is about the section), the value where it is distinctive or quoted."""
    section, field = key.split(".")[0], key.split(".")[-1]
    return [key, field, section if section not in ("data", "optim", "train") else "",
            value if len(value) > 3 else "", repr(value)]


# -- 2. command-line numbers and names ----------------------------------------------------------------------------

SWEEP = [*COMMANDS["sweep"], "--dry-run"]
FLAGS = {  # flag -> the command line it is added to
    "--parallel": SWEEP, "--time": SWEEP, "--gpus-per-node": SWEEP, "--cpus-per-task": SWEEP, "--mem-gb": SWEEP,
    "--array-parallelism": SWEEP, "--signal-delay-s": SWEEP, "--seeds": SWEEP,
    "--executor": SWEEP, "--methods": SWEEP, "--students": SWEEP, "--teachers": SWEEP,
    "--seed": [*TEACHER, "--dry-run"], "--epochs": [*TEACHER, "--dry-run"], "--device": [*TEACHER, "--dry-run"],
    "--recipe": [*TEACHER, "--dry-run"], "--dataset": [*TEACHER, "--dry-run"], "--model": [*TEACHER, "--dry-run"],
    "--method": [*STUDENT, "--dry-run"], "--teacher-weights": [*STUDENT, "--dry-run"],
    "--student": [*STUDENT, "--dry-run"], "--teacher-recipe": [*STUDENT, "--dry-run"],
    "--teacher-pretrained": [*STUDENT, "--dry-run"], "--metric": ["table"], "--format": ["export", "RUN"],
    "--weights": ["eval", "RUN", "data.eval_subset=32"],
}
ARG_VALUES = st.one_of(st.sampled_from(["-1", "0", "1", "2", "inf", "nan", "1e9", str(10 ** 30), "-0", "", " ", ",",
                                        "x", "kd,kd", "none,", "cuda:9", "cpu", "auto", "best", "last", "timm", "onnx",
                                        "best_top1", "demo", "\udcff", "ü", "resnet_mini", "local", "slurm"]),
                       st.integers(-5, 5).map(str))


@fuzz(250)
@given(flag=st.sampled_from(sorted(FLAGS)), value=ARG_VALUES)
def test_command_line_arguments(world_template, flag, value):
    with World(world_template) as w:
        base = [str(w.runs / w.names["teacher"]) if a == "RUN" else a for a in FLAGS[flag]]
        store = ["--runs-dir", str(w.runs)] if base[0] in ("sweep", "teacher", "train", "table") else []
        out = ["--out", str(w.root / "out")] if base[0] in ("table", "export") else []
        argv = [*base, *store, *out, f"{flag}={value}"]
        word = flag.lstrip("-")
        _check(argv, w.root, [flag, word, word.rstrip("s"), *_names("", value)], "argument", "out")


# -- 3. damaged store files ---------------------------------------------------------------------------------------

RUN_FILES = ["config.json", "summary.json", "metrics.jsonl", "best.pt", "final.pt", "checkpoint.pt", "env.json",
             "DONE", "jobs.jsonl"]
DAMAGES = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"", "garbage": lambda b: b"\x80\x04garbage",
           "not UTF-8": lambda b: b"\xff\xfe\xfd", "a JSON list": lambda b: b"[]", "JSON null": lambda b: b"null",
           "an empty object": lambda b: b"{}", "wrong types": lambda b: b'{"best_top1": "x", "kind": 7, "runs": 1}',
           "a torn last line": lambda b: b + b'{"epoch": 9, "to', "deleted": None}
DAMAGED_COMMANDS = {
    "eval": lambda w, run: ["eval", str(w.runs / run), "data.eval_subset=32"],
    "eval --teacher": lambda w, run: ["eval", str(w.runs / w.names["student"]), "--teacher", "data.eval_subset=32"],
    "eval --weights last": lambda w, run: ["eval", str(w.runs / run), "--weights", "last", "data.eval_subset=32"],
    "export": lambda w, run: ["export", str(w.runs / run), "--format", "safetensors", "--out", str(w.root / "out")],
    "status": lambda w, run: ["status", w.names["sweep"], "--runs-dir", str(w.runs)],
    "collect": lambda w, run: ["collect", "--runs-dir", str(w.runs), "--out", str(w.root / "out")],
    "table": lambda w, run: ["table", "--runs-dir", str(w.runs), "--out", str(w.root / "out")],
    "teacher --dry-run": lambda w, run: [*TEACHER, "train.epochs=1", "--dry-run", "--runs-dir", str(w.runs)],
    "train --resume --dry-run": lambda w, run: [*STUDENT, "train.epochs=1", "teacher.train.epochs=1",
                                                *[f"teacher.{d}" for d in DATA], "--resume", "--dry-run", "--runs-dir",
                                                str(w.runs)],
    "sweep --dry-run": lambda w, run: ["sweep", *GRID, "--dry-run", "--runs-dir", str(w.runs)],
}


def _damage(path: Path, how: str) -> None:
    if DAMAGES[how] is None:
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(DAMAGES[how](path.read_bytes() if path.exists() else b""))


@fuzz(300)
@given(run=st.sampled_from(["teacher", "student"]), file=st.sampled_from(RUN_FILES + ["sweep.json"]),
       how=st.sampled_from(sorted(DAMAGES)), command=st.sampled_from(sorted(DAMAGED_COMMANDS)))
def test_damaged_store_files(world_template, run, file, how, command):
    with World(world_template) as w:
        name = w.names[run]
        path = (w.runs / "_sweeps" / w.names["sweep"] / file) if file == "sweep.json" else w.runs / name / file
        _damage(path, how)
        argv = DAMAGED_COMMANDS[command](w, name)
        _check(argv, w.root, [str(path), path.name, name, w.names["sweep"]], "damaged file", "out")


# -- 4. odd paths -------------------------------------------------------------------------------------------------

PATH_KINDS = {
    "a file": lambda w: w.root / "afile", "below a file": lambda w: w.root / "afile" / "sub",
    "a name over 255 bytes": lambda w: w.root / ("n" * 256) / "x", "not UTF-8": lambda w: w.root / os.fsdecode(b"\xff"),
    "missing": lambda w: w.root / "missing" / "deeper", "an empty folder": lambda w: _folder(w.root / "empty"),
    "the store itself": lambda w: w.runs, "relative dots": lambda w: w.root / ".." / w.root.name / "afile" / "..",
    "spaces and unicode": lambda w: w.root / "a b ü",
}
PATH_USES = {  # where the path goes, and the flag or word a message names it by
    "--runs-dir of teacher": lambda p, w: ([*TEACHER, "--dry-run", "--runs-dir", p], "--runs-dir"),
    "--runs-dir of sweep": lambda p, w: ([*SWEEP, "--runs-dir", p], "--runs-dir"),
    "--runs-dir of status": lambda p, w: (["status", w.names["sweep"], "--runs-dir", p], "--runs-dir"),
    "--runs-dir of collect": lambda p, w: (["collect", "--runs-dir", p, "--out", str(w.root / "out")], "--runs-dir"),
    "--out of collect": lambda p, w: (["collect", "--runs-dir", str(w.runs), "--out", p], "--out"),
    "--out of export": lambda p, w: (["export", str(w.runs / w.names["teacher"]), "--format", "safetensors",
                                      "--out", p], "--out"),
    "data.root": lambda p, w: ([*TEACHER, "--dry-run", "--runs-dir", str(w.runs), f"data.root={p}"], "data.root"),
    "--data-root of eval": lambda p, w: (["eval", str(w.runs / w.names["teacher"]), "--data-root", p],
                                         "data.root"),
    "--teacher-checkpoint": lambda p, w: ([*STUDENT, "--dry-run", "--runs-dir", str(w.runs), "--teacher-checkpoint",
                                          p], "teacher checkpoint"),
    "eval RUN": lambda p, w: (["eval", p], "run directory"),
    "export RUN": lambda p, w: (["export", p, "--format", "safetensors", "--out", str(w.root / "out")],
                                "run directory"),
    "a preset file": lambda p, w: (["sweep", f"{p}.yaml", "--dry-run", "--runs-dir", str(w.runs)], "preset"),
    "status of a path": lambda p, w: (["status", p, "--runs-dir", str(w.runs)], "sweep"),
}


def _folder(path):
    path.mkdir(exist_ok=True)
    return path


@fuzz(150)
@given(kind=st.sampled_from(sorted(PATH_KINDS)), use=st.sampled_from(sorted(PATH_USES)))
def test_odd_paths(world_template, kind, use):
    with World(world_template) as w:
        path = str(PATH_KINDS[kind](w))
        argv, word = PATH_USES[use](path, w)
        parts = Path(os.path.relpath(path, w.root)).parts
        written = parts[0] if use.startswith("--out") and parts else "out"  # an --out and the folders above it
        _check(argv, w.root, [word, path[:40], os.path.basename(path)[:20]], "path", written)
