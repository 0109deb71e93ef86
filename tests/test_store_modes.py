"""Files in the run store get the mode the umask gives (colleagues sharing a store can read results)."""
import contextlib
import os
import stat

import pytest
import torch

from hkdbench.benchmark.engine.records import atomic_torch_save
from hkdbench.benchmark.core.store import atomic_write_json


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_take_the_umask_mode(tmp_path, mask, mode):
    with umask(mask):
        atomic_write_json(tmp_path / "summary.json", {"top1": 1.0})
        atomic_torch_save(tmp_path / "checkpoint.pt", {"w": torch.zeros(2)})
        atomic_write_json(tmp_path / "summary.json", {"top1": 2.0})  # a rewrite replaces, same mode
    for name in ("summary.json", "checkpoint.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "summary.json"]  # no temp left



def _modes(folder):
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.usefixtures("fmnist_available")
def test_every_file_of_a_run_and_its_exports_takes_the_umask_mode(tmp_path):
    """A training run (with its tracker's files) and the three export formats: 0640 under umask 027 (exports were
    0600 when safetensors and ONNX wrote through a temp file of their own)."""
    from hkdbench.benchmark.cli.main import main
    from hkdbench.benchmark.core.store import RunStore
    from hkdbench.benchmark.engine.export import export_run

    runs = tmp_path / "runs"
    with umask(0o027):
        assert main(["teacher", "--model", "resnet18", "--recipe", "demo", "data.train_subset=64",
                     "data.eval_subset=64", "data.batch_size=32", "train.epochs=1", "train.log=tensorboard",
                     "--runs-dir", str(runs)]) == 0
        (run,) = RunStore(runs).runs()
        for fmt in ("safetensors", "timm", "onnx"):
            export_run(run.path, fmt, out=tmp_path / "exports" / fmt)
    modes = {**_modes(runs), **_modes(tmp_path / "exports")}
    assert any(name.endswith("final.pt") for name in modes) and any("tracking" in name for name in modes)
    assert {"safetensors", "timm", "onnx"} <= {name.split("/")[0] for name in modes}
    assert {name: oct(mode) for name, mode in modes.items() if mode != 0o640} == {}
    assert not list((tmp_path / "exports").rglob(".*"))  # no temp file left
