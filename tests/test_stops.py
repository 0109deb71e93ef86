"""Stops that lose nothing: metrics repaired from the checkpoint, torn lines reported, stray temp files removed."""
import shutil

import pytest
import torch

from hkdbench.benchmark.store import RunDir
from hkdbench.benchmark.trainer import train

from test_trainer import tiny_cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hkdbench.benchmark.data import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    runs = tmp_path_factory.mktemp("finished") / "runs"
    cfg = tiny_cfg(epochs=3)
    return cfg, runs, train(cfg, runs_dir=str(runs), progress=False).run_dir


def _copy(finished_run, tmp_path):
    cfg, runs, rd = finished_run
    shutil.copytree(runs, tmp_path / "runs")
    return cfg, RunDir(tmp_path / "runs" / rd.path.name), rd


@pytest.mark.slow
def test_kill_before_the_last_metrics_write_resumes_to_complete_metrics(finished_run, tmp_path):
    cfg, rd, original = _copy(finished_run, tmp_path)
    for name in ("DONE", "summary.json", "final.pt"):  # killed after the last checkpoint, before metrics/finish
        (rd.path / name).unlink()
    lines = rd.metrics_file.read_text().splitlines(keepends=True)
    rd.metrics_file.write_text("".join(lines[:2]))
    result = train(cfg, runs_dir=str(rd.path.parent), resume=True, progress=False)
    assert result.status == "done"
    assert rd.metrics_file.read_bytes() == original.metrics_file.read_bytes()
    for name in ("final.pt", "best.pt"):  # the weights agree with the uninterrupted run's
        got, want = torch.load(rd.path / name), torch.load(original.path / name)
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert {k: v for k, v in rd.summary().items() if "time" not in k and k != "finished"} == \
        {k: v for k, v in original.summary().items() if "time" not in k and k != "finished"}


@pytest.mark.slow
def test_a_torn_metrics_line_is_reported_then_repaired_on_resume(finished_run, tmp_path):
    cfg, rd, original = _copy(finished_run, tmp_path)
    text = original.metrics_file.read_text()
    rd.metrics_file.write_text(text[: len(text) - 40])  # the last line cut mid-record
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        assert [m["epoch"] for m in rd.metrics()] == [1, 2]
    (rd.path / "DONE").unlink()
    (rd.path / "summary.json").unlink()
    train(cfg, runs_dir=str(rd.path.parent), resume=True, progress=False)
    assert rd.metrics_file.read_text() == text


def test_stray_temp_files_are_removed_on_the_next_open_under_the_lock(finished_run, tmp_path):
    cfg, rd, _ = _copy(finished_run, tmp_path)
    strays = [".checkpoint.pt.ab12_xyz", ".final.pt.k9k9k9k9", ".DONE.0a1b2c3d", ".metrics.jsonl.zzzzzzzz"]
    for name in strays:
        (rd.path / name).write_bytes(b"partial")
    (rd.path / ".keepme").write_text("not a temp file")
    train(cfg, runs_dir=str(rd.path.parent), progress=False)  # already done: opening it cleans up
    assert not [name for name in strays if (rd.path / name).exists()]
    assert (rd.path / ".keepme").exists() and rd.is_done
