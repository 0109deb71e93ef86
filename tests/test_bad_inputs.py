"""Bad inputs and damaged files: each fails at once with exit code 2 and a message that names the file or the
field, what is wrong and what to do, and nothing is written to the run store (no training here)."""
import gzip
import shutil

import pytest
import torch

from hkdbench.benchmark.cli import main
from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

TEACHER = ["teacher", "--model", "resnet_mini", "--recipe", "demo"]
STUDENT = ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "kd", "--recipe", "demo"]
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def _fails_cleanly(argv, runs_dir, capsys, *messages):
    assert main([*argv, "--runs-dir", runs_dir]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for message in messages:
        assert message in err, err
    return err


def _nothing_written(runs_dir):
    from pathlib import Path

    root = Path(runs_dir)
    assert not root.exists() or not any(root.iterdir()), f"written: {list(root.rglob('*'))}"


@pytest.mark.parametrize("override,message", [
    ("optim.lr=nan", "optim.lr must be > 0"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("data.train_subset=-5", "data.train_subset must be >= 0"),
    ("data.eval_subset=-1", "data.eval_subset must be >= 0"),
    ("data.hflip=2", "data.hflip is a probability"),
    ("data.mixup=nan", "data.mixup must be >= 0"),
    ("train.epochs=-1", "train.epochs must be >= 1"),
    ("data.batch_size=100000", "data.batch_size=100000 is larger than the training set"),
    ("data.batch_size=64", "data.batch_size=64 is larger than the training set (32 images kept by data.train_subset"),
])
def test_a_bad_number_names_its_field_before_anything_is_written(fmnist_available, runs_dir, capsys, override,
                                                                   message):
    extra = ["data.train_subset=32"] if override == "data.batch_size=64" else []
    _fails_cleanly([*TEACHER, *extra, override], runs_dir, capsys, message)
    _nothing_written(runs_dir)


def test_a_bad_teacher_override_is_an_error_before_the_student_run_exists(fmnist_available, runs_dir, capsys):
    _fails_cleanly([*STUDENT, "teacher.train.epochs=-1"], runs_dir, capsys, "teacher override",
                   "train.epochs must be >= 1")
    _nothing_written(runs_dir)


def _damaged_fmnist(tmp_path, name, damage):
    root = tmp_path / "fm"
    root.mkdir()
    for f in FILES:
        shutil.copy(FASHION_MNIST_DEBIAN_DIR / f, root / f)
    damage(root / name)
    return root


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_size(path):
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-7]))


@pytest.mark.parametrize("name,damage,message", [
    ("train-images-idx3-ubyte.gz", _truncate, "is damaged"),
    ("t10k-labels-idx1-ubyte.gz", _truncate, "is damaged"),
    ("train-labels-idx1-ubyte.gz", _wrong_size, "bytes but its header"),
    ("t10k-images-idx3-ubyte.gz", lambda p: p.write_bytes(gzip.compress(b"garbage")), "not an IDX file"),
])
def test_a_damaged_data_file_is_named_before_anything_is_written(fmnist_available, runs_dir, capsys, tmp_path,
                                                                 name, damage, message):
    root = _damaged_fmnist(tmp_path, name, damage)
    _fails_cleanly([*TEACHER, f"data.root={root}"], runs_dir, capsys, str(root / name), message, "re-download")
    _nothing_written(runs_dir)


def _zip_truncated(path):
    torch.save({"w": torch.zeros(1000)}, path)
    _truncate(path)


@pytest.mark.parametrize("write,message", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes"),
    (_zip_truncated, "cannot be read"),
    (lambda p: p.write_bytes(b"\x80\x04garbage, not a pickle"), "cannot be read"),
    (lambda p: torch.save({"w": torch.zeros(3)}, p), "does not fit"),
])
def test_a_bad_teacher_checkpoint_is_named_before_anything_is_written(fmnist_available, runs_dir, capsys, tmp_path,
                                                                      write, message):
    path = tmp_path / "teacher.pth"
    write(path)
    _fails_cleanly([*STUDENT, "--teacher-checkpoint", str(path)], runs_dir, capsys, str(path), message)
    _nothing_written(runs_dir)


@pytest.mark.parametrize("plugin,message", [
    ("no_such_module_xyz", "cannot be imported"),
    ("broken.py", "has a syntax error"),
    ("needs_missing.py", "needs a module that is not installed"),
])
def test_a_plugin_that_cannot_be_imported_is_named(runs_dir, capsys, tmp_path, monkeypatch, plugin, message):
    (tmp_path / "broken.py").write_text("def oops(:\n")
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    spec = str(tmp_path / plugin) if plugin.endswith(".py") else plugin
    monkeypatch.setenv("HKDBENCH_METHODS", spec)
    _fails_cleanly(TEACHER, runs_dir, capsys, repr(spec), "HKDBENCH_METHODS", message)
    _nothing_written(runs_dir)


def test_a_garbage_config_json_is_named_and_left_alone(fmnist_available, runs_dir, capsys):
    from pathlib import Path

    from hkdbench.benchmark.recipes import resolve_run_config

    cfg = resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo")
    config = Path(runs_dir) / cfg.run_name() / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"kind": "teach')
    _fails_cleanly(TEACHER, runs_dir, capsys, str(config), "is not valid JSON", "move it away")
    assert config.read_text() == '{"kind": "teach'
    assert sorted(p.name for p in config.parent.iterdir()) <= ["config.json", "lock"]
