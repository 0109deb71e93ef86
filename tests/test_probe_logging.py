"""CKA and gradient-conflict probes logged into metrics.jsonl by a real (tiny) training run."""
import json
import math
from pathlib import Path

import pytest
import torch

from hkdbench.benchmark.core.config import identity
from hkdbench.benchmark.probes.cka import probe_set
from hkdbench.benchmark.probes.hooks import TrainingProbes
from hkdbench.benchmark.recipes.resolve import resolve_run_config
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
    tracker = probes.probes["conflict"].tracker
    agree, oppose = tracker.history
    assert agree.cosine == pytest.approx(1.0, abs=1e-6) and agree.norm_ratio == pytest.approx(0.5, rel=1e-5)
    assert oppose.cosine == pytest.approx(-1.0, abs=1e-6) and oppose.norm_ratio == pytest.approx(2.0, rel=1e-5)
    values = probes.epoch_values(0, last_epoch=True)
    assert values["conflict/fraction"] == 0.5 and values["conflict/cosine"] == pytest.approx(0.0, abs=1e-6)
    assert values["conflict/steps"] == 2 and len(tracker) == 0  # reset per epoch


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


# ------------------------------------------------------------------ the student alone, probed against teacher runs

def _teacher_runs(runs_dir, teachers=("resnet_mini", "mixer_mini")):
    """Trains each teacher as a sweep would (the teacher run of a kd student): name -> its run directory."""
    from hkdbench.benchmark.recipes.resolve import teacher_run_config

    out = {}
    for t in teachers:
        cfg = resolve_run_config(kind="student", student="vit_mini", teacher=t, method="kd", recipe="demo",
                                 overrides=TINY, teacher_overrides=TEACHER)
        result = train(teacher_run_config(cfg), runs_dir=runs_dir, echo=False)
        out[result.run_dir.path.name] = result.run_dir
    return out


def test_student_alone_probed_against_named_teacher_runs(fmnist_available, runs_dir):
    """A `none` run with train.probe_teachers logs cka@<teacher run>/... for each, equal to CKA recomputed from the
    kept weights (its last, the teacher run's best) on the probe set; no cka/ keys of its own; the probe changes
    nothing in training; without the field, the field is no part of the run's identity."""
    from hkdbench.benchmark.data import loaders
    from hkdbench.benchmark.engine.records import load_weights
    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.probes.cka import cka_matrix

    teachers = _teacher_runs(runs_dir)
    names = tuple(sorted(teachers))
    probed_cfg = resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo",
                                    overrides=TINY + ["train.probe_every=1", "train.probe_images=96",
                                                      f"train.probe_teachers=[{','.join(names)}]"])
    assert probed_cfg.train.probe_teachers == names
    probed = train(probed_cfg, runs_dir=runs_dir, echo=False)
    records = _metrics(probed)
    stages = {f"t{i}_s{j}" for i in range(1, 5) for j in range(1, 5)}
    for r in records:
        assert not any(k.startswith("cka/") for k in r)
        for name in names:
            assert {k.split("/")[-1] for k in r if k.startswith(f"cka@{name}/linear/")} == stages
    # recomputed from the kept weights: the last epoch's probe saw the last weights
    cfg = probed_cfg
    _, test_loader, info = loaders.build_loaders(cfg.data, torch.device("cpu"), 0.875)
    batches = probe_set(test_loader, 96, min(cfg.data.eval_batch_size, 96))
    student = create_model("vit_mini", info.num_classes, in_chans=info.in_chans, img_size=cfg.data.img_size)
    student.model.load_state_dict(load_weights(probed.run_dir, "last"))
    for name, rd in teachers.items():
        teacher = create_model(rd.config().student.name, info.num_classes, in_chans=info.in_chans,
                               img_size=cfg.data.img_size)
        teacher.model.load_state_dict(load_weights(rd, "best"))
        want = cka_matrix(teacher, student, batches, torch.device("cpu"), prefix=f"cka@{name}")
        assert set(want) <= set(records[-1])
        for k, v in want.items():
            assert records[-1][k] == pytest.approx(v, abs=1e-5), k
    # the same run without the probe: the same training, and its identity holds no trace of the field
    plain_cfg = resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo",
                                   overrides=TINY + ["train.probe_every=1", "train.probe_images=96"])
    assert plain_cfg.run_name() != probed_cfg.run_name()
    assert "probe_teachers" not in identity(plain_cfg)["train"]
    assert identity(probed_cfg)["train"]["probe_teachers"] == list(names)
    plain = train(plain_cfg, runs_dir=runs_dir, echo=False)
    for a, b in zip(_metrics(plain), records):
        assert a["loss/ce"] == b["loss/ce"] and a["top1"] == b["top1"]
    a, b = load_weights(plain.run_dir, "last"), load_weights(probed.run_dir, "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_probe_teachers_bad_input_fails_before_anything_is_written(fmnist_available, runs_dir):
    from hkdbench.benchmark.core.config import ConfigError
    from hkdbench.benchmark.engine.teacher import ProbeTeacherMissingError

    probe = ["train.probe_every=1", "train.probe_teachers=[teacher_resnet_mini_fashion-mnist_s0_000000000000]"]
    cfg = resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo", overrides=TINY + probe)
    with pytest.raises(ProbeTeacherMissingError, match="no finished run in .*teacher_resnet_mini_fashion-mnist_s0_0+"):
        train(cfg, runs_dir=runs_dir, echo=False)
    assert not (Path(runs_dir) / cfg.run_name()).exists()
    with pytest.raises(ConfigError, match="probes its own teacher"):
        _config(probe)
    with pytest.raises(ConfigError, match="needs train.probe_every > 0"):
        resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo", overrides=probe[1:])
    with pytest.raises(ConfigError, match="must name teacher runs"):
        resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo",
                           overrides=["train.probe_every=1", "train.probe_teachers=[kd_resnet_mini]"])


def test_a_cli_cohort_probes_its_student_alone_against_the_cohorts_teacher(fmnist_available, runs_dir):
    """`hkdbench train --method none,kd --teacher T` with CKA probes: the teacher run is trained first (it is not
    in the store yet), then the student alone is probed against it as kd is: cka@<teacher run>/..."""
    from hkdbench.benchmark.cli.main import main
    from hkdbench.benchmark.core.store import RunStore

    probe = ["train.probe_every=1", "train.probe_images=64"]
    code = main(["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "none,kd", "--recipe",
                 "demo", *TINY, *probe, *[f"teacher.{o}" for o in TEACHER], "--runs-dir", str(runs_dir)])
    assert code == 0
    runs = {rd.config().method if rd.config().kind == "student" else "teacher": rd for rd in RunStore(runs_dir).runs()}
    assert set(runs) == {"none", "kd", "teacher"}
    teacher_run = runs["teacher"].path.name
    assert runs["none"].config().train.probe_teachers == (teacher_run,)
    assert runs["kd"].config().teacher_run == teacher_run
    alone, kd = runs["none"].metrics()[-1], runs["kd"].metrics()[-1]
    assert sum(k.startswith(f"cka@{teacher_run}/linear/") for k in alone) == 16
    assert sum(k.startswith("cka/linear/") for k in kd) == 16
