"""Numerical checks of the analysis probes against independent numpy computations of the formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.probes import cka

from hkdbench.benchmark.probes import conflict
from hkdbench.benchmark.models.zoo import create_model


# ---------------------------------------------------------------------------------------------------------------
# numpy reference (written from the formulas, not from probes/cka.py, probes/conflict.py)
# ---------------------------------------------------------------------------------------------------------------

def np_gram(x, kernel, sigma_frac=0.8):
    x = np.asarray(x, dtype=np.float64)
    if kernel == "linear":
        return x @ x.T
    n = x.shape[0]
    sq = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    sigma2 = sigma_frac ** 2 * np.median(sq)
    return np.exp(-sq / (2 * sigma2))


def np_hsic_biased(k, l):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def np_hsic_unbiased(k, l):
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    value = (np.trace(kt @ lt)
             + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one @ kt @ lt @ one))
    return value / (n * (n - 3))


def np_cka(x, y, kernel="linear", unbiased=True, sigma_frac=0.8):
    k, l = np_gram(x, kernel, sigma_frac), np_gram(y, kernel, sigma_frac)
    h = np_hsic_unbiased if unbiased else np_hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    # y shares structure with x so CKA is far from 0
    y = np.concatenate([x @ rng.normal(size=(5, 4)), rng.normal(size=(20, 3))], axis=1) + 0.3 * rng.normal(size=(20, 7))
    return x, y


# ---------------------------------------------------------------------------------------------------------------
# CKA
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_numpy(xy, kernel, unbiased):
    x, y = xy
    got = cka.cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32),
                     kernel=kernel, unbiased=unbiased)
    want = np_cka(x, y, kernel, unbiased)
    assert 0.05 < want < 1.0
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_hsic_matches_numpy(xy, unbiased):
    x, y = xy
    k, l = np_gram(x, "rbf", 0.5), np_gram(y, "linear")
    got = cka.hsic(torch.tensor(k), torch.tensor(l), unbiased=unbiased).item()
    want = (np_hsic_unbiased if unbiased else np_hsic_biased)(k, l)
    assert got == pytest.approx(want, rel=1e-10)


def test_rbf_gram_bandwidth_follows_median(xy):
    x, _ = xy
    for frac in (0.5, 0.8, 2.0):
        got = cka.gram_rbf(torch.tensor(x), sigma_frac=frac).numpy()
        np.testing.assert_allclose(got, np_gram(x, "rbf", frac), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariant_to_orthogonal_and_isotropic_scaling(xy, unbiased):
    x, y = xy
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert np.allclose(q.T @ q, np.eye(7))
    base = cka.cka(torch.tensor(x), torch.tensor(y), unbiased=unbiased)
    rotated = cka.cka(torch.tensor(x), torch.tensor(y @ q), unbiased=unbiased)
    scaled = cka.cka(torch.tensor(3.7 * x), torch.tensor(0.01 * y), unbiased=unbiased)
    assert rotated == pytest.approx(base, rel=1e-9)
    assert scaled == pytest.approx(base, rel=1e-9)


def test_rbf_cka_invariant_to_orthogonal_and_isotropic_scaling(xy):
    # The median-scaled bandwidth makes RBF CKA invariant to isotropic scaling too.
    x, y = xy
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(5, 5)))
    base = cka.cka(torch.tensor(x), torch.tensor(y), kernel="rbf")
    assert cka.cka(torch.tensor(5.0 * x @ q), torch.tensor(y), kernel="rbf") == pytest.approx(base, rel=1e-9)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_self_is_one(xy, kernel, unbiased):
    x, _ = xy
    assert cka.cka(torch.tensor(x), torch.tensor(x), kernel=kernel, unbiased=unbiased) == pytest.approx(1.0)


def test_cka_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="more than 3 samples"):
        cka.cka(x, x, unbiased=True)
    with pytest.raises(ValueError, match="more than 3 samples"):
        cka.hsic_unbiased(x @ x.T, x @ x.T)
    assert cka.cka(x, x, unbiased=False) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown CKA kernel"):
        cka.cka(torch.randn(8, 3), torch.randn(8, 3), kernel="poly")
    with pytest.raises(ValueError, match="same examples"):
        cka.cka(torch.randn(8, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match="flatten_features"):
        cka.cka(torch.randn(8, 3, 2), torch.randn(8, 3))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_constant_features_is_nan(kernel, unbiased):
    x = torch.full((8, 4), 0.37)
    assert math.isnan(cka.cka(x, torch.randn(8, 3), kernel=kernel, unbiased=unbiased))
    acc = cka.CKAAccumulator({1: "tokens"}, {1: "tokens"}, kernel=kernel, unbiased=unbiased)
    acc.update({1: x[:, None]}, {1: torch.randn(8, 1, 3)})
    assert torch.isnan(acc.result()).all()


def test_flatten_features():
    nchw = torch.randn(6, 3, 4, 5)
    tokens = torch.randn(6, 20, 3)
    assert cka.flatten_features(nchw, "nchw").shape == (6, 60)
    assert cka.flatten_features(tokens, "tokens").shape == (6, 60)
    torch.testing.assert_close(cka.flatten_features(nchw, "nchw", pool="mean"), nchw.mean(dim=(2, 3)))
    torch.testing.assert_close(cka.flatten_features(tokens, "tokens", pool="mean"), tokens.mean(dim=1))
    # Same map as tokens or as nchw: mean pooling agrees.
    as_tokens = nchw.flatten(2).transpose(1, 2)
    torch.testing.assert_close(cka.flatten_features(as_tokens, "tokens", pool="mean"),
                               cka.flatten_features(nchw, "nchw", pool="mean"))
    with pytest.raises(ValueError, match="layouts are"):
        cka.flatten_features(nchw, "nhwc")
    with pytest.raises(ValueError, match="pools are"):
        cka.flatten_features(nchw, "nchw", pool="max")
    with pytest.raises(ValueError, match="4 dimensions"):
        cka.flatten_features(tokens, "nchw")


# ---------------------------------------------------------------------------------------------------------------
# Minibatch accumulation
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_accumulator_matches_numpy_per_batch_hsic(kernel, unbiased):
    rng = np.random.default_rng(3)
    teacher_layouts = {1: "nchw", 3: "tokens"}
    student_layouts = {2: "tokens", 4: "nchw", 1: "nchw"}
    shapes_t = {1: (2, 3, 3), 3: (5, 4)}
    shapes_s = {2: (4, 3), 4: (3, 2, 2), 1: (6, 1, 2)}
    acc = cka.CKAAccumulator(teacher_layouts, student_layouts, kernel=kernel, unbiased=unbiased)
    hsic = np_hsic_unbiased if unbiased else np_hsic_biased
    sums_kl = np.zeros((2, 3))
    sums_kk, sums_ll = np.zeros(2), np.zeros(3)
    for batch in range(4):
        n = (6, 9, 5, 8)[batch]
        base = rng.normal(size=(n, 4))
        def related(shape, base=base, n=n):
            d = int(np.prod(shape))
            return (base @ rng.normal(size=(4, d)) + rng.normal(size=(n, d))).reshape(n, *shape)

        t = {s: related(sh) for s, sh in shapes_t.items()}
        st = {s: related(sh) for s, sh in shapes_s.items()}
        acc.update({s: torch.tensor(v, dtype=torch.float32) for s, v in t.items()},
                   {s: torch.tensor(v, dtype=torch.float32) for s, v in st.items()})
        ks = [np_gram(t[s].reshape(n, -1), kernel) for s in teacher_layouts]
        ls = [np_gram(st[s].reshape(n, -1), kernel) for s in student_layouts]
        for i, k in enumerate(ks):
            sums_kk[i] += hsic(k, k)
            for j, l in enumerate(ls):
                sums_kl[i, j] += hsic(k, l)
        for j, l in enumerate(ls):
            sums_ll[j] += hsic(l, l)
    want = sums_kl / np.sqrt(sums_kk[:, None] * sums_ll[None, :])
    got = acc.result()
    assert got.shape == (2, 3) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert acc.teacher_stages == (1, 3) and acc.student_stages == (2, 4, 1)
    assert acc.num_batches == 4 and acc.num_samples == 28
    d = acc.as_dict()
    assert d[(3, 4)] == pytest.approx(want[1, 1], rel=1e-5)
    acc.reset()
    with pytest.raises(RuntimeError):
        acc.result()


def test_accumulator_single_batch_equals_one_shot_cka():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 2, 2), torch.randn(16, 9, 5)
    y[:, :, :4] += x.reshape(16, 3, 4).repeat(1, 3, 1)
    acc = cka.CKAAccumulator({1: "nchw"}, {2: "tokens"}, kernel="linear")
    acc.update({1: x}, {2: y})
    want = cka.cka(x.reshape(16, -1), y.reshape(16, -1))
    assert acc.result()[0, 0].item() == pytest.approx(want, rel=1e-9)


def test_accumulator_batch_of_three_raises():
    acc = cka.CKAAccumulator({1: "nchw"}, {1: "tokens"})
    with pytest.raises(ValueError, match="at least 4 samples"):
        acc.update({1: torch.randn(3, 2, 2, 2)}, {1: torch.randn(3, 4, 2)})
    with pytest.raises(ValueError, match="differ in batch size"):
        acc.update({1: torch.randn(5, 2, 2, 2)}, {1: torch.randn(6, 4, 2)})
    with pytest.raises(KeyError, match="lack stage"):
        acc.update({2: torch.randn(5, 2, 2, 2)}, {1: torch.randn(5, 4, 2)})


def test_accumulator_on_tapped_models():
    torch.manual_seed(0)
    teacher = create_model("resnet_mini", 10, in_chans=1, img_size=16).eval()
    student = create_model("vit_mini", 10, in_chans=1, img_size=16).eval()
    acc = cka.CKAAccumulator.for_models(teacher, student, kernel="rbf", pool="mean")
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(6, 1, 16, 16)
            acc.update(teacher(x, stages=(1, 2, 3, 4)), student(x, stages=(1, 2, 3, 4)))
    m = acc.result()
    assert m.shape == (4, 4) and torch.isfinite(m).all()


# ---------------------------------------------------------------------------------------------------------------
# Optional cross-check against the ckatorch package (not a dependency)
# ---------------------------------------------------------------------------------------------------------------

def test_against_ckatorch():
    ckatorch = pytest.importorskip("ckatorch")
    rng = np.random.default_rng(4)
    # odd n: ckatorch's torch.median picks the lower middle value, numpy/probes average the two (even count)
    x = torch.tensor(rng.normal(size=(21, 5)))
    y = torch.tensor(np.concatenate([x.numpy() @ rng.normal(size=(5, 6)), rng.normal(size=(21, 1))], 1))
    for kernel in ("linear", "rbf"):
        for unbiased in (False, True):
            want = ckatorch.cka_base(x, y, kernel=kernel, unbiased=unbiased, threshold=0.8).item()
            assert cka.cka(x, y, kernel=kernel, unbiased=unbiased) == pytest.approx(want, rel=1e-8)
    xs, ys = x[:20].reshape(4, 5, 5), y[:20].reshape(4, 5, 7)
    acc = cka.CKAAccumulator({0: "tokens"}, {0: "tokens"})
    for i in range(4):
        acc.update({0: xs[i][:, None, :]}, {0: ys[i][:, None, :]})
    assert acc.result()[0, 0].item() == pytest.approx(ckatorch.cka_batch(xs, ys).item(), rel=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Gradient conflict
# ---------------------------------------------------------------------------------------------------------------

def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    return model, x, y


def test_conflict_same_loss_agrees():
    model, x, y = _tiny()
    loss = nn.functional.cross_entropy(model(x), y)
    s = conflict.gradient_conflict(loss, loss, model.parameters())
    assert s.cosine == pytest.approx(1.0) and s.norm_ratio == pytest.approx(1.0)
    assert s.task_norm == pytest.approx(s.distill_norm) and s.task_norm > 0
    assert not s.degenerate and not s.conflicting
    # the graph is retained for the real backward, and .grad is untouched
    assert all(p.grad is None for p in model.parameters())
    loss.backward()


def test_conflict_opposite_losses():
    model, x, y = _tiny()
    loss = nn.functional.cross_entropy(model(x), y)
    s = conflict.gradient_conflict(loss, -2.0 * loss, list(model.named_parameters()))
    assert s.cosine == pytest.approx(-1.0) and s.norm_ratio == pytest.approx(2.0)
    assert s.conflicting


def test_conflict_per_block_matches_manual():
    model, x, y = _tiny()
    out = model(x)
    task = nn.functional.cross_entropy(out, y)
    distill = ((out - torch.randn(10, 3)) ** 2).mean() + 0.1 * model[0].weight.pow(2).sum()
    blocks = {"layer0": list(model[0].parameters()), "layer2": list(model[2].parameters())}
    s = conflict.gradient_conflict(task, distill, model.parameters(), blocks=blocks)

    params = list(model.parameters())
    gt = torch.autograd.grad(task, params, retain_graph=True)
    gd = torch.autograd.grad(distill, params, retain_graph=True)
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs]).double()  # noqa: E731
    want = nn.functional.cosine_similarity(flat(gt), flat(gd), dim=0).item()
    assert s.cosine == pytest.approx(want, rel=1e-6)
    assert s.norm_ratio == pytest.approx((flat(gd).norm() / flat(gt).norm()).item(), rel=1e-6)
    for name, idx in (("layer0", [0, 1]), ("layer2", [2, 3])):
        a, b = flat([gt[i] for i in idx]), flat([gd[i] for i in idx])
        assert s.block_cosines[name] == pytest.approx(nn.functional.cosine_similarity(a, b, dim=0).item(), rel=1e-6)
        assert s.block_norm_ratios[name] == pytest.approx((b.norm() / a.norm()).item(), rel=1e-6)
        assert not s.block_degenerate[name]


def test_conflict_zero_gradients():
    model, x, y = _tiny()
    out = model(x)
    task = nn.functional.cross_entropy(out, y)
    # distillation only on the first layer's weight: the second layer gets no distillation gradient
    distill = model[0].weight.pow(2).sum()
    blocks = {"first": list(model[0].parameters()), "second": list(model[2].parameters())}
    s = conflict.gradient_conflict(task, distill, model.parameters(), blocks=blocks)
    assert s.block_degenerate["second"] and s.block_cosines["second"] == 0.0
    assert s.block_norm_ratios["second"] == 0.0
    assert not s.degenerate and math.isfinite(s.cosine)
    # a constant distillation loss (no graph), e.g. a zero-weight warm-up
    z = conflict.gradient_conflict(task, torch.tensor(0.0), model.parameters())
    assert z.degenerate and z.cosine == 0.0 and z.norm_ratio == 0.0 and z.distill_norm == 0.0
    # frozen parameters count as zero gradient
    model[2].weight.requires_grad_(False)
    f = conflict.gradient_conflict(task, task, model.parameters())
    assert f.cosine == pytest.approx(1.0)
    with pytest.raises(ValueError, match="scalar"):
        conflict.gradient_conflict(out, task, model.parameters())
    with pytest.raises(ValueError, match="not in params"):
        conflict.gradient_conflict(task, task, model[0].parameters(), blocks=blocks)


def test_conflict_tracker_summary():
    tr = conflict.ConflictTracker()
    mk = conflict.ConflictStats
    tr.update(mk(0.5, 1.0, 2.0, 2.0, False, {"a": 0.2}, {"a": False}, {"a": 1.0}))
    tr.update(mk(-0.3, 3.0, 1.0, 3.0, False, {"a": -0.4}, {"a": False}, {"a": 1.0}))
    tr.update(mk(0.0, math.inf, 0.0, 1.0, True, {"a": 0.0}, {"a": True}, {"a": math.inf}))
    s = tr.summary()
    assert s["steps"] == 3 and s["degenerate_steps"] == 1
    assert s["mean_cosine"] == pytest.approx(0.1)
    assert s["mean_norm_ratio"] == pytest.approx(2.0)
    assert s["conflict_fraction"] == pytest.approx(0.5)
    assert s["block_mean_cosine"]["a"] == pytest.approx(-0.1)
    assert s["block_conflict_fraction"]["a"] == pytest.approx(0.5)
    assert s["block_degenerate_steps"]["a"] == 1
    assert tr.epoch_summary() == s and len(tr) == 0
    empty = tr.summary()
    assert empty["mean_cosine"] is None and empty["conflict_fraction"] is None


# ---------------------------------------------------------------------------------------------------------------
# student_blocks
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet_mini", "vit_mini", "swin_mini", "convnext_mini", "mixer_mini", "resmlp_mini"])
def test_student_blocks_partition(name):
    m = create_model(name, 10, in_chans=1, img_size=16)
    blocks = conflict.student_blocks(m)
    assert tuple(blocks) == conflict.BLOCK_NAMES
    ids = [id(p) for ps in blocks.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in m.parameters()}
    assert all(blocks[b] for b in conflict.BLOCK_NAMES), {b: len(ps) for b, ps in blocks.items()}
    names = {id(p): n for n, p in m.model.named_parameters()}
    for stage in (1, 2, 3, 4):
        out = m._stage_module_names[stage]
        assert any(names[id(p)].startswith(out + ".") for p in blocks[f"stage{stage}"])
    assert any("head" in names[id(p)] or "fc" in names[id(p)] for p in blocks["head"])


def test_student_blocks_drive_per_block_conflict():
    torch.manual_seed(0)
    m = create_model("vit_mini", 5, in_chans=1, img_size=16)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 5, (4,))
    f = m(x, stages=(2,))
    task = nn.functional.cross_entropy(f.logits, y)
    distill = f.stages[2].pow(2).mean()
    s = conflict.gradient_conflict(task, distill, m.parameters(), blocks=conflict.student_blocks(m))
    # a stage-2 feature loss sends no gradient to stages 3, 4 or the head
    for b in ("stage3", "stage4", "head"):
        assert s.block_degenerate[b]
    for b in ("stem", "stage1", "stage2"):
        assert not s.block_degenerate[b]
