"""OFA-KD: the loss against hand computations, the branch projectors' shapes (mini and 224 px models), gradients."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.models.taps import Features, StageInfo
from hkdbench.benchmark.models.zoo import create_model
from hkdbench.methods import Targets, get_method, method_config
from hkdbench.methods.ofa import OFA, PatchMerging, build_branch_projector, heads_for, merge_count, ofa_loss

MINI = ("resnet_mini", "vit_mini", "swin_mini", "convnext_mini", "mixer_mini")
NUM_CLASSES = 10


# -- the loss ----------------------------------------------------------------------------------------------------

def test_eps_one_is_soft_label_cross_entropy():
    torch.manual_seed(1)
    z_s, z_t = torch.randn(6, 7), torch.randn(6, 7)
    y = torch.randint(0, 7, (6,))
    expected = -(F.softmax(z_t, -1) * F.log_softmax(z_s, -1)).sum(-1).mean()
    assert torch.allclose(ofa_loss(z_s, z_t, y, eps=1.0), expected, atol=1e-6)


def _hand_ofa(z_s, z_t, y, eps, T):
    """Plain-python OFA loss of one sample."""
    e_t = [math.exp(v / T) for v in z_t]
    p_t = [v / sum(e_t) for v in e_t]
    lse = math.log(sum(math.exp(v / T) for v in z_s))
    log_p_s = [v / T - lse for v in z_s]
    w = [(p + 1) ** eps - 1 if c == y else p ** eps for c, p in enumerate(p_t)]
    return -sum(wc * lp for wc, lp in zip(w, log_p_s))


@pytest.mark.parametrize("eps,T", [(2.0, 1.0), (1.5, 2.0), (0.7, 1.0)])
def test_hand_computed_three_classes(eps, T):
    samples = [([1.0, 0.0, -1.0], [0.5, 1.5, 0.0], 0), ([-0.3, 2.0, 0.4], [1.0, -1.0, 2.5], 2)]
    expected = sum(_hand_ofa(zs, zt, y, eps, T) for zs, zt, y in samples) / len(samples)
    z_s = torch.tensor([s[0] for s in samples])
    z_t = torch.tensor([s[1] for s in samples])
    y = torch.tensor([s[2] for s in samples])
    assert ofa_loss(z_s, z_t, y, eps=eps, temperature=T).item() == pytest.approx(expected, rel=1e-5)
    per_sample = ofa_loss(z_s, z_t, y, eps=eps, temperature=T, reduction="none")
    assert per_sample[1].item() == pytest.approx(_hand_ofa(*samples[1], eps, T), rel=1e-5)


def test_eps_two_numbers():
    # p_t = softmax([0, ln 3]) = (1/4, 3/4), y = 0, eps = 2: w = ((5/4)^2 - 1, (3/4)^2) = (9/16, 9/16)
    # z_s = [0, 0]: log p_s = -ln 2 each -> L = (9/16 + 9/16) ln 2 = 9/8 ln 2
    z_t = torch.tensor([[0.0, math.log(3.0)]])
    loss = ofa_loss(torch.zeros(1, 2), z_t, torch.tensor([0]), eps=2.0)
    assert loss.item() == pytest.approx(9 / 8 * math.log(2), rel=1e-6)


def test_loss_is_float32_under_half_inputs():
    z = torch.randn(4, 5).half()
    assert ofa_loss(z, z, torch.tensor([0, 1, 2, 3]), eps=1.2).dtype == torch.float32


# -- config --------------------------------------------------------------------------------------------------------

def test_eps_broadcast_and_validation():
    assert OFA.Config(eps=(1.3,)).eps_values == (1.3,) * 5
    assert OFA.Config(stages=(2, 4), eps=(1.0, 1.1, 1.2)).eps_values == (1.0, 1.1, 1.2)
    with pytest.raises(ValueError):
        OFA.Config(eps=(1.0, 1.0))
    with pytest.raises(ValueError):
        OFA.Config(stages=(0, 1))
    assert method_config("ofa", {"eps": 1.5, "stages": [1, 2]}).eps_values == (1.5, 1.5, 1.5)
    with pytest.raises(ConfigError):
        method_config("ofa", {"stages": [1, 2], "eps": [1, 2]})


# -- projector building blocks -------------------------------------------------------------------------------------

def test_merge_rule_and_heads():
    assert [merge_count(g) for g in (56, 28, 14, 7, 13, 8, 4, 2, 1)] == [3, 2, 1, 0, 0, 0, 0, 0, 0]
    assert heads_for(192, 4) == 4 and heads_for(30, 4) == 3 and heads_for(7, 4) == 1


def test_patch_merging_even_and_odd_grids():
    pm = PatchMerging((4, 4), 8, 12)
    x = torch.arange(16.0).view(1, 16, 1).expand(1, 16, 8)
    assert pm(x).shape == (1, 4, 12)
    # the first merged token concatenates tokens (0,0), (1,0), (0,1), (1,1) of the 4x4 grid: indices 0, 4, 1, 5
    merged = pm._merge(torch.arange(16.0).view(1, 16, 1))
    assert merged[0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert PatchMerging((5, 5), 8, 12)(torch.randn(2, 25, 8)).shape == (2, 9, 12)


# -- projector shapes ----------------------------------------------------------------------------------------------

def _random_features(model, batch, stages=(1, 2, 3, 4)):
    """Features with random stage tensors of the model's shapes (the backbone is not run)."""
    f = Features(logits=torch.randn(batch, 1), pre_logits=torch.randn(batch, model.num_features))
    for s in stages:
        info = model.stage_info[s]
        f.stages[s] = torch.randn(batch, *info.shape)
        if info.layout == "tokens" and info.num_prefix:
            f.prefix[s] = torch.randn(batch, info.num_prefix, info.channels)
    return f


@pytest.mark.parametrize("student", MINI)
def test_mini_projector_shapes(minis, student):
    method = OFA(OFA.Config(), minis[student], minis["swin_mini"], NUM_CLASSES)
    logits = method.branch_logits(_random_features(minis[student], 3))
    assert {s: tuple(v.shape) for s, v in logits.items()} == {s: (3, NUM_CLASSES) for s in (1, 2, 3, 4)}


class _TeacherStub:
    """What a branch projector takes from the teacher: its pre-logits width (spec 1.3: 768 for Swin-T and
    ConvNeXt-T). A stub spares building and dry-running the 28M-parameter teachers at 224 px."""

    def __init__(self, num_features):
        self.num_features = num_features

    def requires_grad_(self, flag):
        return self

    def eval(self):
        return self


TEACHER_224 = {"swin_tiny": 768, "convnext_tiny": 768}


@pytest.fixture(scope="module")
def zoo224():
    names = ("deit_tiny", "swin_pico", "resnet18", "mobilenetv2_100", "resmlp_12")
    return {n: create_model(n, 100) for n in names}


@pytest.mark.parametrize("student", ["deit_tiny", "swin_pico", "resnet18", "mobilenetv2_100", "resmlp_12"])
def test_224_projector_shapes(zoo224, student):
    # Swin-T and ConvNeXt-T teachers share D_t = 768, so they give the same projectors: built once.
    torch.manual_seed(0)
    for d_t in sorted(set(TEACHER_224.values())):
        method = OFA(OFA.Config(), zoo224[student], _TeacherStub(d_t), 100).eval()
        with torch.no_grad():
            logits = method.branch_logits(_random_features(zoo224[student], 1))
        assert {s: tuple(v.shape) for s, v in logits.items()} == {s: (1, 100) for s in (1, 2, 3, 4)}


def test_224_projector_structure(zoo224):
    # ResNet18 (D_s 512) with Swin-T (D_t 768), stage 1: 64 -> 128 -> 256 -> 768, then Linear(768, 100)
    p = build_branch_projector(zoo224["resnet18"].stage_info[1], 512, 768, 100)
    pw = [m for m in p.body.convs.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert [m.out_channels for m in pw] == [64, 128, 128, 256, 256, 768]
    assert (p.head.in_features, p.head.out_features) == (768, 100)
    # DeiT-T: one merge 14 -> 7, cls token read out, 3 blocks at stage 1 and 1 at stage 4
    deit = zoo224["deit_tiny"]
    p1 = build_branch_projector(deit.stage_info[1], 192, 768, 100)
    assert len(p1.body.mergers) == 1 and p1.body.use_prefix and len(p1.body.blocks) == 3
    assert len(build_branch_projector(deit.stage_info[4], 192, 768, 100).body.blocks) == 1
    # Swin-P stage 1: three merges 56 -> 7, GELU on all but the last
    sp = build_branch_projector(zoo224["swin_pico"].stage_info[1], 384, 768, 100).body
    assert [type(m.act).__name__ for m in sp.mergers] == ["GELU", "GELU", "Identity"]
    assert not sp.use_prefix


def test_prefix_token_is_read_out():
    info = StageInfo(1, "x", "tokens", (16, 8), (4, 4), num_prefix=1)
    p = build_branch_projector(info, 8, 8, 5).eval()
    x, cls = torch.randn(2, 16, 8), torch.randn(2, 1, 8)
    out = p(x, cls)
    # with a different cls token the output changes: the readout is the prefix token, not a token mean
    assert not torch.allclose(out, p(x, cls + 1.0))
    with pytest.raises(ValueError):
        p(x, None)



# -- initialisation (OFAKD distillers/utils.py init_weights, applied to every projector) ---------------------------

def std_close(tensor, expected, rel=0.1):
    """The sample std within ``rel`` of ``expected`` (10 %: the alternatives tested against are >= 40 % away)."""
    return abs(float(tensor.detach().std()) - expected) <= rel * expected


def assert_pytorch_default_bias(conv):
    """PyTorch's Conv2d bias: uniform(+-1/sqrt(fan_in)), std bound/sqrt(3); the reference leaves it so."""
    bound = 1 / math.sqrt(conv.weight[0].numel())
    assert float(conv.bias.detach().abs().max()) <= bound
    assert std_close(conv.bias, bound / math.sqrt(3), rel=0.15)  # 768 draws: the std is within ~5 %


def test_cnn_projector_init_as_reference():
    torch.manual_seed(0)
    # ResNet18 (D_s 512) with a 768-wide teacher: stage 4 is Conv2d(512, 768, 1) with bias, then Linear(768, 100)
    stage4 = build_branch_projector(StageInfo(4, "x", "nchw", (512, 7, 7), (7, 7)), 512, 768, 100)
    conv = stage4.body.convs
    assert std_close(conv.weight, math.sqrt(2 / 768))  # kaiming normal, fan_out = 768 * 1 * 1 (default: 0.026)
    assert_pytorch_default_bias(conv)
    assert std_close(stage4.head.weight, 0.02) and torch.count_nonzero(stage4.head.bias) == 0
    # stage 1: SepConvs, depthwise 3x3 fan_out = 64 * 9, BN 1 / 0
    stage1 = build_branch_projector(StageInfo(1, "x", "nchw", (64, 56, 56), (56, 56)), 512, 768, 100)
    depthwise = stage1.body.convs[0][0]
    assert depthwise.groups == 64 and std_close(depthwise.weight, math.sqrt(2 / (64 * 9)), rel=0.15)
    bns = [m for m in stage1.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)


def test_token_projector_init_as_reference():
    torch.manual_seed(0)
    deit = StageInfo(1, "x", "tokens", (196, 192), (14, 14), num_prefix=1)
    p = build_branch_projector(deit, 192, 768, 100)
    linears = [m for m in p.modules() if isinstance(m, torch.nn.Linear)]
    big = [m for m in linears if m.weight.numel() >= 192 * 192]  # the merger, qkv, proj, mlp and head
    assert len(big) >= 10 and all(std_close(m.weight, 0.02) for m in big)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears if m.bias is not None)
    norms = [m for m in p.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.all(n.weight == 1) and torch.all(n.bias == 0) for n in norms)

# -- the method ------------------------------------------------------------------------------------------------------

def test_gradients_reach_projectors_and_student_not_teacher(minis):
    torch.manual_seed(0)
    student, teacher = minis["vit_mini"], minis["resnet_mini"]
    method = OFA(OFA.Config(), student, teacher, NUM_CLASSES)
    student.zero_grad(set_to_none=True)
    _, losses = method.training_step(torch.randn(4, 1, 16, 16), Targets(torch.tensor([0, 1, 2, 3])))
    assert set(losses) == {"ce", "kd", "ofa"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_loss_weights_and_final_eps():
    torch.manual_seed(0)
    s = create_model("mixer_mini", 5, in_chans=1, img_size=16)
    t = create_model("resnet_mini", 5, in_chans=1, img_size=16)
    x, y = torch.randn(3, 1, 16, 16), Targets(torch.tensor([0, 4, 2]))
    cfg = OFA.Config(stages=(3,), eps=(1.0, 1.7), ofa_weight=0.1, kd_weight=2.0)
    method = OFA(cfg, s, t, 5)
    sf, tf = s(x, stages=(3,)), t(x)
    losses = method.losses(sf, tf, y)
    assert torch.allclose(losses["kd"], 2.0 * ofa_loss(sf.logits, tf.logits, y.hard, 1.7))
    branch = method.projectors["3"](sf.stages[3])
    assert torch.allclose(losses["ofa"], 0.1 * ofa_loss(branch, tf.logits, y.hard, 1.0))
    assert torch.allclose(losses["ce"], F.cross_entropy(sf.logits, y.hard))


@pytest.mark.parametrize("teacher,student", list(itertools.product(MINI, MINI)))
def test_finite_losses_all_mini_pairs(minis, teacher, student):
    torch.manual_seed(0)
    method = get_method("ofa")(OFA.Config(eps=(1.2,)), minis[student], minis[teacher], NUM_CLASSES)
    _, losses = method.training_step(torch.randn(2, 1, 16, 16), Targets(torch.tensor([1, 7])))
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
