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


def _fake_cifar100(tmp_path, monkeypatch):
    """A torchvision CIFAR-100 folder of small files whose MD5s torchvision is told (the real set is 170 MB)."""
    import hashlib

    import torchvision

    folder = tmp_path / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    md5 = {}
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(name.encode() * 100)
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(cls, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5["meta"]})
    return folder


@pytest.mark.parametrize("damage,message", [
    (lambda folder: (folder / "test").write_bytes(b"half"), "test is damaged (its MD5"),
    (lambda folder: (folder / "meta").unlink(), "meta is missing"),
])
def test_a_damaged_cifar_file_is_named_before_anything_is_written(runs_dir, capsys, tmp_path, monkeypatch, damage,
                                                                  message):
    from hkdbench.benchmark.config import DataConfig
    from hkdbench.benchmark.data.datasets import check_data_available

    folder = _fake_cifar100(tmp_path, monkeypatch)
    check_data_available(DataConfig(dataset="cifar100", root=str(folder.parent)))  # intact: passes
    damage(folder)
    _fails_cleanly(["teacher", "--model", "resnet_mini", "--dataset", "cifar100", "--recipe", "demo",
                    f"data.root={folder.parent}"], runs_dir, capsys, str(folder), message)
    _nothing_written(runs_dir)


def _image_folders(root, train_classes, val_classes, empty=()):
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            if name not in empty:
                (root / split / name / "img.JPEG").write_bytes(b"jpeg")
    return root


@pytest.mark.parametrize("layout,message", [
    (dict(train_classes=["a", "b"], val_classes=["a", "b", "c"]), "val has 3 class folders; imagenet needs 2"),
    (dict(train_classes=["a", "b"], val_classes=["a", "c"]), "name different classes (e.g. b, c)"),
    (dict(train_classes=["a", "b"], val_classes=["a", "b"], empty=["b"]), "class folder(s) b are empty"),
])
def test_imagenet_folders_that_would_shift_labels_are_refused(tmp_path, layout, message):
    from hkdbench.benchmark.data.datasets import DataCorruptError, _check_image_folders

    root = _image_folders(tmp_path / "in", **layout)
    with pytest.raises(DataCorruptError) as err:
        _check_image_folders(root, 2)
    assert message in str(err.value)
    _check_image_folders(_image_folders(tmp_path / "ok", ["a", "b"], ["a", "b"]), 2)  # a sound layout passes


def test_imagenet_with_the_wrong_number_of_classes_fails_before_anything_is_written(runs_dir, capsys, tmp_path):
    root = _image_folders(tmp_path / "in", ["a", "b"], ["a", "b"])
    _fails_cleanly(["teacher", "--model", "resnet18", "--dataset", "imagenet", "--recipe", "imagenet-cnn",
                    f"data.root={root}"], runs_dir, capsys, "has 2 class folders; imagenet needs 1000")
    _nothing_written(runs_dir)


def test_a_sweep_checks_its_data_before_submitting_anything(fmnist_available, runs_dir, capsys, tmp_path):
    root = _damaged_fmnist(tmp_path, "train-labels-idx1-ubyte.gz", _truncate)
    _fails_cleanly(["sweep", "demo", f"data.root={root}", "--executor", "inline"], runs_dir, capsys,
                   str(root / "train-labels-idx1-ubyte.gz"), "is damaged")
    _nothing_written(runs_dir)


def test_a_sweep_checks_its_teacher_checkpoint_before_submitting_anything(fmnist_available, runs_dir, capsys,
                                                                          tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"")
    _fails_cleanly(["sweep", "--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "kd",
                    "--seeds", "0", "recipe=demo", f"teacher_checkpoints={{resnet_mini: {bad}}}",
                    "--executor", "inline"],
                   runs_dir, capsys, str(bad), "is empty (0 bytes")
    _nothing_written(runs_dir)
