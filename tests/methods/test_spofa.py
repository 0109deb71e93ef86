"""SPOFA: closed-form probe gradients vs autograd, the MEMA scaler arithmetic, checkpointed state, projectors."""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hkdbench.benchmark.models.taps import StageInfo
from hkdbench.methods import Targets, get_method
from hkdbench.methods.ofa import build_branch_projector, ofa_loss
from hkdbench.methods.spofa import SPOFA, EmaBaseline, soft_ce_logit_grad

MINI = ("resnet_mini", "vit_mini", "swin_mini", "convnext_mini", "mixer_mini")
NUM_CLASSES = 10


# -- closed-form logit gradients --------------------------------------------------------------------------------------

def test_ce_gradient_matches_autograd():
    torch.manual_seed(0)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, 3, 3, 1])
    F.cross_entropy(z, y, reduction="sum").backward()
    assert torch.allclose(soft_ce_logit_grad(z.detach(), F.one_hot(y, 7)).double(), z.grad, atol=1e-6)
    # soft labels (mixup rows)
    z.grad = None
    soft = F.softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    (-(soft * F.log_softmax(z, -1)).sum()).backward()
    assert torch.allclose(soft_ce_logit_grad(z.detach(), soft).double(), z.grad, atol=1e-6)


@pytest.mark.parametrize("eps,T", [(1.0, 1.0), (1.4, 1.0), (0.8, 2.0)])
def test_ofa_gradient_matches_autograd(eps, T):
    torch.manual_seed(1)
    z = torch.randn(6, 9, requires_grad=True)
    z_t, y = torch.randn(6, 9), torch.randint(0, 9, (6,))
    ofa_loss(z, z_t, y, eps, T, reduction="none").sum().backward()
    onehot = F.one_hot(y, 9).float()
    w = (F.softmax(z_t / T, -1) + onehot) ** eps - onehot  # built here, independently of the code under test
    assert torch.allclose(soft_ce_logit_grad(z.detach(), w, T), z.grad, atol=1e-5)


# -- the EMA scalers -------------------------------------------------------------------------------------------------

def test_ema_baseline_hand_sequence():
    ema = EmaBaseline(0.9)
    devs = [ema.update(torch.tensor(s))[0].item() for s in (0.5, 0.3, 0.6)]
    # first: mu = 0.5, dev 0; second: dev 0.5-0.3 = 0.2, mu = .45+.03 = 0.48; third: dev .48-.6, mu = .432+.06
    assert devs == pytest.approx([0.0, 0.2, -0.12], abs=1e-6)
    assert ema.mu.item() == pytest.approx(0.492, abs=1e-6)
    assert bool(ema.initialised)


def _spofa(minis, student="resnet_mini", teacher="mixer_mini", **cfg):
    torch.manual_seed(0)
    return SPOFA(SPOFA.Config(**cfg), minis[student], minis[teacher], NUM_CLASSES)


def test_branch_weight_hand_sequence(minis):
    method = _spofa(minis)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    orthogonal = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    # cos 1 -> mu = 1, w = 1; cos 0 -> dev 1, w = clip(1 - 5) = 0.1, mu = .99;
    # cos 1 -> dev -0.01, w = 1.05, mu = .99*.99 + .01 = .9901; cos -1 -> dev 1.9901, w = 0.1
    weights = [method.branch_weight(1, z, t).item() for z in (t, orthogonal, 2 * t, -t)]
    assert weights == pytest.approx([1.0, 0.1, 1.05, 0.1], abs=1e-5)
    assert method.feature_scalers["1"].mu.item() == pytest.approx(0.9901 * 0.99 - 0.01, abs=1e-6)


def test_output_weights_against_autograd_probe(minis):
    method = _spofa(minis)
    torch.manual_seed(2)
    z, z_t, y = torch.randn(8, NUM_CLASSES) * 3, torch.randn(8, NUM_CLASSES) * 3, torch.randint(0, NUM_CLASSES, (8,))
    probe = z.clone().requires_grad_(True)
    g_ce, = torch.autograd.grad(F.cross_entropy(probe, y, reduction="sum"), probe)
    g_ofa, = torch.autograd.grad(ofa_loss(probe, z_t, y, reduction="none").sum(), probe)
    c = F.cosine_similarity(g_ce, g_ofa, dim=-1)
    omega = method.output_weights(z, z_t, Targets(y))
    mu = c.mean()  # first update: mu = mean cosine, then omega uses the updated mu
    assert torch.allclose(omega, (1 - 0.2 * (mu - c).clamp_min(0)).clamp(0.5, 2.0), atol=1e-5)
    # second step: mu = .99 mu + .01 mean(c2)
    z2 = torch.randn(8, NUM_CLASSES) * 3
    probe2 = z2.clone().requires_grad_(True)
    g_ce2, = torch.autograd.grad(F.cross_entropy(probe2, y, reduction="sum"), probe2)
    g_ofa2, = torch.autograd.grad(ofa_loss(probe2, z_t, y, reduction="none").sum(), probe2)
    c2 = F.cosine_similarity(g_ce2, g_ofa2, dim=-1)
    mu2 = 0.99 * mu + 0.01 * c2.mean()
    omega2 = method.output_weights(z2, z_t, Targets(y))
    assert torch.allclose(omega2, (1 - 0.2 * (mu2 - c2).clamp_min(0)).clamp(0.5, 2.0), atol=1e-5)


def test_per_sample_weights_within_clamp(minis):
    method = _spofa(minis, output_scale=40.0)  # large scale: the clamp must act
    torch.manual_seed(3)
    for _ in range(5):
        z, z_t = torch.randn(16, NUM_CLASSES) * 5, torch.randn(16, NUM_CLASSES) * 5
        omega = method.output_weights(z, z_t, Targets(torch.randint(0, NUM_CLASSES, (16,))))
        assert omega.min() >= 0.5 - 1e-6 and omega.max() <= 1.0 + 1e-6
    default = _spofa(minis)
    x = torch.randn(6, 1, 16, 16)
    for _ in range(3):
        default.training_step(x, Targets(torch.randint(0, NUM_CLASSES, (6,))))
        stats = default.statistics()
        assert 0.6 - 1e-6 <= stats["omega_min"] <= stats["omega_mean"] <= 1.0 + 1e-6
        assert all(0.1 - 1e-6 <= stats[f"w_stage{s}"] <= 2.0 + 1e-6 for s in (1, 2, 3, 4))


def test_state_dict_round_trips_ema_state(minis):
    method = _spofa(minis)
    x = torch.randn(4, 1, 16, 16)
    for _ in range(2):
        method.training_step(x, Targets(torch.tensor([0, 1, 2, 3])))
    state = method.state_dict()
    assert {"output_scaler.mu", "output_scaler.initialised", "feature_scalers.2.mu"} <= set(state)
    fresh = _spofa(minis)
    assert not bool(fresh.output_scaler.initialised)
    fresh.load_state_dict(state)
    assert bool(fresh.output_scaler.initialised)
    assert fresh.output_scaler.mu.item() == method.output_scaler.mu.item() != 0.0
    for s in "1234":
        assert fresh.feature_scalers[s].mu.item() == method.feature_scalers[s].mu.item()


def test_eval_mode_and_disabled_scalers_leave_state_alone(minis):
    x, y = torch.randn(4, 1, 16, 16), Targets(torch.tensor([0, 1, 2, 3]))
    for method in (_spofa(minis).eval(), _spofa(minis, enable_adaptive=False)):
        sf, tf = method.student(x, stages=(1, 2, 3, 4)), method.teacher(x)
        losses = method.losses(sf, tf, y)
        assert not bool(method.output_scaler.initialised)
        # unweighted: the final term is plain OFA
        assert torch.allclose(losses["kd"], ofa_loss(sf.logits, tf.logits, y.hard))


# -- projectors ------------------------------------------------------------------------------------------------------

def test_layernorm_decoupling_projectors():
    cnn = StageInfo(2, "x", "nchw", (32, 8, 8), (8, 8))
    p = build_branch_projector(cnn, 64, 128, 10, style="spofa")
    assert isinstance(p.head[0], nn.LayerNorm) and p.head[0].normalized_shape == (128,)
    assert isinstance(build_branch_projector(cnn, 64, 128, 10).head, nn.Linear)  # OFA: no LayerNorm
    # Swin-P stage 1 at 224 px: 3 merges, no GELU, the last merger without norm
    swin = StageInfo(1, "x", "tokens", (3136, 48), (56, 56))
    body = build_branch_projector(swin, 384, 768, 100, style="spofa").body
    assert [type(m.norm).__name__ for m in body.mergers] == ["LayerNorm", "LayerNorm", "Identity"]
    assert all(isinstance(m.act, nn.Identity) for m in body.mergers)
    # DeiT: one merger keeps its LayerNorm; the cls token is dropped and the token mean is read out
    deit = StageInfo(1, "x", "tokens", (196, 192), (14, 14), num_prefix=1)
    body = build_branch_projector(deit, 192, 768, 100, style="spofa").body
    assert isinstance(body.mergers[0].norm, nn.LayerNorm) and not body.use_prefix
    with torch.no_grad():
        assert body(torch.randn(1, 196, 192), torch.randn(1, 1, 192)).shape == (1, 192)



def test_projector_init_as_reference():
    # spofaKD's init_weights is OFAKD's: the stage-4 conv bias keeps PyTorch's default, the LayerNorm before the
    # head keeps its default 1 / 0, the head gets trunc_normal(0.02) and a zero bias
    torch.manual_seed(0)
    p = build_branch_projector(StageInfo(4, "x", "nchw", (512, 7, 7), (7, 7)), 512, 768, 100, style="spofa")
    conv, (norm, head) = p.body.convs, p.head
    bound = 1 / math.sqrt(512)
    assert float(conv.bias.detach().abs().max()) <= bound and torch.count_nonzero(conv.bias) == 768
    assert abs(float(conv.bias.detach().std()) - bound / math.sqrt(3)) <= 0.15 * bound / math.sqrt(3)
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / 768)) <= 0.1 * math.sqrt(2 / 768)
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert abs(float(head.weight.detach().std()) - 0.02) <= 0.002 and torch.count_nonzero(head.bias) == 0

def test_method_projectors_have_layernorm(minis):
    method = _spofa(minis, student="convnext_mini", teacher="vit_mini")
    assert all(isinstance(p.head[0], nn.LayerNorm) for p in method.projectors.values())


@pytest.mark.parametrize("teacher,student", list(itertools.product(MINI, MINI))[::3])
def test_finite_losses_and_gradients(minis, teacher, student):
    torch.manual_seed(0)
    method = get_method("spofa")(SPOFA.Config(), minis[student], minis[teacher], NUM_CLASSES)
    _, losses = method.training_step(torch.randn(2, 1, 16, 16), Targets(torch.tensor([1, 7])))
    assert set(losses) == {"ce", "kd", "ofa"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.parameters())
