"""The training data pipeline against timm's own ``create_transform`` (the per-image path, ``data.in_memory=no``):
the whole ``cifar-vit`` train transform in distribution on real images, colour jitter off under auto-augment,
the train interpolation field, and timm's posterize at 0 bits."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from _support import ks_critical, ks_statistic
from hkdbench.benchmark.data import datasets
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.core.config import ConfigError, DataConfig, build_dataclass
from hkdbench.benchmark.engine.seeding import seed_everything
from hkdbench.benchmark.recipes.resolve import RECIPES, resolve_run_config

FMNIST = datasets.dataset_info("fashion-mnist")


def _recipe_data(recipe: str, **changes) -> DataConfig:
    body = {**RECIPES[recipe]["data"], "dataset": "fashion-mnist", "workers": 0, **changes}
    return build_dataclass(DataConfig, body, "data")


def _per_image_moments(x: torch.Tensor):
    flat = x.flatten(1).double()
    return flat.mean(1), flat.std(1), flat.pow(2).mean(1)


def _timm_steps(cfg: DataConfig):
    """timm's train transform for ``cfg`` (the per-image path) cut after the crop/flip and after RandAugment."""
    from timm.data.auto_augment import RandAugment

    steps = loaders._image_transform(cfg, FMNIST, True, 1.0).transforms
    at = next(i for i, step in enumerate(steps) if isinstance(step, RandAugment))
    return steps[:at], steps[at]


def _uint8(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).float()


@pytest.mark.parametrize("pipeline, size", [("paper224", 64), ("small", 32)])
def test_cifar_vit_train_transform_matches_timms_per_image_path_in_distribution(fmnist_available, pipeline, size):
    """Both paths over the same 1536 Fashion-MNIST images (paper224 at 64 px: RRC random interpolation, flip;
    small: pad, random crop, flip; then RandAugment rand-m9-mstd0.5-inc1, normalise; the recipe mixes, so random
    erasing comes after the mix step, not in the loaders):
    per-image mean, std and second moment by KS test, the overall pixel mean and second moment within 5
    standard errors (from the per-image spread)."""
    n = 1536
    cfg = _recipe_data("cifar-vit", pipeline=pipeline, img_size=size, batch_size=256, eval_batch_size=256,
                       train_subset=n)
    seed_everything(0)
    fast, _, _ = loaders.build_loaders(cfg, torch.device("cpu"), 1.0)
    slow, _, _ = loaders.build_loaders(DataConfig(**{**cfg.__dict__, "in_memory": "no"}), torch.device("cpu"), 1.0)
    assert isinstance(fast, loaders.TensorLoader) and isinstance(slow, loaders.ImageLoader)
    ours = torch.cat([x for x, _ in fast.batches(seed=0, epoch=0)])
    theirs = torch.cat([x for x, _ in slow.batches(seed=0, epoch=0)])
    assert ours.shape == theirs.shape == (n, 1, size, size)
    crit = ks_critical(n, n)
    for name, a, b in zip(("mean", "std", "second moment"), _per_image_moments(ours), _per_image_moments(theirs)):
        quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        detail = f"{name}: quantiles {a.quantile(quantiles).tolist()} vs {b.quantile(quantiles).tolist()}"
        assert ks_statistic(a, b) < crit, detail
        if name != "std":
            standard_error = ((a.var() + b.var()) / n).sqrt().item()
            assert abs(a.mean().item() - b.mean().item()) < 5 * standard_error, detail


def test_randaugment_on_the_crops_changes_them_as_timms_does(fmnist_available):
    """RandAugment on the 64 px crops of 1200 images, ours against timm's: the share left unchanged (timm: both
    ops skipped for 1/4, plus ops that change nothing) within 4.5 binomial standard errors, and each image's mean
    absolute pixel change by KS test and in mean within 5 standard errors."""
    n, size = 1200, 64
    cfg = _recipe_data("cifar-vit", img_size=size, reprob=0.0)
    images, _ = datasets.load_tensors(cfg, train=True)
    images = images[:n]
    loader = loaders.TensorLoader(images, torch.zeros(n, dtype=torch.long), cfg, FMNIST, True, torch.device("cpu"), 1.0)
    seed_everything(1)
    crops = loader._train_crop(images.float())
    ours = (loader.rand_augment(crops) - crops).abs().flatten(1).mean(1).double()
    crop_flip, rand_augment = _timm_steps(cfg)
    theirs = []
    for image in images:
        crop = Image.fromarray(image[0].numpy())
        for step in crop_flip:
            crop = step(crop)
        theirs.append((_uint8(rand_augment(crop)) - _uint8(crop)).abs().mean().item())
    theirs = torch.tensor(theirs, dtype=torch.float64)
    same_ours, same_theirs = (ours == 0).double().mean().item(), (theirs == 0).double().mean().item()
    p = (same_ours + same_theirs) / 2
    assert 0.2 < same_theirs < 0.45
    assert abs(same_ours - same_theirs) < 4.5 * (2 * p * (1 - p) / n) ** 0.5, (same_ours, same_theirs)
    assert ks_statistic(ours, theirs) < ks_critical(n, n)
    standard_error = ((ours.var() + theirs.var()) / n).sqrt().item()
    assert abs(ours.mean().item() - theirs.mean().item()) < 5 * standard_error, (ours.mean(), theirs.mean())


def test_colour_jitter_is_off_under_auto_augment_on_the_tensor_path(monkeypatch):
    calls = []
    monkeypatch.setattr(loaders, "_color_jitter", lambda x, strength: calls.append(strength) or x)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    for auto_augment, expected in (("rand-m9-mstd0.5-inc1", []), (None, [0.4])):
        calls.clear()
        cfg = DataConfig(img_size=32, batch_size=8, color_jitter=0.4, auto_augment=auto_augment)
        loader = loaders.TensorLoader(images, torch.zeros(8, dtype=torch.long), cfg, FMNIST, True,
                                      torch.device("cpu"), 1.0)
        next(loader.batches())
        assert calls == expected


@pytest.mark.parametrize("pipeline", ["paper224", "small"])
def test_colour_jitter_is_off_under_auto_augment_on_the_per_image_path(pipeline):
    from timm.data.auto_augment import RandAugment
    from torchvision.transforms import ColorJitter

    def steps(auto_augment):
        cfg = DataConfig(pipeline=pipeline, img_size=64, color_jitter=0.4, auto_augment=auto_augment)
        return [type(s) for s in loaders._image_transform(cfg, FMNIST, True, 1.0).transforms]

    assert ColorJitter not in steps("rand-m9-mstd0.5-inc1") and RandAugment in steps("rand-m9-mstd0.5-inc1")
    assert ColorJitter in steps(None) and RandAugment not in steps(None)


def test_recipes_say_when_their_colour_jitter_is_not_applied(capsys):
    from hkdbench.benchmark.cli.run_commands import cmd_recipes

    assert "not applied" in loaders.color_jitter_note(0.4, "rand-m9-mstd0.5-inc1")
    assert loaders.color_jitter_note(0.4, None) == "" and loaders.color_jitter_note(0.0, "rand-m9-mstd0.5-inc1") == ""
    cmd_recipes(None, None)
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "color_jitter 0.4 is not applied" in lines["cifar-vit"]
    assert "not applied" not in lines["cifar-cnn"]


@pytest.mark.parametrize("pipeline", ["paper224", "small"])
def test_random_erasing_is_train_pys_pixel_mode_on_both_paths(pipeline):
    from timm.data.random_erasing import RandomErasing

    cfg = DataConfig(pipeline=pipeline, img_size=32, reprob=0.25)
    erasing = [s for s in loaders._image_transform(cfg, FMNIST, True, 1.0).transforms if isinstance(s, RandomErasing)]
    loader = loaders.TensorLoader(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), cfg,
                            FMNIST, True, torch.device("cpu"), 1.0)
    for each in (*erasing, loader.erasing):
        assert each.per_pixel and each.probability == 0.25 and each.max_count == 1
    assert len(erasing) == 1


@pytest.mark.parametrize("pipeline", ["paper224", "small"])
def test_under_mixup_the_loaders_leave_erasing_to_the_mix_step(pipeline):
    from timm.data.random_erasing import RandomErasing

    cfg = DataConfig(pipeline=pipeline, img_size=32, reprob=0.25, mixup=0.8, cutmix=1.0)
    steps = loaders._image_transform(cfg, FMNIST, True, 1.0).transforms
    loader = loaders.TensorLoader(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), cfg,
                            FMNIST, True, torch.device("cpu"), 1.0)
    assert not any(isinstance(s, RandomErasing) for s in steps) and loader.erasing is None
    assert isinstance(loaders.build_mixup(cfg, 10, 0.1), loaders.MixThenErase)
    assert loaders.build_mixup(DataConfig(reprob=0.25), 10, 0.1) is None


def test_erasing_comes_after_mixing_so_erased_patches_are_pure_noise():
    """timm train.py (prefetcher): mix, then erase. Erasing first would blend the noise with the other image
    (scaled by lam or 1 - lam); here every erased pixel is N(0, 1) and the rest is the mixed image."""
    cfg = DataConfig(reprob=1.0, mixup=0.8)
    mix = loaders.build_mixup(cfg, 4, 0.0)
    torch.manual_seed(0)
    np.random.seed(0)
    images = torch.arange(64.0).view(64, 1, 1, 1).expand(64, 1, 32, 32) * 100  # image i: constant 100 i
    labels = torch.arange(64) % 4
    out, soft = mix(images.clone(), labels)
    lam = soft[0, labels[0]].item()  # image 0's own share
    mixed = images * lam + images.flip(0) * (1 - lam)  # timm's batch mixup pairs image i with image B-1-i
    erased = (out - mixed).abs() > 0.01  # the mixed values agree to float rounding
    assert 0.02 < erased.double().mean() < 0.34  # one box of 2-33 % of the image in each (probability 1)
    noise = out[erased]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_randaugment_fill_is_timms_img_mean_of_the_dataset():
    cfg = DataConfig(img_size=32, auto_augment="rand-m9-mstd0.5-inc1")
    loader = loaders.TensorLoader(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), cfg,
                            FMNIST, True, torch.device("cpu"), 1.0)
    assert loader.rand_augment.fill == (73.0,) and loader.rand_augment.interpolation == "bilinear"
    cfg = DataConfig(dataset="cifar100", img_size=32, auto_augment="rand-m9-mstd0.5-inc1", train_interpolation="random")
    loader = loaders.TensorLoader(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), cfg,
                            datasets.dataset_info("cifar100"), True, torch.device("cpu"), 1.0)
    assert loader.rand_augment.fill == (129.0, 124.0, 112.0) and loader.rand_augment.interpolation == "random"


# --------------------------------------------------------------------------------------------------------------
# data.train_interpolation
# --------------------------------------------------------------------------------------------------------------

def test_train_interpolation_is_validated_with_the_allowed_values():
    with pytest.raises(ValueError, match="data.train_interpolation must be one of bilinear, bicubic, random, "
                                         "got 'nearest'"):
        DataConfig(train_interpolation="nearest")
    with pytest.raises(ConfigError, match="data.train_interpolation must be one of"):
        resolve_run_config(kind="student", student="resnet_mini", overrides=["data.train_interpolation=area"])


def test_recipes_carry_the_references_train_interpolation():
    # OFA-KD, PAT and spofaKD train.py: --train-interpolation default 'random', set by none of their configs
    expected = {"demo": "bilinear", "cifar-cnn": "random", "cifar-vit": "random", "cifar-teacher": "random",
                "imagenet-cnn": "random", "imagenet-vit": "random"}
    assert set(expected) == set(RECIPES)
    for recipe, mode in expected.items():
        dataset = "imagenet" if recipe.startswith("imagenet") else "fashion-mnist"
        cfg = resolve_run_config(kind="student", student="resnet_mini", recipe=recipe, dataset=dataset)
        assert cfg.data.train_interpolation == mode, recipe


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "random"])
def test_per_image_path_hands_the_train_interpolation_to_timm(mode):
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import InterpolationMode

    cfg = DataConfig(pipeline="paper224", img_size=64, train_interpolation=mode, auto_augment="rand-m9-mstd0.5-inc1")
    steps = loaders._image_transform(cfg, FMNIST, True, 1.0).transforms
    crop = next(s for s in steps if isinstance(s, RandomResizedCropAndInterpolation))
    _, rand_augment = _timm_steps(cfg)
    vision = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
    pil = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
    if mode == "random":  # timm draws one of the two per image, and per RandAugment op
        assert set(crop.interpolation) == set(vision.values())
        assert all(set(op.kwargs["resample"]) == set(pil.values()) for op in rand_augment.ops)
    else:
        assert crop.interpolation == vision[mode]
        assert all(op.kwargs["resample"] == pil[mode] for op in rand_augment.ops)


# --------------------------------------------------------------------------------------------------------------
# Posterize at 0 bits (per-image path)
# --------------------------------------------------------------------------------------------------------------

def test_posterize_keeps_zero_bits_as_a_black_image_and_otherwise_is_pillows():
    rng = np.random.default_rng(0)
    for mode, shape in (("L", (9, 7)), ("RGB", (9, 7, 3))):
        image = Image.fromarray(rng.integers(1, 256, shape, dtype=np.uint8), mode)
        assert not np.array(loaders.posterize_keeping_zero_bits(image, 0)).any()
        for bits in range(1, 8):
            assert np.array_equal(np.array(loaders.posterize_keeping_zero_bits(image, bits)),
                                  np.array(ImageOps.posterize(image, bits)))
        assert np.array_equal(np.array(loaders.posterize_keeping_zero_bits(image, 8)), np.array(image))


def test_timms_posterize_op_at_magnitude_10_gives_black_instead_of_raising():
    cfg = DataConfig(pipeline="paper224", img_size=32, auto_augment="rand-m9-mstd0.5-inc1")
    _, rand_augment = _timm_steps(cfg)
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # level 10: keep 4 - int(4) = 0 bits
    image = Image.fromarray(np.full((32, 32), 200, dtype=np.uint8))
    assert not np.array(op(image)).any()
    with pytest.raises(ValueError, match="bits must be"):  # what the installed Pillow does with timm's own op
        ImageOps.posterize(image, 0)


@pytest.mark.slow
def test_a_run_under_auto_augment_and_mixup_trains_and_logs_that_its_colour_jitter_is_off(fmnist_available, runs_dir):
    from hkdbench.benchmark.engine.trainer import train

    cfg = resolve_run_config(kind="student", student="resnet_mini", method="none", recipe="demo", overrides=[
        "data.train_subset=128", "data.eval_subset=64", "data.batch_size=64", "data.img_size=16", "train.epochs=1",
        "data.color_jitter=0.4", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", "data.mixup=0.8"])
    result = train(cfg, runs_dir=runs_dir, progress=False)
    assert result.status == "done"
    assert "color_jitter 0.4 is not applied" in result.run_dir.log_file.read_text()
