"""HCD-lite: the orthogonality loss on hand-made sub-logits, shapes, the assembled terms, all mini pairs."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hkdbench.methods import Targets, get_method, kd_kl
from hkdbench.methods.hcd import HCD, orthogonality_loss

MINI = ("resnet_mini", "vit_mini", "swin_mini", "convnext_mini", "mixer_mini")
NUM_CLASSES = 10


# -- the orthogonality loss -----------------------------------------------------------------------------------------

def test_orthogonal_sub_logits_give_zero():
    # class 0 is the ground truth (its entry is removed); the rest of the rows are mutually orthogonal
    sub = torch.tensor([[[5.0, 2.0, 0.0, 0.0, 0.0],
                         [-3.0, 0.0, 1.5, 0.0, 0.0],
                         [9.0, 0.0, 0.0, -4.0, 0.0]]])
    assert orthogonality_loss(sub, torch.tensor([0]), theta=0.5, mask_mode="zero").item() == 0.0
    # even with theta = 0 (cosines are exactly 0)
    assert orthogonality_loss(sub, torch.tensor([0]), theta=0.0, mask_mode="zero").item() == pytest.approx(0.0)


@pytest.mark.parametrize("theta", [0.5, 0.2, 0.0])
def test_identical_sub_logits_hand_value(theta):
    row = torch.tensor([0.3, -1.0, 2.0, 0.5])
    sub = row.expand(2, 4, 4).clone()
    hard = torch.tensor([1, 3])
    # every pairwise cosine is 1: (1 - theta)^2
    for mode in ("zero", "mask"):
        assert orthogonality_loss(sub, hard, theta, mode).item() == pytest.approx((1 - theta) ** 2, rel=1e-5)


def test_partial_overlap_hand_value():
    # ground truth 0 removed: a = (1, 0), b = (1, 1) -> cos = 1/sqrt(2); loss = (1/sqrt(2) - 0.5)^2 for both pairs
    sub = torch.tensor([[[7.0, 1.0, 0.0], [-2.0, 1.0, 1.0]]])
    expected = (1 / math.sqrt(2) - 0.5) ** 2
    assert orthogonality_loss(sub, torch.tensor([0]), 0.5, "zero").item() == pytest.approx(expected, rel=1e-5)
    # the -1e6 mask makes every row ~ -e_y: the cosine is ~1 whatever the rest (the reported official quirk)
    assert orthogonality_loss(sub, torch.tensor([0]), 0.5, "mask").item() == pytest.approx(0.25, rel=1e-4)


def test_single_sub_logit_has_no_pairs():
    assert orthogonality_loss(torch.randn(3, 1, 5), torch.tensor([0, 1, 2])).item() == 0.0


# -- shapes and the assembled loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("student", MINI)
def test_shapes(minis, student):
    torch.manual_seed(0)
    method = HCD(HCD.Config(n_sub=3), minis[student], minis["swin_mini"], NUM_CLASSES)
    x = torch.randn(2, 1, 16, 16)
    sf, tf = minis[student](x, stages=(1, 2, 3, 4)), minis["swin_mini"](x)
    d_s, d_t = minis[student].num_features, minis["swin_mini"].num_features
    for s in (1, 2, 3, 4):
        width = max(d_s, d_t) if minis[student].stage_info[s].layout == "nchw" else d_s
        assert method.projectors[str(s)].out_dim == width
        assert method.mappers[str(s)].mlp[0].in_features == width + d_t
        assert method.fused_sub_logits(s, sf, tf).shape == (2, 3, NUM_CLASSES)


def test_terms_against_independent_assembly(minis):
    torch.manual_seed(0)
    student, teacher = minis["resnet_mini"], minis["vit_mini"]
    cfg = HCD.Config(stages=(2, 4), lambda_s=0.5, lambda_t=2.0, mask_mode="zero", stage_reduce="mean")
    method = HCD(cfg, student, teacher, NUM_CLASSES)
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 5, 9])
    sf, tf = student(x, stages=(2, 4)), teacher(x)
    losses = method.losses(sf, tf, Targets(y))
    assert set(losses) == {"ce", "kd", "hcd_ce", "hcd_kd", "orth"}
    ce, kd, orth = 0.0, 0.0, 0.0
    for s in (2, 4):
        sub = method.mappers[str(s)](method.projectors[str(s)](sf.stages[s]), tf.pre_logits)
        fused = 0.5 * sub + 2.0 * tf.logits.unsqueeze(1)
        for j in range(4):
            ce = ce + F.cross_entropy(fused[:, j], y) / 4
            p = F.softmax(fused[:, j], -1)
            kd = kd + (p * (F.log_softmax(fused[:, j], -1) - F.log_softmax(sf.logits, -1))).sum(-1).mean() / 4
        orth = orth + orthogonality_loss(fused, y, 0.5, "zero")
    assert torch.allclose(losses["hcd_ce"], ce / 2, atol=1e-5)
    assert torch.allclose(losses["hcd_kd"], 6.0 * kd / 2, atol=1e-5)
    assert torch.allclose(losses["orth"], orth / 2, atol=1e-6)
    assert torch.allclose(losses["kd"], kd_kl(sf.logits, tf.logits, 1.0), atol=1e-6)


def test_detach_target_stops_kd_gradient_into_mappers(minis):
    x, y = torch.randn(2, 1, 16, 16), Targets(torch.tensor([1, 2]))
    grads = {}
    for detach in (False, True):
        torch.manual_seed(0)
        method = HCD(HCD.Config(stages=(3,), detach_target=detach), minis["vit_mini"], minis["resnet_mini"],
                     NUM_CLASSES)
        _, losses = method.training_step(x, y)
        losses["hcd_kd"].backward()
        grads[detach] = method.mappers["3"].mlp[2].weight.grad
    assert grads[False] is not None and grads[False].abs().sum() > 0
    assert grads[True] is None or grads[True].abs().sum() == 0


@pytest.mark.parametrize("teacher,student", list(itertools.product(MINI, MINI)))
def test_finite_losses_all_mini_pairs(minis, teacher, student):
    torch.manual_seed(0)
    method = get_method("hcd")(HCD.Config(), minis[student], minis[teacher], NUM_CLASSES)
    _, losses = method.training_step(torch.randn(2, 1, 16, 16), Targets(torch.tensor([1, 7])))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in minis[teacher].parameters())
