"""CKA and gradient-conflict probes logged into metrics.jsonl by a real (tiny) training run."""
import json
import math

import pytest
import torch

from hkdbench.benchmark.probes.hooks import TrainingProbes, probe_set
from hkdbench.benchmark.recipes import resolve_run_config
from hkdbench.benchmark.engine.trainer import train

from _support import small_model

BLOCKS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.img_size=16", "train.epochs=2"]
TEACHER = ["train.epochs=1", "data.train_subset=256", "data.eval_subset=128", "data.img_size=16"]


def _config(extra=(), method="kd"):
    return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=method,
                              recipe="demo", overrides=TINY + list(extra), teacher_overrides=TEACHER)


def _metrics(result):
    return [json.loads(line) for line in result.run_dir.metrics_file.read_text().splitlines()]


def test_probes_logged_in_range_and_training_unchanged(fmnist_available, runs_dir):
    probed = train(_config(["train.probe_every=1", "train.conflict_every=1", "train.probe_images=96"]),
                   runs_dir=runs_dir, echo=False)
    assert probed.status == "done"
    records = _metrics(probed)
    assert len(records) == 2
    for r in records:
        cka = {k: v for k, v in r.items() if k.startswith("cka/")}
        assert set(cka) == {f"cka/linear/t{i}_s{j}" for i in range(1, 5) for j in range(1, 5)}
        # unbiased HSIC: CKA can dip a hair below 0 for unrelated features, never far outside [0, 1]
        assert all(v is not None and -0.05 <= v <= 1.0 + 1e-6 for v in cka.values()), cka
        assert -1.0 <= r["conflict/cosine"] <= 1.0
        assert 0.0 <= r["conflict/fraction"] <= 1.0
        assert r["conflict/norm_ratio"] >= 0 and math.isfinite(r["conflict/norm_ratio"])
        assert r["conflict/steps"] == 4  # 256 images / 64 per step, every step measured
        for b in BLOCKS:
            assert -1.0 <= r[f"conflict/block/{b}"] <= 1.0
            assert 0.0 <= r[f"conflict/block_fraction/{b}"] <= 1.0
    # the probes draw no random numbers and touch no .grad: the same run without them trains identically
    plain = train(_config(), runs_dir=runs_dir, echo=False)
    for a, b in zip(_metrics(plain), records):
        assert a["loss/ce"] == b["loss/ce"] and a["top1"] == b["top1"]
        assert not any(k.startswith(("cka/", "conflict/")) for k in a)


def test_conflict_cadence_and_student_alone(fmnist_available, runs_dir):
    # every 3rd step of 4 per epoch: global steps 0, 3 | 6 -> 2 then 1 measured steps; no teacher, no CKA
    r = train(_config(["train.conflict_every=3"]), runs_dir=runs_dir, echo=False)
    assert [m["conflict/steps"] for m in _metrics(r)] == [2, 1]
    alone = train(_config(["train.conflict_every=1", "train.probe_every=1"], method="none"), runs_dir=runs_dir,
                  echo=False)
    assert not any(k.startswith(("cka/", "conflict/")) for m in _metrics(alone) for k in m)


def test_conflict_probe_agree_and_oppose():
    cfg = _config(["train.conflict_every=1"])
    student = small_model("vit_mini")
    probes = TrainingProbes(cfg, student, None, test_loader=None, device=torch.device("cpu"))
    x = torch.randn(8, 1, 16, 16)
    loss = student(x).logits.pow(2).mean()
    probes.on_losses({"ce": loss, "kd": 0.5 * loss}, global_step=0)       # same direction
    probes.on_losses({"ce": loss, "kd": -2.0 * loss}, global_step=1)      # opposite direction
    agree, oppose = probes.tracker.history
    assert agree.cosine == pytest.approx(1.0, abs=1e-6) and agree.norm_ratio == pytest.approx(0.5, rel=1e-5)
    assert oppose.cosine == pytest.approx(-1.0, abs=1e-6) and oppose.norm_ratio == pytest.approx(2.0, rel=1e-5)
    values = probes.epoch_values(0, last_epoch=True)
    assert values["conflict/fraction"] == 0.5 and values["conflict/cosine"] == pytest.approx(0.0, abs=1e-6)
    assert values["conflict/steps"] == 2 and len(probes.tracker) == 0  # reset per epoch


class _FakeLoader:
    def __init__(self, n, batch):
        self.labels = torch.arange(n)
        self.n, self.batch = n, batch

    def batches(self):
        for s in range(0, self.n, self.batch):
            idx = torch.arange(s, min(s + self.batch, self.n))
            yield idx.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone(), idx


def test_probe_set_is_a_fixed_seeded_draw():
    a = probe_set(_FakeLoader(1000, 64), 130, 64)
    b = probe_set(_FakeLoader(1000, 128), 130, 64)
    ids = torch.cat([t[:, 0, 0, 0] for t in a])
    assert ids.tolist() == torch.cat([t[:, 0, 0, 0] for t in b]).tolist()  # independent of the loader's batch
    assert len(ids) == 130 and len(set(ids.tolist())) == 130 and ids.max() > 500  # spread over the set
    assert [t.shape[0] for t in a] == [64, 66]  # a last minibatch of 2 (< 4) is merged into the one before
    small = probe_set(_FakeLoader(50, 16), 512, 512)
    assert sum(t.shape[0] for t in small) == 50
