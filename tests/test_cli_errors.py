"""What the command line does with an error (issue 26, item 3): an expected one (bad input, a damaged file, a store
state) is one line naming what was wrong, exit 2, nothing written; anything else is a bug, said so in one line, exit
70, the traceback only under --debug or HKDBENCH_DEBUG=1; never a bug passed off as bad input."""
import os
import signal
from pathlib import Path

import pytest

from hkdbench.benchmark.cli import run_commands as commands
from hkdbench.benchmark.cli.main import EXIT_BUG, main
from hkdbench.benchmark.core.config import ConfigError

TEACHER = ["teacher", "--model", "resnet_mini", "--recipe", "demo", "data.train_subset=64", "data.eval_subset=64",
           "data.batch_size=32", "train.epochs=1"]


def _tree(root):
    """Every path under ``root`` (with the size of each file): what a command wrote."""
    root = Path(root)
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else None for p in root.rglob("*")} \
        if root.exists() else None


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def _raising(error):
    def command(args, overrides):
        raise error
    return command


def test_an_unexpected_error_is_a_bug_in_one_line_with_its_own_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_models", _raising(ZeroDivisionError("division by zero")))
    code, err = _run(["models"], capsys)
    assert code == EXIT_BUG == 70
    assert err.count("\n") == 1 and "Traceback" not in err
    # the module and line of hkdbench's innermost frame
    assert "internal error: ZeroDivisionError: division by zero (at hkdbench.benchmark.cli.main:" in err
    assert "This is a bug, not bad input: rerun with --debug (or HKDBENCH_DEBUG=1)" in err


@pytest.mark.parametrize("switch", [["--debug"], []])
def test_the_debug_switch_shows_the_traceback(monkeypatch, capsys, switch):
    monkeypatch.setattr(commands, "cmd_models", _raising(KeyError("bug")))
    if not switch:
        monkeypatch.setenv("HKDBENCH_DEBUG", "1")
    code, err = _run(["models", *switch], capsys)
    assert code == EXIT_BUG
    assert "Traceback (most recent call last)" in err and "internal error: KeyError" in err


@pytest.mark.parametrize("error", [KeyError("k"), ValueError("v"), RuntimeError("CUDA error: an illegal memory "
                                                                                 "access was encountered"),
                                   FileNotFoundError(2, "No such file or directory"), NotImplementedError("n")])
def test_a_builtin_error_is_never_passed_off_as_bad_input(monkeypatch, capsys, error):
    """Before: KeyError, ValueError, RuntimeError (CUDA's too), FileNotFoundError and NotImplementedError all
    printed 'error: ...' and exit 2, as if the user had typed something wrong."""
    monkeypatch.setattr(commands, "cmd_models", _raising(error))
    code, err = _run(["models"], capsys)
    assert code == EXIT_BUG and "This is a bug" in err and "Traceback" not in err


def test_an_expected_error_is_its_message_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_models", _raising(ConfigError("data.foo must be >= 1, got 0")))
    code, err = _run(["models"], capsys)
    assert (code, err) == (2, "hkdbench models: error: data.foo must be >= 1, got 0\n")


def test_out_of_memory_says_what_to_lower(monkeypatch, capsys):
    monkeypatch.setattr(commands, "cmd_models", _raising(MemoryError()))
    code, err = _run(["models"], capsys)
    assert code == 1 and "out of memory" in err and "data.batch_size" in err and "This is a bug" not in err


def test_a_usage_error_returns_2_instead_of_exiting(capsys):
    assert main(["export", "RUN"]) == 2  # --format missing: argparse's message, no SystemExit out of main
    assert "the following arguments are required: --format" in capsys.readouterr().err


def test_a_run_without_a_model_says_which_option_gives_it(capsys):
    """--model (--student) is optional for argparse since a config file may name the model instead."""
    assert main(["teacher"]) == 2
    assert capsys.readouterr().err == "hkdbench teacher: error: no model to train: give --model\n"


@pytest.mark.parametrize("argv,message", [
    (["sweep", "demo", "--executor", "local", "--parallel", "-1", "--dry-run"], "argument --parallel: must be >= 0"),
    (["sweep", "demo", "--parallel", "x", "--dry-run"], "argument --parallel: expected an integer >= 0, got 'x'"),
    (["sweep", "demo", "--time", "0", "--dry-run"], "argument --time: must be >= 1"),
    (["sweep", "demo", "--mem-gb", "nan", "--dry-run"], "argument --mem-gb: must be a finite number > 0"),
    (["sweep", "demo", "--cpus-per-task", "0", "--dry-run"], "argument --cpus-per-task: must be >= 1"),
    (["sweep", "demo", "--array-parallelism", "-3", "--dry-run"], "argument --array-parallelism: must be >= 1"),
    (["sweep", "demo", "slurm.mem_gb=-1", "--dry-run"], "slurm.mem_gb must be a finite number > 0"),
    (["sweep", "demo", "slurm.stop_wait_s=.inf", "--dry-run"], "slurm.stop_wait_s must be a finite number >= 0"),
    (["overhead", "--teacher", "resnet_mini", "--student", "vit_mini", "--batch-size", "0"],
     "argument --batch-size: must be >= 1"),
    (["overhead", "--teacher", "resnet_mini", "--student", "vit_mini", "--repeats", "0"], "--repeats: must be >= 1"),
    (["overhead", "--teacher", "resnet_mini", "--student", "vit_mini", "--warmup", "-1"], "--warmup: must be >= 0"),
    (["overhead", "--teacher", "resnet_mini", "--student", "vit_mini", "--img-size", "0"], "--img-size: must be >= 1"),
    (["methods", "--pair", "resnet_mini", "vit_mini", "--num-classes", "1"], "--num-classes: must be >= 2"),
    (["report", "--metric", "top1"], "argument --metric: invalid choice: 'top1'"),
    (["table", "--metric", "foo"], "argument --metric: invalid choice: 'foo' (choose from 'primary', 'selected_top1', "
                                   "'last_top1', 'best_top1', 'best_top5', 'last_top5', 'ema_best_top1', "
                                   "'ema_last_top1')"),
])
def test_every_number_and_name_on_the_command_line_is_checked_before_anything_is_written(argv, message, capsys,
                                                                                         tmp_path):
    """Dry runs: a check that regressed must not start a sweep (``sweep --executor local --parallel -1`` hung forever
    after writing sweep.json)."""
    runs = tmp_path / "runs"
    code, err = _run([*argv, *(["--runs-dir", str(runs)] if argv[0] in ("sweep", "teacher") else [])], capsys)
    assert code == 2 and message in err, err
    assert not runs.exists()


@pytest.mark.parametrize("device,message", [("gpu0", "unknown device 'gpu0'; allowed: auto, cpu, cuda"),
                                            ("meta", "device 'meta' is not supported")])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_a_device_the_machine_lacks_is_refused_before_anything_is_written(fmnist_available, capsys, tmp_path,
                                                                          device, message, dry_run):
    code, err = _run([*TEACHER, "--device", device, *dry_run, "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_refuses_a_negative_parallel_before_writing(tmp_path, monkeypatch):
    from hkdbench.benchmark.sweep.dispatch import Sweep
    from hkdbench.benchmark.sweep.executors import local
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset

    def submit(*args, **kwargs):  # where it hung: no job slot is ever free
        raise AssertionError("submitted with parallel=-1")

    monkeypatch.setattr(local.LocalExecutor, "submit", submit)
    sweep = Sweep(expand(load_preset("demo")), str(tmp_path / "runs"), "cpu")
    with pytest.raises(ConfigError, match="parallel must be >= 0"):
        sweep.run("local", parallel=-1, check_inputs=False)
    assert not (tmp_path / "runs").exists()


# -- paths and files of the store ---------------------------------------------------------------------------------

@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


def _bad_stores(tmp_path, a_file):
    return {"a file": (str(a_file), "is a file, not a folder"),
            "below a file": (str(a_file / "runs"), f"lies below {a_file}, which is a file"),
            "a name over 255 bytes": (str(tmp_path / ("r" * 300) / "runs"), "the filesystem takes at most 255 bytes")}


@pytest.mark.parametrize("kind", ["a file", "below a file", "a name over 255 bytes"])
@pytest.mark.parametrize("argv", [TEACHER, [*TEACHER, "--dry-run"], ["sweep", "demo", "--dry-run"],
                                  ["status", "demo"], ["report"], ["collect"]])
def test_a_run_store_that_cannot_be_a_folder_is_named(fmnist_available, tmp_path, a_file, capsys, kind, argv):
    runs, message = _bad_stores(tmp_path, a_file)[kind]
    before = _tree(tmp_path)
    code, err = _run([*argv, "--runs-dir", runs, *(["--out", str(tmp_path / "o")] if argv[0] in ("report",
                                                                                                  "collect") else [])],
                     capsys)
    assert code == 2, err
    assert "--runs-dir" in err and message in err and "Traceback" not in err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command", ["report", "collect", "plot"])
def test_an_output_folder_below_a_file_is_named(tmp_path, a_file, capsys, command):
    (tmp_path / "runs").mkdir()
    code, err = _run([command, "--runs-dir", str(tmp_path / "runs"), "--out", str(a_file / "out")], capsys)
    assert code == 2 and f"--out {a_file / 'out'} lies below {a_file}, which is a file" in err


@pytest.fixture(scope="module")
def finished_teacher(tmp_path_factory):
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    runs = tmp_path_factory.mktemp("teacher") / "runs"
    assert main([*TEACHER, "--runs-dir", str(runs)]) == 0
    (run,) = runs.iterdir()
    return run


@pytest.fixture
def teacher_copy(finished_teacher, tmp_path):
    import shutil

    shutil.copytree(finished_teacher.parent, tmp_path / "runs")
    return tmp_path / "runs" / finished_teacher.name


def test_export_below_a_file_is_named_before_anything_is_written(teacher_copy, a_file, capsys):
    before = _tree(teacher_copy.parent)
    code, err = _run(["export", str(teacher_copy), "--format", "safetensors", "--out", str(a_file / "x")], capsys)
    assert code == 2 and f"--out {a_file / 'x'} lies below {a_file}" in err
    assert _tree(teacher_copy.parent) == before


@pytest.mark.parametrize("body,message", [("[]", "holds a JSON list, not a run config"),
                                          ('{"kind": 3}', "does not hold a run config"),
                                          ('{"kind": "teach', "is not valid JSON")])
@pytest.mark.parametrize("argv", [TEACHER, ["eval"], ["export", "--format", "safetensors"]])
def test_a_config_json_that_is_not_a_run_config_is_named(teacher_copy, capsys, body, message, argv):
    (teacher_copy / "config.json").write_text(body)
    before = _tree(teacher_copy.parent)
    target = ["--runs-dir", str(teacher_copy.parent)] if argv[0] == "teacher" else [str(teacher_copy)]
    code, err = _run([*argv, *target], capsys)
    assert code == 2 and f"{teacher_copy / 'config.json'} {message}" in err and "move it away" in err, err
    assert _tree(teacher_copy.parent) == before


@pytest.mark.parametrize("content", [b"garbage, not a torch file", b""])
def test_a_garbage_best_pt_is_named_by_eval(teacher_copy, capsys, content):
    (teacher_copy / "best.pt").write_bytes(content)
    code, err = _run(["eval", str(teacher_copy)], capsys)
    assert code == 2 and str(teacher_copy / "best.pt") in err and "Traceback" not in err, err


@pytest.mark.parametrize("body,message", [('{"sw', "not valid JSON"), ("[]", "a JSON list, not an object"),
                                          ('{"sweep": "x", "runs": [1]}', "'runs' are not a list of runs"),
                                          ('{"sweep": "x"}', "lists no runs"),
                                          ('{"sweep": "x", "runs": [{"kind": "student", "config": {"a": 1}}]}',
                                           "records a run this hkdbench cannot read")])
def test_status_names_a_damaged_sweep_json(tmp_path, capsys, body, message):
    manifest = tmp_path / "runs" / "_sweeps" / "abc" / "sweep.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(body)
    code, err = _run(["status", "abc", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and str(manifest) in err and message in err, err


@pytest.mark.parametrize("content,message", [(b"name: x\n\xff\xfe: 1\n", "is not UTF-8 text (byte 8 is b'\\xff')"),
                                             (None, "cannot be read: it is a folder")])
@pytest.mark.parametrize("command", ["sweep", "status"])
def test_a_preset_file_that_cannot_be_read_is_named(tmp_path, capsys, content, message, command):
    preset = tmp_path / "bad.yaml"
    preset.mkdir() if content is None else preset.write_bytes(content)
    code, err = _run([command, str(preset), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"preset file {preset} {message}" in err, err
    assert not (tmp_path / "runs").exists()


# -- stops --------------------------------------------------------------------------------------------------------

def test_a_second_ctrl_c_aborts_at_once_and_says_how_to_resume(fmnist_available, tmp_path, capsys, monkeypatch):
    """Ctrl-C twice at the end of epoch 2 (epoch 1's checkpoint written): exit 130 with the --resume hint, no
    traceback; the same command with --resume finishes the run. Before: a KeyboardInterrupt traceback."""
    from hkdbench.benchmark.engine import loop
    from hkdbench.benchmark.core.store import RunStore

    real_evaluate, calls = loop.evaluate, []

    def evaluate_then_ctrl_c_twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step and save (the handler runs here)
            os.kill(os.getpid(), signal.SIGINT)  # the second: abort now
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_ctrl_c_twice)
    argv = [*TEACHER, "train.epochs=3", "--runs-dir", str(tmp_path / "runs")]
    code, err = _run(argv, capsys)
    assert code == 130 and "Traceback" not in err
    assert "aborted by a second Ctrl-C" in err and "the same command and --resume" in err
    (run,) = RunStore(tmp_path / "runs").runs()
    assert run.has_checkpoint and not run.is_done
    monkeypatch.setattr(loop, "evaluate", real_evaluate)
    assert main([*argv, "--resume"]) == 0 and run.is_done


# -- what the fuzz test (test_fuzz_cli.py) found, each pinned -------------------------------------------------------

LONG = "n" * 300


@pytest.mark.parametrize("extra,message", [
    (["optim=.inf"], "optim: expected a mapping of OptimConfig fields"),  # was TypeError: 'float' is not iterable
    (["data.img_size=inf"], "data.img_size: expected an integer, got 'inf'"),  # was OverflowError
    (["train.seed=1000000000000000000000000000000"],  # was rounded through a float: 1000000000000000019884624838656
     "train.seed must be between -2**40 and 2**40 (the data stream's keys are made from it), got "
     "1000000000000000000000000000000"),
    (["data.crop_pct=1e-320"], "data.crop_pct must be > 0 and at least data.img_size / 4096"),  # OverflowError
    ([f"data.root=/tmp/{LONG}/x"], "is no path this filesystem can hold (File name too long)"),  # was OSError
    (["data.dataset=\udcff"], r"data.dataset='\udcff': the dataset is set by --dataset"),  # a sweep: UnicodeEncodeError
])
def test_fuzz_findings_in_the_config(fmnist_available, capsys, tmp_path, extra, message):
    code, err = _run([*TEACHER, *extra, "--dry-run", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("extra,message", [(["optim=.inf"], "optim: expected a mapping of OptimConfig fields"),
                                           (["data.dataset=\udcff"], r"data.dataset='\udcff': the dataset is set by")])
def test_fuzz_findings_in_a_sweeps_config(capsys, tmp_path, extra, message):
    """A sweep's dry run plans without reading the data; these must fail all the same (data.dataset=\\udcff reached
    the sweep id's digest: UnicodeEncodeError)."""
    code, err = _run(["sweep", "--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "kd", "--seeds", "0",
                      "recipe=demo", *extra, "--dry-run", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("path,message", [(f"/tmp/{LONG}/t.pth", "cannot be read (File name too long)"),
                                          ("AFILE/t.pth", "cannot be read (Not a directory)")])
def test_fuzz_findings_a_teacher_checkpoint_path_no_file_can_have(fmnist_available, capsys, tmp_path, a_file, path,
                                                                  message):
    path = path.replace("AFILE", str(a_file))
    code, err = _run(["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--recipe", "demo",
                      "--teacher-checkpoint", path, "--dry-run", "--runs-dir", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"teacher checkpoint {path} {message}" in err, err


def test_fuzz_findings_status_of_a_sweep_id_not_in_the_store(tmp_path, capsys):
    code, err = _run(["status", "custom-046808b6c6", "--runs-dir", str(tmp_path)], capsys)
    assert code == 2 and "unknown preset 'custom-046808b6c6', and no sweep of that id in the run store" in err
    assert str(tmp_path / "_sweeps" / "custom-046808b6c6" / "sweep.json") in err


def test_fuzz_findings_a_path_that_is_not_utf8_is_printed_as_its_bytes(fmnist_available, tmp_path):
    """Printing a surrogate-escaped path to a strict UTF-8 stdout raised UnicodeEncodeError (exit 70)."""
    import contextlib
    import io

    runs = tmp_path / os.fsdecode(b"runs-\xff")
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    with contextlib.redirect_stdout(stdout):
        assert main([*TEACHER, "--dry-run", "--runs-dir", str(runs)]) == 0
    assert os.fsencode(str(runs)) in stdout.buffer.getvalue()


@pytest.mark.usefixtures("fmnist_available")
def test_ema_weights_of_a_run_without_an_ema_are_refused_with_what_to_do(tmp_path, done_teacher_store, capsys):
    _, run, _ = done_teacher_store(tmp_path)
    for argv in (["eval", str(run.path), "--ema"],
                 ["export", str(run.path), "--ema", "--format", "safetensors", "--out", str(tmp_path / "out")]):
        code, err = _run(argv, capsys)
        assert code == 2 and f"{run.path.name} has no EMA weights" in err and "train.ema_decay=0" in err, err
        assert "leave out --ema" in err and "--teacher-weights" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
