"""train.keep_checkpoint: a finished run drops its resume checkpoint unless asked to keep it (not in the hash)."""
import pytest
import torch

from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.engine.trainer import train
from test_sweep import hkdbench, tiny_preset
from test_trainer import tiny_cfg


def test_keep_checkpoint_is_not_part_of_the_run():
    kept = tiny_cfg(extra=["train.keep_checkpoint=true"])
    assert kept.train.keep_checkpoint and not tiny_cfg().train.keep_checkpoint
    assert kept.run_hash() == tiny_cfg().run_hash()


@pytest.mark.usefixtures("fmnist_available")
def test_a_done_run_drops_its_checkpoint_unless_kept(tmp_path):
    dropped = train(tiny_cfg(epochs=1), runs_dir=str(tmp_path / "a"), progress=False, echo=False)
    kept = train(tiny_cfg(epochs=1, extra=["train.keep_checkpoint=true"]), runs_dir=str(tmp_path / "b"),
                 progress=False, echo=False)
    assert dropped.run_dir.path.name == kept.run_dir.path.name
    assert dropped.run_dir.is_done and not dropped.run_dir.checkpoint_file.exists()
    assert kept.run_dir.is_done and kept.run_dir.checkpoint_file.exists()
    # the teacher run trained on the way follows the student's setting
    teachers = [r for r in RunStore(tmp_path / "a").runs() if r.config().kind == "teacher"]
    assert len(teachers) == 1 and teachers[0].is_done and not teachers[0].has_checkpoint
    assert [r for r in RunStore(tmp_path / "b").runs() if r.config().kind == "teacher"][0].has_checkpoint
    for run in (dropped.run_dir, kept.run_dir):  # the kept weights are what eval, export and students read
        assert run.status() == "done" and (run.path / "best.pt").exists() and (run.path / "final.pt").exists()
    a, b = (torch.load(r.run_dir.path / "final.pt", weights_only=True) for r in (dropped, kept))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same computation


def test_remove_checkpoint_leaves_an_unfinished_run_alone(tmp_path):
    rd = RunStore(tmp_path).run_dir(tiny_cfg())
    rd.claim(tiny_cfg())
    rd.checkpoint_file.write_bytes(b"state")
    rd.remove_checkpoint()  # not DONE: the checkpoint is what a --resume needs
    assert rd.has_checkpoint and rd.status() == "partial"


@pytest.mark.usefixtures("fmnist_available")
def test_a_sweep_keeps_checkpoints_when_asked(tmp_path):
    preset = tiny_preset(tmp_path, methods=["kd"], overrides={"data": {"train_subset": 128, "eval_subset": 64,
                                                                       "batch_size": 64, "img_size": 16},
                                                              "train": {"epochs": 1}})
    code, out, err = hkdbench("sweep", preset, "--runs-dir", tmp_path / "kept", "--keep-checkpoints")
    assert code == 0, out + err
    code, out, err = hkdbench("sweep", preset, "--runs-dir", tmp_path / "dropped")
    assert code == 0, out + err
    kept, dropped = RunStore(tmp_path / "kept").runs(), RunStore(tmp_path / "dropped").runs()
    assert sorted(r.path.name for r in kept) == sorted(r.path.name for r in dropped)  # the same runs
    assert len(kept) == 2 and all(r.is_done and r.has_checkpoint for r in kept)
    assert all(r.is_done and not r.has_checkpoint for r in dropped)
