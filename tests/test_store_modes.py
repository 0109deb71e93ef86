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
