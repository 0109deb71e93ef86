"""A store that cannot take a write, and a resume checkpoint that is damaged: each is a clear error naming the
file and what to do, nothing half-written is left, and the run resumes once the cause is gone.

The read-only store and the full disk are real: a tmpfs mounted read-only, and one filled up mid-run (needs root,
as CI has; skipped elsewhere)."""
import errno
import shutil
import subprocess

import pytest
import torch

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.core.store import RunDir, StoreWriteError, atomic_write_json
from hkdbench.benchmark.engine.trainer import train

TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.img_size=16"]
TEACHER = ["teacher", "--model", "resnet_mini", "--recipe", "demo", *TINY]


def _cfg(epochs=2):
    return resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo",
                              overrides=[*TINY, f"train.epochs={epochs}"])


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture
def tmpfs(tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "hkdbench-test", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _remount_read_only(mount_point):
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run stopped mid-epoch 2: its checkpoint.pt is the one a --resume reads."""
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    runs = tmp_path_factory.mktemp("stopped") / "runs"
    steps = iter(range(1000))
    result = train(_cfg(), runs_dir=str(runs), progress=False, should_stop=lambda: next(steps) == 5)
    assert result.status == "interrupted"
    return runs, result.run_dir.path.name


def _foreign(path):
    torch.save({"config_hash": "0123456789ab", "epoch": 1}, path)


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(b""), "is empty (0 bytes"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read"),
    (lambda p: p.write_bytes(b"\x80\x04garbage, not a pickle"), "cannot be read"),
    (_foreign, "is not a checkpoint of this run"),
])
def test_a_damaged_resume_checkpoint_is_named_and_the_run_is_left_as_it_was(stopped_run, tmp_path, capsys, damage,
                                                                            message):
    runs, name = stopped_run
    shutil.copytree(runs, tmp_path / "runs")
    run = tmp_path / "runs" / name
    damage(run / "checkpoint.pt")
    before = _files(run)
    assert main([*TEACHER, "train.epochs=2", "--resume", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(run / "checkpoint.pt") in err and message in err, err
    assert "--restart" in err
    assert _files(run) == before  # nothing written, nothing removed


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    path = tmp_path / "summary.json"
    atomic_write_json(path, {"top1": 1.0})
    real_fsync = os.fsync

    def disk_full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreWriteError, match=r"cannot write .*summary\.json \(No space left on device\); the disk "
                                              r"is full \(\d+ MiB free.*continue with --resume"):
        atomic_write_json(path, {"top1": 2.0})
    assert path.read_text() == '{\n  "top1": 1.0\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_done_run_in_a_read_only_store_says_so_and_an_unfinished_one_is_refused(fmnist_available, tmpfs, capsys):
    runs = tmpfs / "runs"
    assert main([*TEACHER, "train.epochs=1", "--runs-dir", str(runs)]) == 0
    _remount_read_only(tmpfs)
    capsys.readouterr()

    assert main([*TEACHER, "train.epochs=1", "--runs-dir", str(runs)]) == 0
    assert "already done (read-only store: nothing written)" in capsys.readouterr().out
    (done,) = [RunDir(p) for p in runs.iterdir()]
    assert done.status() == "done"  # status reads a store it cannot write

    assert main([*TEACHER, "train.epochs=3", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Read-only file system" in err and "--runs-dir" in err, err


def test_a_disk_that_fills_up_mid_run_fails_cleanly_and_the_run_resumes_to_the_same_result(fmnist_available, tmpfs,
                                                                                          tmp_path):
    reference = train(_cfg(), runs_dir=str(tmp_path / "reference"), progress=False).run_dir
    runs = tmpfs / "runs"
    filler = tmpfs / "filler"
    run = RunDir(runs / _cfg().run_name())

    def fill_the_disk_after_epoch_1():
        if run.checkpoint_file.exists() and not filler.exists():
            epoch_1 = torch.load(run.checkpoint_file, weights_only=False)["epoch"]
            assert epoch_1 == 1
            filler.write_bytes(b"\0" * (shutil.disk_usage(tmpfs).free - 64 * 1024))  # a log line still fits
        return False

    with pytest.raises(StoreWriteError) as failure:
        train(_cfg(), runs_dir=str(runs), progress=False, should_stop=fill_the_disk_after_epoch_1)
    message = str(failure.value)
    assert "cannot write" in message and "disk is full" in message and "--resume" in message, message
    assert not [p.name for p in run.path.iterdir() if p.name.startswith(".")], "a temp file was left behind"
    assert torch.load(run.checkpoint_file, weights_only=False)["epoch"] == 1  # the previous one, intact
    assert not run.is_done

    filler.unlink()
    result = train(_cfg(), runs_dir=str(runs), resume=True, progress=False)
    assert result.status == "done"
    for name in ("best.pt", "final.pt"):
        got, want = torch.load(run.path / name), torch.load(reference.path / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")}  # noqa: E731
                          for r in rows]
    assert strip(run.metrics()) == strip(reference.metrics())
