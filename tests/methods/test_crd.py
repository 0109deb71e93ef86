"""CRD against the reference formulas (OFAKD distillers/crd.py, RepDistiller crd/memory.py + crd/criterion.py),
written here independently in float64 with plain loops, on small hand-sized cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import ConfigError, OptimConfig
from hkdbench.benchmark.engine.optim import LRSchedule, build_optimizer
from hkdbench.methods import Targets, TrainingSet, get_method, method_config
from hkdbench.methods.crd import ContrastMemory, NegativeSampler, nce_loss

NUM_CLASSES = 10


def ref_nce(scores, num_data):
    """ContrastLoss.forward of the reference, one sample and one term at a time."""
    batch, m = len(scores), len(scores[0]) - 1
    pn, eps, total = 1.0 / num_data, 1e-7, 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + m * pn + eps))
        total += sum(math.log(m * pn / (x + m * pn + eps)) for x in row[1:])
    return -total / batch


def test_nce_loss_against_the_reference_formula():
    scores = torch.tensor([[0.9, 0.01, 0.2], [0.05, 0.3, 0.002]])
    assert nce_loss(scores, 50).item() == pytest.approx(ref_nce(scores.tolist(), 50), rel=1e-6)
    # a hand-computed case: one sample, one negative, N = 2 (m P_n = 0.5)
    hand = -(math.log(0.5 / (0.5 + 0.5 + 1e-7)) + math.log(0.5 / (0.5 + 0.5 + 1e-7)))
    assert nce_loss(torch.tensor([[0.5, 0.5]]), 2).item() == pytest.approx(hand, rel=1e-6)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_memory_scores_z_and_momentum_update_against_the_reference():
    torch.manual_seed(0)
    n, dim, t, m = 6, 3, 0.5, 0.25
    memory = ContrastMemory(dim, n, temperature=t, momentum=m)
    bank_s, bank_t = memory.memory_student.double().numpy().copy(), memory.memory_teacher.double().numpy().copy()
    bound = 1 / math.sqrt(dim / 3)
    assert bank_s.min() >= -bound and bank_s.max() < bound  # the reference's uniform init
    v_s = nn.functional.normalize(torch.randn(2, dim), dim=1)
    v_t = nn.functional.normalize(torch.randn(2, dim), dim=1)
    rows = torch.tensor([[4, 0, 2], [1, 5, 5]])

    out_s, out_t = memory(v_s, v_t, rows)

    vs, vt = v_s.double().numpy(), v_t.double().numpy()
    raw_s = np.array([[math.exp(bank_t[j] @ vs[i] / t) for j in r] for i, r in enumerate(rows.tolist())])
    raw_t = np.array([[math.exp(bank_s[j] @ vt[i] / t) for j in r] for i, r in enumerate(rows.tolist())])
    z_s, z_t = raw_s.mean() * n, raw_t.mean() * n  # Z = N * mean of the first batch
    assert memory.z_student.item() == pytest.approx(z_s, rel=1e-5)
    assert memory.z_teacher.item() == pytest.approx(z_t, rel=1e-5)
    np.testing.assert_allclose(out_s.double().numpy(), raw_s / z_s, rtol=1e-5)
    np.testing.assert_allclose(out_t.double().numpy(), raw_t / z_t, rtol=1e-5)
    # the banks' rows of the batch (4 and 1) are normalize(m * row + (1 - m) * v); every other row is kept
    new_s, new_t = memory.memory_student.double().numpy(), memory.memory_teacher.double().numpy()
    for i, row in enumerate((4, 1)):
        np.testing.assert_allclose(new_s[row], _unit(m * bank_s[row:row + 1] + (1 - m) * vs[i:i + 1])[0], rtol=1e-5)
        np.testing.assert_allclose(new_t[row], _unit(m * bank_t[row:row + 1] + (1 - m) * vt[i:i + 1])[0], rtol=1e-5)
    for row in (0, 2, 3, 5):
        assert np.array_equal(new_s[row], bank_s[row].astype(np.float32))
        assert np.array_equal(new_t[row], bank_t[row].astype(np.float32))
    # Z is fixed after the first batch
    memory(v_s, v_t, rows)
    assert memory.z_student.item() == pytest.approx(z_s, rel=1e-5)


def test_negatives_are_other_classes_uniformly_and_the_positive_comes_first():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])  # unequal classes
    sampler = NegativeSampler(labels, k=20_000)
    index = torch.tensor([1, 4, 7])
    torch.manual_seed(0)
    rows = sampler(index)
    assert rows.shape == (3, 20_001) and torch.equal(rows[:, 0], index)
    for i, sample in enumerate(index.tolist()):
        negatives = rows[i, 1:]
        others = (labels != labels[sample]).nonzero().flatten()
        assert set(negatives.tolist()) == set(others.tolist())  # every other-class sample, no same-class one
        freq = torch.bincount(negatives, minlength=len(labels))[others].double() / len(negatives)
        assert torch.allclose(freq, torch.full_like(freq, 1 / len(others)), atol=0.015)
    with pytest.raises(ValueError, match="at least 2 classes"):
        NegativeSampler(torch.zeros(5, dtype=torch.long), 3)


def _crd(minis, teacher="swin_mini", student="vit_mini", **overrides):
    labels = torch.arange(40) % NUM_CLASSES
    cfg = method_config("crd", {"nce_k": 7, **overrides})
    method = get_method("crd").build(cfg, minis[student], minis[teacher], NUM_CLASSES,
                                     train_set=TrainingSet(labels))
    return method, labels


def test_losses_against_an_independent_computation(minis):
    torch.manual_seed(1)
    method, labels = _crd(minis)
    images, index = torch.randn(3, 1, 16, 16), torch.tensor([5, 12, 33])
    bank_s, bank_t = method.memory.memory_student.clone(), method.memory.memory_teacher.clone()
    torch.manual_seed(7)
    rows = method.sampler(index)  # the draw the step makes next under the same seed
    torch.manual_seed(7)
    _, losses = method.training_step(images, Targets(labels[index], index=index))

    with torch.no_grad():
        s, t = minis["vit_mini"](images), minis["swin_mini"](images)
        v_s = nn.functional.normalize(s.pre_logits @ method.embed_student.linear.weight.T
                                      + method.embed_student.linear.bias, dim=1).double()
        v_t = nn.functional.normalize(t.pre_logits @ method.embed_teacher.linear.weight.T
                                      + method.embed_teacher.linear.bias, dim=1).double()
        raw_s = torch.exp(torch.stack([bank_t.double()[r] @ v_s[i] for i, r in enumerate(rows)]) / 0.07)
        raw_t = torch.exp(torch.stack([bank_s.double()[r] @ v_t[i] for i, r in enumerate(rows)]) / 0.07)
        p_s, p_t = raw_s / (raw_s.mean() * 40), raw_t / (raw_t.mean() * 40)
        expected = ref_nce(p_s.tolist(), 40) + ref_nce(p_t.tolist(), 40)
        ce = nn.functional.cross_entropy(s.logits, labels[index]).item()
    assert set(losses) == {"ce", "crd"}
    assert losses["crd"].item() == pytest.approx(expected, rel=1e-4)
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert method.extra_parameter_count() == (minis["vit_mini"].num_features + 1) * 128 + \
        (minis["swin_mini"].num_features + 1) * 128


def test_weights_scale_the_terms(minis):
    torch.manual_seed(1)
    method, labels = _crd(minis, crd_weight=0.0, gt_weight=2.0)
    index = torch.tensor([0, 1])
    _, losses = method.training_step(torch.randn(2, 1, 16, 16), Targets(labels[index], index=index))
    assert losses["crd"].item() == 0.0 and losses["ce"].item() > 0


def test_gradients_reach_the_embed_heads_and_the_student_only(minis):
    torch.manual_seed(2)
    method, labels = _crd(minis, teacher="resnet_mini", student="mixer_mini")
    index = torch.tensor([3, 9, 20, 31])
    _, losses = method.training_step(torch.randn(4, 1, 16, 16), Targets(labels[index], index=index))
    losses["crd"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in minis["mixer_mini"].parameters())
    assert all(p.grad is None for p in minis["resnet_mini"].parameters())
    assert not any(b.requires_grad for b in method.buffers())


def test_state_dict_holds_the_banks_and_z_not_the_labels(minis):
    method, labels = _crd(minis)
    index = torch.tensor([0, 1])
    method.training_step(torch.randn(2, 1, 16, 16), Targets(labels[index], index=index))
    state = method.state_dict()
    assert {"memory.memory_student", "memory.memory_teacher", "memory.z_student", "memory.z_teacher"} <= set(state)
    assert state["memory.memory_student"].shape == (40, 128) and state["memory.z_student"] > 0
    assert not any(k.startswith("sampler.") for k in state)  # derived from the data, rebuilt every run


def test_head_lr_scale_gives_the_heads_their_own_group(minis):
    method, _ = _crd(minis, head_lr_scale=0.5)
    module = nn.ModuleDict({"student": minis["vit_mini"], "method": method})
    cfg = OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, warmup_epochs=0)
    optimizer = build_optimizer(cfg, [module], method.optimizer_groups())
    LRSchedule(cfg, optimizer, 10, 5).apply(3, 0)
    heads = {id(p) for p in method.parameters()}
    for group in optimizer.param_groups:
        in_heads = {id(p) in heads for p in group["params"]}
        assert len(in_heads) == 1  # a group is all heads or all student
        scale = 0.5 if in_heads == {True} else 1.0
        assert group["lr"] == pytest.approx(optimizer.param_groups[0]["lr"] * scale)
        decayed = all(p.ndim > 1 for p in group["params"])
        assert group["weight_decay"] == (1e-4 if decayed else 0.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == \
        sum(1 for p in module.parameters() if p.requires_grad)
    # the default (scale 1) adds no group: the reference's groups exactly
    default, _ = _crd(minis)
    assert default.optimizer_groups() == []


@pytest.mark.parametrize("override,message", [
    ("nce_t=0", "crd nce_t must be > 0"), ("nce_m=1", r"crd nce_m must be in \[0, 1\)"),
    ("nce_k=0", "crd nce_k must be >= 1"), ("crd_weight=nan", "crd crd_weight must be >= 0"),
])
def test_bad_configs_fail_with_what_is_allowed(override, message):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=message):
        method_config("crd", {key: float(value) if key != "nce_k" else int(value)})


def test_defaults_are_the_references():
    cfg = method_config("crd")
    assert (cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m, cfg.crd_weight, cfg.gt_weight) == \
        (128, 16384, 0.07, 0.5, 1.0, 1.0)


# ------------------------------------------------------------------------------ the harness side: indices, CLI

@pytest.mark.usefixtures("fmnist_available")
@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_loaders_yield_each_samples_training_set_index(in_memory):
    from hkdbench.benchmark.core.config import DataConfig
    from hkdbench.benchmark.data.loaders import build_loaders

    cfg = DataConfig(train_subset=96, eval_subset=16, batch_size=16, img_size=28, workers=0, in_memory=in_memory)
    train, _, _ = build_loaders(cfg, torch.device("cpu"), crop_pct=1.0)
    labels = train.all_labels()
    assert len(labels) == 96
    seen = []
    for images, batch_labels, index in train.batches(seed=3, epoch=1, with_index=True):
        assert images.shape[0] == len(index) == 16 and torch.equal(labels[index], batch_labels)
        seen += index.tolist()
    assert sorted(seen) == list(range(96))  # each sample once per epoch
    plain = [y for _, y in train.batches(seed=3, epoch=1)]  # without the flag: the pairs of before
    assert torch.equal(torch.cat(plain), labels[torch.tensor(seen)])


TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=16", "data.img_size=16"]


@pytest.mark.usefixtures("fmnist_available")
def test_crd_trains_and_a_stopped_run_resumes_bit_for_bit(tmp_path):
    """The memory banks, Z and the negatives' RNG are in the checkpoint: stop mid-epoch 2, resume, compare."""
    from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config
    from hkdbench.benchmark.engine.trainer import train

    cfg = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="crd", recipe="demo",
                             overrides=TINY + ["train.epochs=2", "method.nce_k=32", "train.keep_checkpoint=true"],
                             teacher_overrides=TINY + ["train.epochs=1"])
    reference = train(cfg, runs_dir=str(tmp_path / "a"), progress=False)
    history = reference.run_dir.metrics()
    assert [r["epoch"] for r in history] == [1, 2] and all(r["loss/crd"] > 0 for r in history)

    train(teacher_run_config(cfg), runs_dir=str(tmp_path / "b"), progress=False)
    steps = {"n": 0}

    def stop_mid_epoch_2():
        steps["n"] += 1
        return steps["n"] == 6  # 4 steps per epoch

    stopped = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, should_stop=stop_mid_epoch_2)
    assert stopped.status == "interrupted"
    resumed = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, resume=True)
    a = torch.load(reference.run_dir.checkpoint_file, weights_only=False)["module"]
    b = torch.load(resumed.run_dir.checkpoint_file, weights_only=False)["module"]
    assert "method.memory.memory_student" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    timing = ("epoch_time_s", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.run_dir.metrics()] == \
        [{k: v for k, v in r.items() if k not in timing} for r in history]


@pytest.mark.usefixtures("fmnist_available")
def test_crd_in_an_inline_sweep(tmp_path):
    import contextlib
    import io

    from hkdbench.benchmark.cli.main import main
    from hkdbench.benchmark.core.store import RunStore

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["sweep", "demo", "--executor", "inline", "--runs-dir", str(tmp_path), "methods=[crd]",
                     "seeds=[0]", "pairs=[resnet_mini -> vit_mini]", "method.crd.nce_k=64", "train.epochs=1",
                     *TINY, *[f"teacher.{o}" for o in TINY], "teacher.train.epochs=1"])
    assert code == 0, out.getvalue()
    runs = [r for r in RunStore(str(tmp_path)).runs() if r.config().method == "crd"]
    assert len(runs) == 1 and runs[0].is_done and runs[0].config().method_cfg["nce_k"] == 64


def test_under_mixup_the_step_passes_the_unmixed_samples_indices(minis):
    """timm's batch mixup mixes row i (weight lambda) with row B-1-i: row i's index stays the loader's."""
    from hkdbench.benchmark.core.config import DataConfig
    from hkdbench.benchmark.data.loaders import build_mixup
    from hkdbench.benchmark.data.stream import prepare_batch
    from hkdbench.benchmark.engine.step import TrainModule, TrainStep

    method, labels = _crd(minis)
    seen = {}
    losses = method.losses
    method.losses = lambda s, t, targets, epoch=0: seen.setdefault("targets", targets) and losses(s, t, targets)
    module = TrainModule(minis["vit_mini"], method)
    cfg = OptimConfig(name="sgd", lr=0.01, warmup_epochs=0)
    step = TrainStep(cfg, 1, 1, module, module, method, build_optimizer(cfg, [module]),
                     torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    index = torch.tensor([7, 0, 13, 21])
    mixup = build_mixup(DataConfig(mixup=0.8, cutmix=1.0), NUM_CLASSES, 0.1)
    step.step(prepare_batch(torch.randn(4, 1, 16, 16), labels[index], index, mixup), 0, 0)
    targets = seen["targets"]
    assert targets.soft is not None and targets.soft.shape == (4, NUM_CLASSES)
    assert torch.equal(targets.index, index)
    # rows 0 and 3 are partners: each carries the same weight lambda on its own (indexed) sample's label
    own = [targets.soft[row, labels[i]] for row, i in ((0, 7), (3, 21))]
    assert torch.allclose(own[0], own[1])
