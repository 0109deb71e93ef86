"""Bad inputs and damaged files: each fails at once with exit code 2 and a message that names the file or the
field, what is wrong and what to do, and nothing is written to the run store (no training here)."""
import gzip
import shutil

import pytest
import torch

from hkdbench.benchmark.cli.main import main
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
    # issue 26: each of these wrote a run directory (or a whole run) before
    ("optim.lr=inf", "optim.lr must be finite, got inf"),
    ("optim.weight_decay=inf", "optim.weight_decay must be finite, got inf"),
    ("optim.warmup_lr=.inf", "optim.warmup_lr must be finite, got inf"),
    ("optim.min_lr=-.inf", "optim.min_lr must be >= 0"),
    ("train.epochs=.inf", "train.epochs: expected an integer, got inf"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
    ("train.eval_every=-3", "train.eval_every must be >= 1"),
    ("data.rrc_scale=[]", "data.rrc_scale must be two numbers a, b with 0 < a <= b <= 1"),
    ("data.rrc_scale=[0.9,0.2]", "data.rrc_scale must be two numbers a, b with 0 < a <= b <= 1"),
    ("data.rrc_scale=[0.1,.inf]", "data.rrc_scale must be two numbers"),
    ("data.crop_pct=0", "data.crop_pct must be > 0"),
    ("data.crop_pct=-1", "data.crop_pct must be > 0"),
    ("data.pipeline=paper224 data.crop_pct=1.5", "data.crop_pct=1.5 resizes the evaluation images to 21 px, below "
                                                 "data.img_size=32, and the in-memory evaluation cannot pad"),
    ("data.img_size=100000", "data.img_size must be in [1, 4096]"),
    ("data.crop_padding=1000", "data.crop_padding must be <= data.img_size"),
    ("data.root=", "data.root is empty"),
    ("train.seed=1e15", "train.seed must be between"),
    ("data.train_subset=60001", "data.train_subset=60001 is more than the 60000 images of fashion-mnist's training"),
    ("data.eval_subset=10001", "data.eval_subset=10001 is more than the 10000 images of fashion-mnist's test split"),
])
def test_a_bad_number_names_its_field_before_anything_is_written(fmnist_available, runs_dir, capsys, override,
                                                                   message):
    extra = ["data.train_subset=32"] if override == "data.batch_size=64" else []
    _fails_cleanly([*TEACHER, *extra, *override.split()], runs_dir, capsys, message)
    _nothing_written(runs_dir)


BAD_FIELDS = [("optim.lr=inf", "optim.lr must be finite"), ("train.eval_every=0", "train.eval_every must be >= 1"),
              ("data.train_subset=70000", "more than the 60000 images")]


@pytest.mark.parametrize("command", [
    [*STUDENT, "--method", "none", "--method", "fitnet"],  # a cohort
    [*STUDENT, "--teacher-checkpoint", "PLACEHOLDER"],
    ["sweep", "demo", "--executor", "inline"],
    ["sweep", "demo", "--executor", "local", "--cohort"],
], ids=["cohort", "checkpoint-teacher", "sweep-inline", "sweep-local-cohort"])
@pytest.mark.parametrize("override,message", BAD_FIELDS)
def test_every_command_refuses_a_bad_field_before_anything_is_written(fmnist_available, runs_dir, capsys, tmp_path,
                                                                     command, override, message):
    if "PLACEHOLDER" in command:
        from hkdbench.benchmark.models.zoo import create_model

        path = tmp_path / "teacher.pth"
        torch.save(create_model("resnet_mini", 10, in_chans=1, img_size=32).model.state_dict(), path)
        command = [str(path) if a == "PLACEHOLDER" else a for a in command]
    _fails_cleanly([*command, override], runs_dir, capsys, message)
    _nothing_written(runs_dir)


@pytest.mark.parametrize("override", [f"teacher.{item}" for item, _ in BAD_FIELDS])
def test_a_bad_teacher_field_is_refused_before_anything_is_written(fmnist_available, runs_dir, capsys, override):
    _fails_cleanly([*STUDENT, override], runs_dir, capsys, dict(BAD_FIELDS)[override[len("teacher."):]])
    _nothing_written(runs_dir)


def _fmnist_copy(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    for f in FILES:
        shutil.copy(FASHION_MNIST_DEBIAN_DIR / f, root / f)
    return root


@pytest.mark.parametrize("make_root,message", [
    (lambda tmp: tmp / "missing", "does not exist"),
    (lambda tmp: (tmp / "a_file").write_text("x") and tmp / "a_file", "is a file, not a folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no Fashion-MNIST"),
    (lambda tmp: (_fmnist_copy(tmp) / FILES[3]).unlink() or tmp / "fm", "holds no Fashion-MNIST"),
])
def test_a_fashion_mnist_root_without_the_data_is_refused_not_ignored(fmnist_available, runs_dir, capsys, tmp_path,
                                                                      make_root, message):
    """A data.root is honoured or refused: before, Debian's copy was read instead of a root that lacked the files,
    under the bogus root's run hash."""
    root = make_root(tmp_path)
    err = _fails_cleanly([*TEACHER, f"data.root={root}"], runs_dir, capsys, f"data.root={root} {message}")
    assert "IDX files" in err
    _nothing_written(runs_dir)


def test_a_fashion_mnist_root_is_read(fmnist_available, tmp_path):
    """The files under data.root are the ones read (flat, or in torchvision's FashionMNIST/raw layout)."""
    from hkdbench.benchmark.core.config import DataConfig
    from hkdbench.benchmark.data.datasets import load_tensors

    flat = _fmnist_copy(tmp_path)
    nested = tmp_path / "tv" / "FashionMNIST" / "raw"
    nested.mkdir(parents=True)
    for f in FILES:
        shutil.copy(flat / f, nested / f)
    (flat / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(
        (flat / "train-labels-idx1-ubyte.gz").read_bytes())[:8] + bytes(60000)))  # every label 0 in this copy
    assert load_tensors(DataConfig(root=str(flat)), train=True)[1].sum() == 0
    assert load_tensors(DataConfig(root=str(tmp_path / "tv")), train=True)[1].sum() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU's")
def test_fp16_on_the_cpu_is_refused_before_anything_is_written(fmnist_available, runs_dir, capsys):
    _fails_cleanly([*TEACHER, "train.precision=fp16", "--device", "cpu"], runs_dir, capsys,
                   "train.precision=fp16 on the CPU", "Use train.precision=auto")
    _nothing_written(runs_dir)


def test_a_batch_larger_than_the_device_memory_is_refused_naming_img_size(fmnist_available, runs_dir, capsys,
                                                                          monkeypatch):
    from hkdbench.benchmark.engine import preflight

    monkeypatch.setattr(preflight, "_device_memory", lambda device: 2 ** 28)  # a 256 MiB device
    _fails_cleanly([*TEACHER, "data.img_size=1024", "--device", "cpu"], runs_dir, capsys,
                   "data.img_size=1024 with data.batch_size=128", "needs 1.00 GiB", "more than the 0.25 GiB")
    _nothing_written(runs_dir)


def test_a_crop_pct_above_one_is_accepted_where_the_evaluation_pads(fmnist_available, runs_dir):
    assert main([*TEACHER, "data.pipeline=paper224", "data.crop_pct=1.5", "data.in_memory=no", "--dry-run",
                 "--runs-dir", runs_dir]) == 0
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


def _wrong_classes(path):
    from hkdbench.benchmark.models.zoo import create_model

    torch.save(create_model("resnet_mini", 100, in_chans=1, img_size=32).model.state_dict(), path)


@pytest.mark.parametrize("write,message", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes"),
    (lambda p: p.mkdir(), "is a directory; --teacher-checkpoint takes a file"),
    (_wrong_classes, "does not fit ResNet with 10 classes: keys of another shape: fc.weight (100, 128) (the model: "
                     "(10, 128)), fc.bias (100,) (the model: (10,))"),
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

    from hkdbench.benchmark.recipes.resolve import resolve_run_config

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
    from hkdbench.benchmark.core.config import DataConfig
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


def _listing(runs_dir):
    from pathlib import Path

    return sorted(str(p) for p in Path(runs_dir).rglob("*"))


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.summary_file.write_text('{"best_top1": 9'), "summary.json is damaged (not valid JSON"),
    (lambda t: t.summary_file.write_text("[]"), "summary.json is damaged (a JSON list, not an object)"),
    (lambda t: t.weights_file("best").unlink(), "has no best.pt"),
    (lambda t: t.weights_file("best").write_bytes(b"\x80\x04garbage"), "best.pt cannot be read"),
    (lambda t: _zip_truncated(t.weights_file("best")), "best.pt cannot be read"),
    (lambda t: torch.save({"w": torch.zeros(3)}, t.weights_file("best")), "best.pt does not fit ResNet"),
])
def test_a_damaged_teacher_run_is_named_and_no_student_run_is_written(done_teacher_store, tmp_path, capsys, damage,
                                                                      message):
    """The student's run directory is created only after its teacher run is loaded and checked (before, a damaged
    teacher left an empty 'pending' student run, and a traceback)."""
    runs, t_dir, student = done_teacher_store(tmp_path)
    damage(t_dir)
    before = _listing(runs)
    err = _fails_cleanly(student, runs, capsys, t_dir.path.name, message)
    assert _listing(runs) == before, err
