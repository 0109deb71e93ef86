"""benchmark/data/randaugment.py against timm's own RandAugment (its PIL ops, its sampling, its policy parser).

timm 0.6.5 and the installed timm share the RandAugment ops and level mappings used here (for magnitudes <= 10);
where they differ the 0.6.5 behaviour is the reference: posterize to 0 bits is a black image (the Pillow of 0.6.5's
day; current Pillow raises), so timm's op runs with that posterize patched in.

Tolerances (stated once, used by every pixel comparison): a pixel may differ from timm's by at most 1 on at most
0.1 % of the pixels for colour ops; geometric ops may differ on at most 0.1 % of the pixels (edge pixels, where a
sample point falls on the image border, can take the fill colour on one side and a pixel on the other), with a mean
absolute difference <= 0.05. Measured: every op equal to timm's on every pixel, on CPU.
"""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import timm.data.auto_augment as taa
from hkdbench.benchmark.data import randaugment

FILL_RGB = (124, 116, 104)  # timm's img_mean for the ImageNet mean colour
FILL_GRAY = (73,)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
ALL_OPS = tuple(dict.fromkeys(randaugment.PLAIN_OPS + randaugment.INCREASING_OPS))
MAGNITUDES = (0.0, 2.0, 4.3, 6.5, 9.0, 10.0)
MAX_DIFFERING = 1e-3
MAX_GEOMETRIC_MEAN_DIFF = 0.05


# ----------------------------------------------------------------------------------------------- images

@pytest.fixture(scope="module")
def fmnist():
    from hkdbench.benchmark.core.config import DataConfig
    from hkdbench.benchmark.data.datasets import DataNotFoundError, load_tensors

    try:
        images, _ = load_tensors(DataConfig(dataset="fashion-mnist"), train=False)
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    return images[:48].float()


def image_sets(fmnist):
    """Real grey images, RGB images made of three of them (cropped non-square) and seeded random RGB noise."""
    noise = torch.randint(0, 256, (8, 3, 20, 30), generator=torch.Generator().manual_seed(0)).float()
    rgb = torch.stack([fmnist[0:12, 0], fmnist[12:24, 0], fmnist[24:36, 0]], dim=1)[:, :, 3:25, :]
    return {"fmnist-gray": (fmnist[36:48], FILL_GRAY), "fmnist-rgb": (rgb, FILL_RGB), "noise-rgb": (noise, FILL_RGB)}


def to_pil(image: torch.Tensor) -> Image.Image:
    array = image.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def from_pil(image: Image.Image) -> torch.Tensor:
    array = torch.from_numpy(np.array(image)).float()
    return array.unsqueeze(0) if array.dim() == 2 else array.permute(2, 0, 1)


def pillow9_posterize(image, bits):
    """ImageOps.posterize as Pillow 9 (timm 0.6.5's day) computed it: 0 bits keeps no bit, a black image."""
    mask = ~(2 ** (8 - bits) - 1)
    return image.point([i & mask for i in range(256)] * len(image.getbands()))


@pytest.fixture
def timm_065_pillow(monkeypatch):
    monkeypatch.setattr(ImageOps, "posterize", pillow9_posterize)


def timm_op(name, magnitude, negate, image, fill, interpolation):
    """timm's AugmentOp at a fixed magnitude (its clip raised to 30 by 'magnitude_max'), always applied, its random
    sign forced."""
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    hparams = dict(translate_const=100, img_mean=fill if len(fill) > 1 else fill[0], magnitude_std=0,
                   magnitude_max=30, interpolation=resample)
    op = taa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    draw = random.random
    random.random = (lambda: 0.9) if negate else (lambda: 0.1)  # timm negates when random() > 0.5
    try:
        return from_pil(op(to_pil(image)))
    finally:
        random.random = draw


def assert_close_to_timm(ours, reference, geometric, what):
    diff = (ours - reference).abs()
    differing = (diff > 0).float().mean().item()
    assert differing <= MAX_DIFFERING, f"{what}: {differing:.2%} of the pixels differ from timm"
    if geometric:
        assert diff.mean().item() <= MAX_GEOMETRIC_MEAN_DIFF, f"{what}: mean diff {diff.mean():.3f}"
    else:
        assert diff.max().item() <= 1, f"{what}: a pixel differs by {diff.max():.0f}"


# ----------------------------------------------------------------------------------------------- each op

@pytest.mark.parametrize("name", ALL_OPS)
def test_op_matches_timm_at_fixed_magnitude(name, fmnist, timm_065_pillow):
    interpolations = ("bilinear", "bicubic") if name in GEOMETRIC else ("bilinear",)
    for set_name, (images, fill) in image_sets(fmnist).items():
        for magnitude in MAGNITUDES:
            for negate in (False, True):
                for interpolation in interpolations:
                    n = len(images)  # float64 magnitudes: timm's are Python floats
                    ours = randaugment.apply_op(images, name, torch.full((n,), magnitude, dtype=torch.float64),
                                      torch.full((n,), negate), fill, interpolation)
                    reference = torch.stack([timm_op(name, magnitude, negate, im, fill, interpolation)
                                             for im in images])
                    assert ours.shape == images.shape
                    assert_close_to_timm(ours, reference, name in GEOMETRIC,
                                         f"{name} m={magnitude} negate={negate} {interpolation} on {set_name}")


def test_ops_beyond_magnitude_10_follow_timm_065(fmnist, timm_065_pillow, monkeypatch):
    """With mmax > 10 the level exceeds 1; 0.6.5 does not clamp solarize thresholds or SolarizeAdd amounts (timm
    >= 0.9 clamps them to 256 and 128), so timm's op runs with 0.6.5's level functions for those."""
    monkeypatch.setitem(taa.LEVEL_TO_ARG, "Solarize", lambda level, _: (int(level / 10 * 256),))
    monkeypatch.setitem(taa.LEVEL_TO_ARG, "SolarizeIncreasing", lambda level, _: (256 - int(level / 10 * 256),))
    monkeypatch.setitem(taa.LEVEL_TO_ARG, "SolarizeAdd", lambda level, _: (int(level / 10 * 110),))
    images, fill = image_sets(fmnist)["fmnist-rgb"]
    n = len(images)
    for name in ALL_OPS:
        for magnitude in (12.0, 15.0, 23.0):
            ours = randaugment.apply_op(images, name, torch.full((n,), magnitude, dtype=torch.float64),
                              torch.full((n,), True), fill)
            reference = torch.stack([timm_op(name, magnitude, True, im, fill, "bilinear") for im in images])
            assert_close_to_timm(ours, reference, name in GEOMETRIC, f"{name} m={magnitude}")
    add = randaugment.apply_op(images, "SolarizeAdd", torch.full((n,), 12.0, dtype=torch.float64),
                               torch.zeros(n).bool(), fill)
    assert torch.equal(add[images < 128], (images[images < 128] + 132).clamp(max=255))  # int(1.2 * 110), no cap


def test_ops_change_the_images(fmnist):
    """The comparisons above are not vacuous: at m=9 every op changes more than 1 % of the RGB pixels."""
    images, fill = image_sets(fmnist)["fmnist-rgb"]
    n = len(images)
    for name in ALL_OPS:
        ours = randaugment.apply_op(images, name, torch.full((n,), 9.0), torch.full((n,), True), fill)
        assert (ours != images).float().mean() > 0.01, name


def test_posterize_to_zero_bits_is_black_as_in_timm_065(fmnist):
    """PosterizeIncreasing at m=10 and Posterize below m=2.5 keep 0 bits: black, where current Pillow raises."""
    images, fill = image_sets(fmnist)["fmnist-rgb"]
    n = len(images)
    for name, magnitude in (("PosterizeIncreasing", 10.0), ("Posterize", 2.4)):
        out = randaugment.apply_op(images, name, torch.full((n,), magnitude), torch.zeros(n, dtype=torch.bool), fill)
        assert out.abs().max() == 0, name
    one_bit = randaugment.apply_op(images, "PosterizeIncreasing", torch.full((n,), 9.9),
                                   torch.zeros(n, dtype=torch.bool), fill)
    assert set(one_bit.unique().tolist()) <= {0.0, 128.0} and one_bit.max() == 128


def test_equalize_table_above_255_is_clipped_as_pillow():
    """Few distinct values make equalize's table exceed 255 for the top value; Pillow's point() clips it."""
    image = torch.tensor([0.0] * 200 + [10.0] * 100 + [255.0] * 300).view(1, 1, 20, 30)
    ours = randaugment.apply_op(image, "Equalize", torch.zeros(1), torch.zeros(1, dtype=torch.bool), FILL_GRAY)
    reference = from_pil(ImageOps.equalize(to_pil(image[0])))
    assert torch.equal(ours[0], reference)
    assert sorted(ours.unique().tolist()) == [0.0, 200.0, 255.0]  # (0 + 200) // 1 and min(300, 255)


# ----------------------------------------------------------------------------------------------- whole policy

@pytest.mark.parametrize("policy,interpolation", [("rand-m9-mstd0.5-inc1", "random"),
                                                   ("rand-m7-n3-mstd1", "bicubic"),
                                                   ("rand-m9-n2-mstd0.5-inc1-w0", "bilinear")])
def test_batched_policy_matches_timm_replaying_the_same_draws(policy, interpolation, fmnist, timm_065_pillow):
    """Each image through timm's ops in the drawn order, with the drawn magnitude, sign and resampling."""
    noise = torch.randint(0, 256, (32, 3, 24, 20), generator=torch.Generator().manual_seed(4)).float()
    for images, fill in (image_sets(fmnist)["fmnist-rgb"], (noise, FILL_RGB)):
        augment = randaugment.BatchRandAugment(policy, fill=fill, interpolation=interpolation)
        draws = augment.draw(len(images), generator=torch.Generator().manual_seed(3))
        ours = augment.apply(images, draws)
        names = augment.spec.op_names
        reference = []
        for i, image in enumerate(images):
            out = image
            for slot in range(augment.spec.num_ops):
                if draws.applied[i, slot]:
                    out = timm_op(names[draws.op[i, slot]], draws.magnitude[i, slot].item(),
                                  bool(draws.negate[i, slot]), out, fill,
                                  "bicubic" if draws.bicubic[i, slot] else "bilinear")
            reference.append(out)
        assert_close_to_timm(ours, torch.stack(reference), True, policy)
        assert draws.applied.any() and not draws.applied.all()


def test_a_batch_equals_its_images_augmented_one_by_one(fmnist):
    """Grouping by op, the index arithmetic and the shared geometric pass give each image its own result."""
    images, fill = image_sets(fmnist)["noise-rgb"]
    augment = randaugment.BatchRandAugment("rand-m9-n4-mstd0.5-inc1-p0.8", fill=fill)
    draws = augment.draw(len(images), generator=torch.Generator().manual_seed(5))
    batched = augment.apply(images, draws)
    for i in range(len(images)):
        alone = augment.apply(images[i:i + 1], randaugment.RandAugmentDraws(*(t[i:i + 1] for t in draws)))
        assert torch.equal(batched[i:i + 1], alone), i


# ----------------------------------------------------------------------------------------------- sampling

class _Recorder:
    """Stands in for one of timm's ops in RandAugment: records that it was chosen, then runs timm's op with its
    aug_fn replaced by a recorder of the level arguments and of timm's resampling choice."""

    def __init__(self, op, log):
        self.op, self.log = op, log
        op.aug_fn = self._record_call

    def __call__(self, image):
        self.log.append({"name": self.op.name, "applied": False})
        return self.op(image)

    def _record_call(self, image, *args, **kwargs):
        if self.op.name in GEOMETRIC:
            taa._check_args_tf(kwargs)  # timm's own random.choice of the resampling filter
        self.log[-1].update(applied=True, args=args, bicubic=kwargs["resample"] == Image.BICUBIC)
        return image


# timm 0.6.5's _RAND_CHOICE_WEIGHTS_0 ('w0'; timm >= 0.9 dropped the key and changed the weights)
WEIGHTS_065 = {"Rotate": 0.3, "ShearX": 0.2, "ShearY": 0.2, "TranslateXRel": 0.1, "TranslateYRel": 0.1,
               "Color": 0.025, "Sharpness": 0.025, "AutoContrast": 0.025, "Solarize": 0.005, "SolarizeAdd": 0.005,
               "Contrast": 0.005, "Brightness": 0.005, "Equalize": 0.005, "Posterize": 0, "Invert": 0}


def timm_transform(policy):
    """timm's RandAugment for the policy; 'w0' is built as timm 0.6.5 built it (weights by position, no replacement)."""
    hparams = {"translate_const": 100, "img_mean": FILL_RGB}
    if "-w0" not in policy:
        return taa.rand_augment_transform(policy, hparams)
    plain = taa.rand_augment_transform(policy.replace("-w0", ""), hparams)
    weights = np.array([WEIGHTS_065[name] for name in randaugment.PLAIN_OPS])
    return taa.RandAugment(plain.ops, plain.num_layers, choice_weights=weights / weights.sum())


def timm_draws(policy, n_images, seed):
    random.seed(seed)
    np.random.seed(seed)
    transform = timm_transform(policy)
    log = []
    transform.ops = [_Recorder(op, log) for op in transform.ops]
    image = Image.new("RGB", (4, 4))
    for _ in range(n_images):
        transform(image)
    return log, transform.num_layers


def magnitude_from_args(name, args):
    """The clipped magnitude recovered from a continuous op's level argument, and whether it was negated (the
    increasing enhance ops clip at 0.1, so this holds for them up to magnitude 10)."""
    level = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}
    if name in level:
        return abs(args[0]) / level[name] * 10, args[0] < 0
    if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        return abs(args[0] - 1.0) / 0.09, args[0] < 1.0
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (args[0] - 0.1) / 0.18, None
    return None, None


def ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, side="right") / len(a), np.searchsorted(b, grid, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def assert_same_rate(k1, n1, k2, n2, what):
    """Two binomial rates within 4.5 standard errors of their difference (two-sided p ~ 7e-6)."""
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / n1 + 1 / n2))
    assert abs(k1 / n1 - k2 / n2) <= 4.5 * se + 1e-12, f"{what}: ours {k1 / n1:.4f}, timm {k2 / n2:.4f}"


def assert_rate(k, n, p, what):
    """A binomial rate within 4.5 standard errors of the rate timm's code defines."""
    assert abs(k / n - p) <= 4.5 * math.sqrt(p * (1 - p) / n), f"{what}: {k / n:.4f}, expected {p}"


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m12-n3-mstd2-mmax15", "rand-m8-mstd101",
                                    "rand-m9-n3-w0"])
def test_sampling_matches_timm_randaugment(policy):
    n_images = 20000
    log, num_layers = timm_draws(policy, n_images, seed=0)
    augment = randaugment.BatchRandAugment(policy, fill=FILL_RGB)
    draws = augment.draw(n_images, generator=torch.Generator().manual_seed(0))
    spec, names = augment.spec, augment.spec.op_names
    assert num_layers == spec.num_ops and len(log) == n_images * num_layers

    # which ops: a chi-square two-sample test over the op list (df <= 14, critical value at p = 1e-3 is 36.1)
    ours_counts = np.bincount(draws.op.flatten().numpy(), minlength=len(names))
    timm_counts = np.array([sum(r["name"] == name for r in log) for name in names])
    expected = (ours_counts + timm_counts) / 2
    used = expected > 0
    chi2 = (((ours_counts - expected) ** 2 + (timm_counts - expected) ** 2)[used] / expected[used]).sum()
    assert chi2 < 36.1, (policy, ours_counts, timm_counts)
    # with replacement (uniform choice) or without (weighted): how often an image drew the same op twice
    timm_slots = np.array([names.index(r["name"]) for r in log]).reshape(n_images, num_layers)
    ours_repeat = sum(len(set(row)) < num_layers for row in draws.op.tolist())
    timm_repeat = sum(len(set(row)) < num_layers for row in timm_slots.tolist())
    assert_same_rate(ours_repeat, n_images, timm_repeat, n_images, f"{policy} repeated ops")
    if spec.weighted:
        assert ours_repeat == timm_repeat == 0

    # applied with probability p
    applied = [r for r in log if r["applied"]]
    assert_same_rate(int(draws.applied.sum()), draws.applied.numel(), len(applied), len(log), f"{policy} applied")
    assert_rate(int(draws.applied.sum()), draws.applied.numel(), spec.prob, f"{policy} applied, ours")
    assert_rate(len(applied), len(log), spec.prob, f"{policy} applied, timm")

    # magnitudes (noise, clip) of the ops whose argument reveals it, and the random sign
    theirs = [magnitude_from_args(r["name"], r["args"]) for r in applied]
    timm_magnitudes = np.array([m for m, _ in theirs if m is not None]).round(6)  # recovered up to float error
    continuous = torch.tensor([magnitude_from_args(name, (1.5,))[0] is not None for name in names])
    mask = draws.applied & continuous[draws.op]
    ours_magnitudes = draws.magnitude[mask].numpy().round(6)
    n1, n2 = len(ours_magnitudes), len(timm_magnitudes)
    assert ks_statistic(ours_magnitudes, timm_magnitudes) < 1.95 * math.sqrt((n1 + n2) / (n1 * n2))  # p = 1e-3
    top = spec.magnitude_max
    assert_same_rate(int((ours_magnitudes >= top - 1e-9).sum()), n1, int((timm_magnitudes >= top - 1e-9).sum()), n2,
                     f"{policy} clipped at {top}")
    assert ours_magnitudes.min() >= 0 and timm_magnitudes.min() >= -1e-9 and ours_magnitudes.max() <= top
    signs = [s for _, s in theirs if s is not None]
    symmetric = torch.tensor([magnitude_from_args(name, (1.5,))[1] is not None for name in names])
    ours_signs = draws.negate[draws.applied & symmetric[draws.op]]
    assert_same_rate(int(ours_signs.sum()), len(ours_signs), sum(signs), len(signs), f"{policy} negated")
    assert_rate(int(ours_signs.sum()), len(ours_signs), 0.5, f"{policy} negated, ours")
    assert_rate(sum(signs), len(signs), 0.5, f"{policy} negated, timm")

    # resampling: bicubic or bilinear per geometric op call
    timm_bicubic = [r["bicubic"] for r in applied if r["name"] in GEOMETRIC]
    geometric = torch.tensor([name in GEOMETRIC for name in names])
    ours_bicubic = draws.bicubic[draws.applied & geometric[draws.op]]
    assert_same_rate(int(ours_bicubic.sum()), len(ours_bicubic), sum(timm_bicubic), len(timm_bicubic),
                     f"{policy} bicubic")
    assert_rate(int(ours_bicubic.sum()), len(ours_bicubic), 0.5, f"{policy} bicubic, ours")
    assert_rate(sum(timm_bicubic), len(timm_bicubic), 0.5, f"{policy} bicubic, timm")


def test_posterize_bits_distribution_matches_timm():
    """m9 mstd0.5 inc1: PosterizeIncreasing keeps 1 bit mostly and 0 bits when the magnitude is clipped at 10."""
    n_images = 6000
    log, _ = timm_draws("rand-m9-mstd0.5-inc1", n_images, seed=1)
    timm_bits = [r["args"][0] for r in log if r["applied"] and r["name"] == "PosterizeIncreasing"]
    augment = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1", fill=FILL_RGB)
    draws = augment.draw(n_images, generator=torch.Generator().manual_seed(1))
    chosen = draws.applied & (draws.op == augment.spec.op_names.index("PosterizeIncreasing"))
    ours_bits = (4 - torch.trunc(draws.magnitude[chosen] / 10 * 4)).long().tolist()
    for bits in (0, 1):
        assert_same_rate(ours_bits.count(bits), len(ours_bits), timm_bits.count(bits), len(timm_bits), f"{bits} bits")
    assert set(timm_bits) <= {0, 1, 2} and timm_bits.count(0) > 0


@pytest.mark.parametrize("interpolation", ["random", "bilinear", "bicubic"])
def test_fill_and_resampling_as_create_transform_passes_them(interpolation):
    """timm's train transform hands RandAugment img_mean (the fill) and, unless 'random', the train interpolation."""
    from timm.data import create_transform

    mean = (0.5071, 0.4865, 0.4409)  # CIFAR-100
    transform = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                 interpolation=interpolation, mean=mean)
    rand_augment = next(t for t in transform.transforms if isinstance(t, taa.RandAugment))
    kwargs = rand_augment.ops[0].kwargs
    assert randaugment.fill_from_mean(mean) == kwargs["fillcolor"] == (129, 124, 112)
    resample = {"random": (Image.BILINEAR, Image.BICUBIC), "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    assert kwargs["resample"] == resample[interpolation]
    draws = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1", randaugment.fill_from_mean(mean), interpolation).draw(
        4000, generator=torch.Generator().manual_seed(0))
    expected_bicubic = {"random": 0.5, "bilinear": 0.0, "bicubic": 1.0}[interpolation]
    assert abs(draws.bicubic.double().mean().item() - expected_bicubic) < 0.03


# ----------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3", "rand-n1-mstd101",
                                    "rand-m12-mstd1-mmax15", "rand-mmax0", "rand"])
def test_parse_agrees_with_timm(policy):
    spec = randaugment.parse_rand_augment(policy)
    transform = taa.rand_augment_transform(policy, {"translate_const": 100, "img_mean": FILL_RGB})
    op = transform.ops[0]
    assert spec.num_ops == transform.num_layers
    assert spec.magnitude == op.magnitude
    assert spec.magnitude_std == op.magnitude_std
    assert spec.magnitude_max == (op.magnitude_max or 10)
    assert spec.op_names == tuple(o.name for o in transform.ops)
    assert spec.prob == op.prob == 0.5


def test_parse_fields():
    assert randaugment.parse_rand_augment("rand-m9-mstd0.5-inc1") == randaugment.RandAugmentSpec(
        num_ops=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, prob=0.5, increasing=True)
    assert randaugment.parse_rand_augment("rand-w0-p0.8").weighted
    assert randaugment.parse_rand_augment("rand-p0.8").prob == 0.8
    assert randaugment.parse_rand_augment("rand-mstd200").magnitude_std == math.inf


@pytest.mark.parametrize("policy,message", [
    ("augmix-m9", "must start with 'rand'"),
    ("rand-m9-foo", "unknown part 'foo'"),
    ("rand-x3", "unknown part 'x3'"),
    ("rand-m9--n2", "unknown part ''"),
    ("rand-m9.5", "bad part 'm9.5'"),
    ("rand-inc0", "inc0 is read differently"),
    ("rand-w1", "only weight set 0"),
    ("rand-p1.5", r"p must be in \[0, 1\]"),
    ("rand-n14-w0", "n must be <= 13"),
])
def test_parse_errors_name_the_part_and_what_is_allowed(policy, message):
    with pytest.raises(ValueError, match=message):
        randaugment.parse_rand_augment(policy)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="interpolation must be one of bilinear, bicubic, random"):
        randaugment.BatchRandAugment("rand-m9", fill=FILL_RGB, interpolation="nearest")
    with pytest.raises(ValueError, match="fill must be 1 or 3 values in"):
        randaugment.BatchRandAugment("rand-m9", fill=(300, 0, 0))
    augment = randaugment.BatchRandAugment("rand-m9", fill=FILL_RGB)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        augment(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="fill has 3 values for 1-channel images"):
        augment(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"RandAugmentSpec.prob must be in \[0, 1\], got 2"):
        randaugment.RandAugmentSpec(prob=2.0)
    with pytest.raises(ValueError, match="RandAugmentSpec.num_ops must be >= 0"):
        randaugment.BatchRandAugment(randaugment.RandAugmentSpec(num_ops=-1), fill=FILL_RGB)
    with pytest.raises(ValueError, match="unknown RandAugment op 'Cutout'"):
        randaugment.apply_op(torch.zeros(1, 3, 8, 8), "Cutout", torch.zeros(1), torch.zeros(1, dtype=torch.bool),
                             FILL_RGB)


# ----------------------------------------------------------------------------------------------- reproducibility

def test_seeded_generator_reproduces_the_batch_bit_for_bit(fmnist):
    images, fill = image_sets(fmnist)["fmnist-rgb"]
    augment = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1", fill=fill)
    first = augment(images, torch.Generator().manual_seed(11))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(11)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(12)))
    torch.manual_seed(11)
    global_first = augment(images)
    torch.manual_seed(11)
    assert torch.equal(global_first, augment(images))


def test_channels_last_input_gives_the_same_batch(fmnist):
    images, fill = image_sets(fmnist)["noise-rgb"]
    augment = randaugment.BatchRandAugment("rand-m9-n4-mstd0.5-inc1-p0.9", fill=fill)
    draws = augment.draw(len(images), generator=torch.Generator().manual_seed(6))
    assert torch.equal(augment.apply(images.contiguous(memory_format=torch.channels_last), draws),
                       augment.apply(images, draws))


def test_dtype_shape_and_integer_values_are_kept(fmnist):
    images, fill = image_sets(fmnist)["fmnist-gray"]
    augment = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1", fill=fill, interpolation="bilinear")
    for dtype in (torch.float32, torch.float64, torch.uint8):
        out = augment(images.to(dtype), torch.Generator().manual_seed(0))
        assert out.dtype == dtype and out.shape == images.shape
        assert torch.equal(out.double(), out.double().round()) and out.min() >= 0 and out.max() <= 255


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_for_the_same_draws(fmnist):
    images, fill = image_sets(fmnist)["fmnist-rgb"]
    augment = randaugment.BatchRandAugment("rand-m9-mstd0.5-inc1", fill=fill)
    draws = augment.draw(len(images), generator=torch.Generator().manual_seed(2))
    on_cuda = augment.apply(images.cuda(), randaugment.RandAugmentDraws(*(t.cuda() for t in draws)))
    assert on_cuda.device.type == "cuda"
    assert_close_to_timm(on_cuda.cpu(), augment.apply(images, draws), True, "cuda vs cpu")
    generator = torch.Generator(device="cuda").manual_seed(0)
    assert augment(images.cuda(), generator).device.type == "cuda"
