"""DIST (Huang et al. 2022) against numpy.corrcoef on hand-made logits."""
import math

import numpy as np
import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.models.taps import Features
from hkdbench.benchmark.models.zoo import create_model
from hkdbench.methods import Targets, get_method, list_methods, method_config
from hkdbench.methods.dist import DIST, dist_terms, pearson_rows

STUDENT = np.array([[2.0, -1.0, 0.5, 0.0, 1.5],
                    [0.1, 0.2, -0.3, 3.0, -2.0],
                    [-1.0, 4.0, 1.0, 0.0, 0.5],
                    [1.0, 1.0, 1.0, 1.0, -1.0]])
TEACHER = np.array([[3.0, 0.0, -1.0, 0.5, 1.0],
                    [-0.5, 1.0, 0.0, 2.0, -1.0],
                    [0.0, 5.0, 2.0, -1.0, 0.0],
                    [2.0, -2.0, 0.5, 0.0, 3.0]])
TARGET = np.array([0, 3, 1, 4])


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_dist(zs, zt, T):
    """(inter, intra) times T^2 with numpy.corrcoef as the Pearson correlation."""
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(ps.shape[0])])
    intra = 1 - np.mean([np.corrcoef(ps[:, j], pt[:, j])[0, 1] for j in range(ps.shape[1])])
    return T ** 2 * inter, T ** 2 * intra


def np_ce(z, y):
    return float(np.mean([-np.log(np_softmax(r)[c]) for r, c in zip(z, y)]))


def tensors():
    return (torch.tensor(STUDENT, dtype=torch.float32), torch.tensor(TEACHER, dtype=torch.float32),
            torch.tensor(TARGET))


def make(**overrides):
    return DIST(DIST.Config(**overrides), student=None, teacher=torch.nn.Identity(), num_classes=5)


def run_losses(method, zs, zt, y):
    return method.losses(Features(zs, zs), Features(zt, zt), Targets(y), 0)


def test_pearson_rows_matches_corrcoef():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    got = pearson_rows(torch.tensor(a), torch.tensor(b)).numpy()
    np.testing.assert_allclose(got, [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)], rtol=1e-10)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_terms_match_corrcoef(T):
    zs, zt, _ = tensors()
    inter, intra = dist_terms(zs, zt, T)
    ref_inter, ref_intra = np_dist(STUDENT, TEACHER, T)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-4, abs=1e-6)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-4, abs=1e-6)


def test_losses_are_weighted():
    zs, zt, y = tensors()
    out = run_losses(make(beta=0.5, gamma=3.0, temperature=2.0, gt_weight=0.7), zs, zt, y)
    assert set(out) == {"ce", "dist_inter", "dist_intra"}
    ref_inter, ref_intra = np_dist(STUDENT, TEACHER, 2.0)
    assert out["dist_inter"].item() == pytest.approx(0.5 * ref_inter, rel=1e-4)
    assert out["dist_intra"].item() == pytest.approx(3.0 * ref_intra, rel=1e-4)
    assert out["ce"].item() == pytest.approx(0.7 * np_ce(STUDENT, TARGET), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_identical_logits_give_zero(T):
    zs, _, y = tensors()
    out = run_losses(make(temperature=T), zs, zs.clone(), y)
    assert abs(out["dist_inter"].item()) < 1e-5 and abs(out["dist_intra"].item()) < 1e-5


def test_gradients_reach_student_logits():
    zs, zt, y = tensors()
    zs.requires_grad_(True)
    out = run_losses(make(), zs, zt, y)
    (out["dist_inter"] + out["dist_intra"]).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_batch_of_one_is_finite():
    zs = torch.tensor(STUDENT[:1], dtype=torch.float32, requires_grad=True)
    zt = torch.tensor(TEACHER[:1], dtype=torch.float32)
    inter, intra = dist_terms(zs, zt, 1.0)
    assert intra.item() == pytest.approx(1.0)  # no variation across a batch of one: correlation 0
    (inter + intra).backward()
    assert torch.isfinite(zs.grad).all()


def test_half_precision_inputs_computed_in_float32():
    zs, zt, _ = tensors()
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    inter, intra = dist_terms(zs16, zt16, 1.0)
    assert inter.dtype == torch.float32 and intra.dtype == torch.float32
    ref_inter, ref_intra = np_dist(zs16.double().numpy(), zt16.double().numpy(), 1.0)
    assert inter.item() == pytest.approx(ref_inter, rel=1e-4)
    assert intra.item() == pytest.approx(ref_intra, rel=1e-4)


def test_defaults_and_validation():
    cfg = DIST.Config()
    assert (cfg.gt_weight, cfg.beta, cfg.gamma, cfg.temperature) == (1.0, 1.0, 1.0, 1.0)
    for bad in [dict(temperature=0.0), dict(beta=-1.0), dict(gamma=math.nan), dict(gt_weight=-0.1)]:
        with pytest.raises(ValueError, match="dist"):
            DIST.Config(**bad)
    with pytest.raises(ConfigError, match="temperature"):
        method_config("dist", {"temperature": -2})


def test_registered_and_trains_with_mini_models():
    assert "dist" in list_methods() and get_method("dist") is DIST
    torch.manual_seed(0)
    student = create_model("mixer_mini", 10, in_chans=1, img_size=16)
    teacher = create_model("convnext_mini", 10, in_chans=1, img_size=16)
    method = DIST(method_config("dist"), student, teacher, num_classes=10)
    assert method.extra_parameter_count() == 0
    _, out = method.training_step(torch.randn(4, 1, 16, 16), Targets(torch.tensor([1, 2, 3, 4])))
    assert set(out) == {"ce", "dist_inter", "dist_intra"} and all(torch.isfinite(v) for v in out.values())
    sum(out.values()).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


# -- DIST's gradient on near-uniform student probabilities (issue 21, item 5) -----------------------------------------

def f64_dist(zs, zt, T=1.0):
    """DIST from the paper's definition in float64, its own way: Pearson's r as covariance over the product of the
    standard deviations (no epsilon: undefined for a constant vector)."""
    def r(a, b):  # rows
        cov = ((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).mean(1)
        return cov / (a.std(1, unbiased=False) * b.std(1, unbiased=False))
    ps, pt = torch.softmax(zs.double() / T, 1), torch.softmax(zt.double() / T, 1)
    return T ** 2 * (1 - r(ps, pt).mean()) + T ** 2 * (1 - r(ps.t(), pt.t()).mean())


def reference_code_dist(zs, zt):
    """The loss as hunto/DIST_KD's code writes Pearson's r: the cosine of the centred vectors, eps=1e-8 added to the
    product of the norms (ours clamps the product at 1e-8 instead)."""
    def r(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    ps, pt = zs.softmax(1), zt.softmax(1)
    return (1 - r(ps, pt).mean()) + (1 - r(ps.t(), pt.t()).mean())


def logit_gradient(loss_fn, zs, *args):
    z = zs.clone().requires_grad_(True)
    loss_fn(z, *args).backward()
    return z.grad


def near_uniform_case(scale, batch=64, classes=10):
    """Student logits of size ``scale`` (an untrained student), a confident teacher's logits, labels."""
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(batch, classes, generator=g, dtype=torch.float64) * 3
    zs = torch.randn(batch, classes, generator=g, dtype=torch.float64) * scale
    return zs, zt, torch.randint(0, classes, (batch,), generator=g)


def ours(zs, zt):
    inter, intra = dist_terms(zs, zt.float(), 1.0)
    return inter + intra


@pytest.mark.parametrize("scale", [1.0, 1e-2, 1e-3, 1e-4])
def test_our_float32_gradient_is_the_float64_definitions_on_near_uniform_probabilities(scale):
    zs, zt, _ = near_uniform_case(scale)
    reference = logit_gradient(f64_dist, zs, zt)
    got = logit_gradient(ours, zs.float(), zt).double()
    # float32 resolves the probabilities' deviations from 1/C (~scale / C) to ~1e-8: the error grows as 1/scale
    assert (got - reference).norm() / reference.norm() < max(1e-5, 2e-8 / scale)


def test_the_gradient_grows_as_one_over_the_student_logits_spread():
    """Near uniform, p = (1 + z - mean z) / C to first order, so the centred probabilities are (z - mean z) / C and
    d r / d z of row i is (b_i - r_i a_i) / |z_i - mean z_i| (a, b: the unit centred vectors): each row's
    inter-class gradient has norm sqrt(1 - r_i^2) / (B |z_i - mean z_i|), while cross-entropy's stays ~|p - y| / B."""
    for scale in (1e-2, 1e-3):
        zs, zt, y = near_uniform_case(scale)

        def inter(z, t):
            return dist_terms(z, t, 1.0)[0]
        grad = logit_gradient(inter, zs, zt)
        centred = zs - zs.mean(1, keepdim=True)
        r = pearson_rows(torch.softmax(zs, 1), torch.softmax(zt, 1))
        predicted = (1 - r ** 2).sqrt() / (zs.shape[0] * centred.norm(dim=1))
        np.testing.assert_allclose(grad.norm(dim=1).numpy(), predicted.numpy(), rtol=0.05)
        task = logit_gradient(torch.nn.functional.cross_entropy, zs, y)
        ratio = (grad.norm() / task.norm()).item()
        assert 0.3 / scale < ratio < 3 / scale  # ~1/scale


def test_a_zero_initialised_mixer_head_meets_the_epsilon_not_a_bug():
    """timm's MLP-Mixer starts with a zero head: its first logits are exactly 0, its probabilities uniform up to
    float32 rounding (~1e-8), Pearson's r undefined. Our clamp and the reference code's +eps then both divide by
    ~1e-8: a distillation gradient ~1e6-1e7 times the task gradient at step 0 (the Mixer's first conflict probe),
    pointing the same way in both; its exact size is rounding noise over the epsilon."""
    student = create_model("mixer_mini", 10, in_chans=1, img_size=16)
    assert torch.count_nonzero(student(torch.randn(4, 1, 16, 16)).logits) == 0
    zs, zt, y = near_uniform_case(0.0)
    ours_grad = logit_gradient(ours, zs.float(), zt).flatten()
    reference_grad = logit_gradient(reference_code_dist, zs.float(), zt.float()).flatten()
    assert torch.nn.functional.cosine_similarity(ours_grad, reference_grad, 0) > 0.99
    assert 1 / 3 < (ours_grad.norm() / reference_grad.norm()).item() < 3
    task = logit_gradient(lambda z: torch.nn.functional.cross_entropy(z, y), zs.float())
    for grad in (ours_grad, reference_grad):
        assert 1e6 < (grad.norm() / task.norm()).item() < 1e8
