"""DKD (Zhao et al. 2022) against an independent numpy computation on hand-made logits."""
import math

import numpy as np
import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.models.taps import Features
from hkdbench.benchmark.models.zoo import create_model
from hkdbench.methods import Targets, get_method, kd_kl, list_methods, method_config
from hkdbench.methods.dkd import DKD, decoupled_kl

STUDENT = np.array([[2.0, -1.0, 0.5, 0.0, 1.5],
                    [0.1, 0.2, -0.3, 3.0, -2.0],
                    [-1.0, 4.0, 1.0, 0.0, 0.5],
                    [1.0, 1.0, 1.0, 1.0, -1.0]])
TEACHER = np.array([[3.0, 0.0, -1.0, 0.5, 1.0],
                    [-0.5, 1.0, 0.0, 2.0, -1.0],
                    [0.0, 5.0, 2.0, -1.0, 0.0],
                    [2.0, -2.0, 0.5, 0.0, 3.0]])
TARGET = np.array([0, 3, 1, 4])  # first and last class included: the non-target gather's edge cases


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


def np_dkd_rows(zs, zt, y, T):
    """Per-row TCKD, NCKD, teacher non-target mass, and the full KL, straight from the definitions."""
    rows = []
    for s, t, c in zip(zs, zt, y):
        ps, pt = np_softmax(s / T), np_softmax(t / T)
        bs, bt = np.array([ps[c], 1 - ps[c]]), np.array([pt[c], 1 - pt[c]])
        qs, qt = np_softmax(np.delete(s, c) / T), np_softmax(np.delete(t, c) / T)
        rows.append((np_kl(bt, bs), np_kl(qt, qs), 1 - pt[c], np_kl(pt, ps)))
    return np.array(rows)


def np_ce(z, y):
    return float(np.mean([-np.log(np_softmax(r)[c]) for r, c in zip(z, y)]))


def tensors():
    return (torch.tensor(STUDENT, dtype=torch.float32), torch.tensor(TEACHER, dtype=torch.float32),
            torch.tensor(TARGET))


def make(**overrides):
    cfg = DKD.Config(**overrides)
    return DKD(cfg, student=None, teacher=torch.nn.Identity(), num_classes=STUDENT.shape[1])


def run_losses(method, zs, zt, y, epoch):
    return method.losses(Features(zs, zs), Features(zt, zt), Targets(y), epoch)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_terms_match_numpy_and_decompose_kd(T):
    zs, zt, y = tensors()
    tckd, nckd, mass = decoupled_kl(zs, zt, y, T)
    ref = np_dkd_rows(STUDENT, TEACHER, TARGET, T)
    np.testing.assert_allclose(tckd.numpy(), ref[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nckd.numpy(), ref[:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass.numpy(), ref[:, 2], rtol=1e-5, atol=1e-6)
    # KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD, row by row, against the numpy KL ...
    np.testing.assert_allclose((tckd + mass * nckd).numpy(), ref[:, 3], rtol=1e-5, atol=1e-6)
    # ... and, averaged and times T^2, the project's KD term
    kd = kd_kl(zs, zt, T)
    assert torch.allclose((tckd + mass * nckd).mean() * T ** 2, kd, rtol=1e-5, atol=1e-6)


def test_losses_are_weighted_as_the_paper():
    zs, zt, y = tensors()
    alpha, beta, T = 1.5, 3.0, 2.0
    method = make(alpha=alpha, beta=beta, temperature=T, warmup_epochs=0, gt_weight=0.7)
    out = run_losses(method, zs, zt, y, epoch=0)
    assert set(out) == {"ce", "dkd"}
    ref = np_dkd_rows(STUDENT, TEACHER, TARGET, T)
    expected = (alpha * ref[:, 0].mean() + beta * ref[:, 1].mean()) * T ** 2
    assert out["dkd"].item() == pytest.approx(expected, rel=1e-5)
    assert out["ce"].item() == pytest.approx(0.7 * np_ce(STUDENT, TARGET), rel=1e-5)


# the trainer's epochs count from 0; the warm-up, like mdistiller's, from 1
@pytest.mark.parametrize("epoch,factor", [(0, 0.05), (1, 0.1), (4, 0.25), (18, 0.95), (19, 1.0), (300, 1.0)])
def test_linear_warmup(epoch, factor):
    zs, zt, y = tensors()
    ref = np_dkd_rows(STUDENT, TEACHER, TARGET, 4.0)
    full = (1.0 * ref[:, 0].mean() + 8.0 * ref[:, 1].mean()) * 16.0
    out = run_losses(make(), zs, zt, y, epoch)  # defaults: warm-up over 20 epochs
    assert out["dkd"].item() == pytest.approx(factor * full, rel=1e-5, abs=1e-8)
    # the CE term is never warmed up
    assert out["ce"].item() == pytest.approx(np_ce(STUDENT, TARGET), rel=1e-5)


def test_no_warmup_when_zero():
    zs, zt, y = tensors()
    assert run_losses(make(warmup_epochs=0), zs, zt, y, 0)["dkd"].item() > 0


def test_identical_logits_give_zero():
    zs, _, y = tensors()
    out = run_losses(make(warmup_epochs=0), zs, zs.clone(), y, 0)
    assert abs(out["dkd"].item()) < 1e-6


def test_gradients_reach_student_logits_only():
    zs, zt, y = tensors()
    zs.requires_grad_(True)
    out = run_losses(make(warmup_epochs=0), zs, zt, y, 0)
    out["dkd"].backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_confident_logits_stay_finite():
    zs = torch.tensor([[80.0, -80.0, 0.0], [-60.0, 0.0, 60.0]], requires_grad=True)
    zt = torch.tensor([[-90.0, 90.0, 0.0], [0.0, 70.0, -70.0]])
    y = torch.tensor([0, 2])
    tckd, nckd, _ = decoupled_kl(zs, zt, y, 1.0)
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()
    assert (tckd >= -1e-4).all() and (nckd >= -1e-4).all()
    (tckd.mean() + nckd.mean()).backward()
    assert torch.isfinite(zs.grad).all()


def test_half_precision_inputs_computed_in_float32():
    zs, zt, y = tensors()
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    tckd, nckd, _ = decoupled_kl(zs16, zt16, y, 4.0)
    assert tckd.dtype == torch.float32 and nckd.dtype == torch.float32
    ref = np_dkd_rows(zs16.double().numpy(), zt16.double().numpy(), TARGET, 4.0)  # the rounded logits
    np.testing.assert_allclose(tckd.numpy(), ref[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nckd.numpy(), ref[:, 1], rtol=1e-5, atol=1e-6)


def test_defaults_and_validation():
    cfg = DKD.Config()
    assert (cfg.gt_weight, cfg.alpha, cfg.beta, cfg.temperature, cfg.warmup_epochs) == (1.0, 1.0, 8.0, 4.0, 20.0)
    for bad in [dict(temperature=0.0), dict(temperature=-1.0), dict(beta=-1.0), dict(alpha=math.nan),
                dict(warmup_epochs=-5), dict(gt_weight=math.inf)]:
        with pytest.raises(ValueError, match="dkd"):
            DKD.Config(**bad)
    with pytest.raises(ConfigError, match="temperature"):
        method_config("dkd", {"temperature": 0})
    assert method_config("dkd", {"beta": 2}).beta == 2.0


def test_registered_and_trains_with_mini_models():
    assert "dkd" in list_methods() and get_method("dkd") is DKD
    torch.manual_seed(0)
    student = create_model("resnet_mini", 10, in_chans=1, img_size=16)
    teacher = create_model("vit_mini", 10, in_chans=1, img_size=16)
    method = DKD(method_config("dkd", {"warmup_epochs": 0}), student, teacher, num_classes=10)
    assert method.extra_parameter_count() == 0
    images, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 3, 9, 3])
    _, out = method.training_step(images, Targets(labels), epoch=0)
    assert set(out) == {"ce", "dkd"} and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
