"""Datasets and the batched tensor pipelines."""
import gzip
import struct

import numpy as np
import pytest
import torch

from _support import ks_critical, ks_statistic
from hkdbench.benchmark.data import datasets
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.core.config import DataConfig


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_torchvision_root_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    for split, n in (("train", 7), ("t10k", 7)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", images[:n])
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    x, y = datasets.load_tensors(DataConfig(root=str(tmp_path)), train=True)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(datasets.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.check_data_available(DataConfig())
    with pytest.raises(datasets.DataNotFoundError, match=f"data.root={tmp_path} holds no Fashion-MNIST.*"
                                                         "zalandoresearch/fashion-mnist"):
        datasets.check_data_available(DataConfig(root=str(tmp_path)))
    with pytest.raises(datasets.DataNotFoundError, match="data.root"):
        datasets.check_data_available(DataConfig(dataset="cifar100"))
    with pytest.raises(ValueError, match="known datasets: fashion-mnist, cifar10, cifar100, imagenet"):
        datasets.dataset_info("mnist")


def test_real_fashion_mnist(fmnist_available):
    x, y = datasets.load_tensors(DataConfig(), train=True)
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10
    assert abs(x.float().mean().item() / 255 - 0.2860) < 1e-3


def test_epoch_order_is_a_deterministic_function_of_seed_and_epoch():
    a = loaders.epoch_permutation(100, seed=1, epoch=3)
    assert torch.equal(a, loaders.epoch_permutation(100, 1, 3))
    assert not torch.equal(a, loaders.epoch_permutation(100, 1, 4))
    assert sorted(a.tolist()) == list(range(100))


def _pil_resized_crop(image: torch.Tensor, box, size: int, bicubic: bool, flip: bool) -> torch.Tensor:
    """Pillow's crop + resize of one uint8 (C, H, W) image, in Pillow's two passes, horizontal then vertical (a
    single resize in Pillow >= 2026 may run the vertical pass first when the height shrinks most)."""
    from PIL import Image

    top, left, h, w = (int(v) for v in box)
    array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
    mode = Image.BICUBIC if bicubic else Image.BILINEAR
    crop = Image.fromarray(array).crop((left, top, left + w, top + h))
    out = crop.resize((size, h), mode).resize((size, size), mode)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    out = torch.from_numpy(np.array(out))
    return (out[None] if out.ndim == 2 else out.permute(2, 0, 1)).float()


@pytest.mark.parametrize("bicubic", [False, True])
def test_resized_crop_is_pillows_crop_resize_and_flip_exactly(bicubic):
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    edges = (torch.rand(6, 3, 32, 32, generator=g) > 0.5).to(torch.uint8) * 255  # bicubic overshoot is clipped
    images = torch.cat([noise, edges])
    torch.manual_seed(1)
    box = loaders._rrc_params(len(images), 32, 32, (0.08, 1.0))
    box[0][0], box[1][0], box[2][0], box[3][0] = 0, 0, 32, 32  # the whole image
    box[0][1], box[1][1], box[2][1], box[3][1] = 0, 3, 31, 19  # shrinks vertically while growing horizontally
    flip = torch.arange(len(images)) % 2 == 0
    for size in (224, 20):  # up-sampling, and down-sampling (Pillow widens the filter)
        ours = loaders._resized_crop(images.float(), box, flip, size, torch.full((len(images),), bicubic))
        for i in range(len(images)):
            ref = _pil_resized_crop(images[i], [b[i] for b in box], size, bicubic, bool(flip[i]))
            assert torch.equal(ours[i], ref), (size, i)


def test_train_crop_honours_train_interpolation_per_image():
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    info = datasets.dataset_info("fashion-mnist")
    for mode in ("bilinear", "bicubic", "random"):
        cfg = DataConfig(pipeline="paper224", img_size=40, train_interpolation=mode)
        loader = loaders.TensorLoader(images, torch.zeros(16, dtype=torch.long), cfg, info, True,
                                      torch.device("cpu"), 1.0)
        torch.manual_seed(5)
        out = loader._train_crop(images.float())
        torch.manual_seed(5)  # the same draws: box, flip, then the per-image interpolation
        box = loaders._rrc_params(16, 28, 28, (0.08, 1.0))
        flip = torch.rand(16) < 0.5
        bicubic = loaders._per_image_bicubic(16, mode, "cpu")
        for i in range(16):
            ref = _pil_resized_crop(images[i], [b[i] for b in box], 40, bool(bicubic[i]), bool(flip[i]))
            assert torch.equal(out[i], ref), (mode, i)


def test_random_interpolation_is_bicubic_for_half_the_images():
    torch.manual_seed(0)
    bicubic = loaders._per_image_bicubic(4000, "random", "cpu")
    assert abs(bicubic.float().mean().item() - 0.5) < 4 * (0.25 / 4000) ** 0.5
    assert not loaders._per_image_bicubic(10, "bilinear", "cpu").any()
    assert loaders._per_image_bicubic(10, "bicubic", "cpu").all()


def test_rrc_boxes_are_drawn_as_timms_random_resized_crop():
    import random

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    n = 4000
    torch.manual_seed(0)
    top, left, h, w = loaders._rrc_params(n, 28, 28, (0.08, 1.0))
    assert top.dtype == torch.long and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 28).all() and (left + w <= 28).all() and (h >= 1).all() and (w >= 1).all()
    random.seed(0)
    image = Image.new("L", (28, 28))
    ref = torch.tensor([RandomResizedCropAndInterpolation.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                        for _ in range(n)])
    crit = ks_critical(n, n)
    for ours, theirs in ((h * w, ref[:, 2] * ref[:, 3]), (w / h, ref[:, 3] / ref[:, 2]), (top, ref[:, 0]),
                         (left + w / 2, ref[:, 1] + ref[:, 3] / 2)):
        assert ks_statistic(ours.double(), theirs.double()) < crit


def test_rrc_falls_back_to_timms_central_crop():
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    # the whole area at aspect 2 (28 x 14) never fits a 40 x 10 image: timm crops the centre at the nearest ratio
    torch.manual_seed(0)
    ours = torch.stack(loaders._rrc_params(8, 10, 40, (1.0, 1.0), ratio=(2.0, 2.0)), 1)
    ref = RandomResizedCropAndInterpolation.get_params(Image.new("L", (40, 10)), (1.0, 1.0), (2.0, 2.0))
    assert ref == (0, 10, 10, 20) and (ours == torch.tensor(ref)).all()
    assert loaders._central_crop_size(40, 10, (3 / 4, 4 / 3)) == (13, 10)
    assert loaders._central_crop_size(12, 12, (3 / 4, 4 / 3)) == (12, 12)


def test_random_crop_flip_without_padding_is_a_flip_or_identity():
    x = torch.rand(6, 1, 5, 5)
    out = loaders._random_crop_flip(x, padding=0, hflip=0.5)
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))


def test_tensor_loader_batches_shapes_and_resume_offset():
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    cfg = DataConfig(batch_size=8, img_size=32)
    loader = loaders.TensorLoader(images, labels, cfg, datasets.dataset_info("fashion-mnist"), True,
                                  torch.device("cpu"), 1.0)
    assert len(loader) == 5
    batches = list(loader.batches(seed=0, epoch=2))
    resumed = list(loader.batches(seed=0, epoch=2, start_step=3))
    assert [b[1].tolist() for b in batches[3:]] == [b[1].tolist() for b in resumed]
    assert batches[0][0].shape == (8, 1, 32, 32)


@pytest.mark.parametrize("subset,batch,world,in_memory", [(0, 32, 1, "auto"), (50, 16, 1, "no"), (60, 8, 2, "auto"),
                                                     (70, 7, 1, "auto")])
def test_steps_per_epoch_are_counted_from_the_headers_as_the_loader_has_them(tmp_path, subset, batch, world,
                                                                           in_memory):
    """A plan's count (no image read) is the length of the training loader the run builds."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 70), ("t10k", 10)):
        _write_idx(raw / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    cfg = DataConfig(root=str(tmp_path), train_subset=subset, batch_size=batch, in_memory=in_memory, workers=0)
    assert datasets.training_split_size(cfg) == 70
    assert datasets.training_images(cfg) == min(subset or 70, 70)
    train, _, _ = loaders.build_loaders(cfg, torch.device("cpu"), 1.0, rank=0, world_size=world)
    assert loaders.train_steps_per_epoch(cfg, world) == len(train) == min(subset or 70, 70) // (batch * world)


def test_paper224_pipeline_shapes():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = DataConfig(dataset="cifar100", pipeline="paper224", img_size=224, batch_size=4, eval_batch_size=4)
    info = datasets.dataset_info("cifar100")
    train = loaders.TensorLoader(images, torch.zeros(4, dtype=torch.long), cfg, info, True, torch.device("cpu"), 0.875)
    test = loaders.TensorLoader(images, torch.zeros(4, dtype=torch.long), cfg, info, False, torch.device("cpu"), 0.875)
    assert next(train.batches())[0].shape == (4, 3, 224, 224)
    assert next(test.batches())[0].shape == (4, 3, 224, 224)


@pytest.mark.parametrize("crop_pct,interpolation", [(0.875, "bilinear"), (0.9, "bilinear"), (0.875, "bicubic")])
def test_paper224_eval_tensors_are_timms_eval_transform_exactly(crop_pct, interpolation):
    from PIL import Image
    from timm.data import create_transform

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    cfg = DataConfig(dataset="cifar100", pipeline="paper224", img_size=224, eval_batch_size=3,
                     eval_interpolation=interpolation)
    info = datasets.dataset_info("cifar100")
    loader = loaders.TensorLoader(images, torch.zeros(3, dtype=torch.long), cfg, info, False, torch.device("cpu"),
                                  crop_pct)
    ours = next(loader.batches())[0]
    transform = create_transform(224, is_training=False, interpolation=interpolation, mean=info.mean, std=info.std,
                                 crop_pct=crop_pct)
    for image, out in zip(images, ours):
        ref = transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
        assert torch.allclose(out, ref, atol=1e-5)


def test_train_subset_is_fixed_across_runs():
    a = datasets.train_subset_indices(1000, 100)
    assert torch.equal(a, datasets.train_subset_indices(1000, 100)) and len(a.unique()) == 100
    assert len(datasets.train_subset_indices(1000, 0)) == 1000


def test_per_image_path_gives_the_same_eval_tensors_as_the_fast_path(fmnist_available):
    cfg = DataConfig(eval_subset=20, eval_batch_size=10, workers=0, train_subset=64, batch_size=16)
    fast_train, fast_test, info = loaders.build_loaders(cfg, torch.device("cpu"), 1.0)
    slow_train, slow_test, _ = loaders.build_loaders(DataConfig(**{**cfg.__dict__, "in_memory": "no"}),
                                               torch.device("cpu"), 1.0)
    assert isinstance(slow_test, loaders.ImageLoader) and isinstance(fast_test, loaders.TensorLoader)
    for (xa, ya), (xb, yb) in zip(fast_test.batches(), slow_test.batches()):
        assert torch.equal(ya, yb)
        assert torch.allclose(xa, xb, atol=1e-5)
    xa, ya = next(fast_train.batches(seed=3, epoch=1))
    xb, yb = next(slow_train.batches(seed=3, epoch=1))
    assert torch.equal(ya, yb) and xa.shape == xb.shape == (16, 1, 32, 32)


def test_eval_interpolation_is_validated():
    with pytest.raises(ValueError,
                       match="data.eval_interpolation must be one of bilinear, bicubic, model, got .random."):
        DataConfig(eval_interpolation="random")


def test_eval_interpolation_model_takes_the_students_timm_065_default():
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    def resolved(student, recipe, dataset):
        cfg = resolve_run_config(kind="student", student=student, method="none", dataset=dataset, recipe=recipe,
                                 overrides=["data.root=/nowhere"])
        return cfg.data.eval_interpolation

    # timm 0.6.5 default_cfg: resnet18 bilinear, deit/mobilenetv2/resmlp bicubic
    assert resolved("resnet18", "imagenet-cnn", "imagenet") == "bilinear"
    assert resolved("mobilenetv2_100", "imagenet-cnn", "imagenet") == "bicubic"
    assert resolved("deit_tiny", "imagenet-vit", "imagenet") == "bicubic"
    assert resolved("deit_tiny", "cifar-vit", "cifar100") == "bilinear"  # PAT, and OFA-KD at the paper's time
    with pytest.raises(ValueError, match="resolved to the student's default"):
        loaders.build_loaders(DataConfig(eval_interpolation="model"), torch.device("cpu"), 1.0)


# --------------------------------------------------------------------------------------------------------------
# The dataset registry: a dataset is one entry
# --------------------------------------------------------------------------------------------------------------

def _toy_dataset(calls):
    """Three classes of 12 x 12 grayscale images, each class one brightness plus noise; ``calls`` records every
    check and read the run makes."""
    def read(cfg, train):
        calls.append(("read", cfg.dataset, train))
        n = 48 if train else 24
        g = torch.Generator().manual_seed(int(train))
        labels = torch.arange(n) % 3
        noise = torch.randint(0, 30, (n, 1, 12, 12), generator=g)
        return (labels.view(-1, 1, 1, 1) * 100 + noise).to(torch.uint8), labels

    def check(cfg):
        calls.append(("check", cfg.dataset))

    info = datasets.DatasetInfo("toy-brightness", 3, 1, 12, (0.4,), (0.33,), in_memory=True)
    return datasets.Dataset(info, check=check, read_tensors=read)


@pytest.fixture
def toy_dataset():
    calls = []
    entry = datasets.register_dataset(_toy_dataset(calls))
    yield calls
    datasets.unregister_dataset(entry.info.name)


@pytest.mark.parametrize("in_memory", ["auto", "no"])  # the batched tensor path, the per-image path
def test_a_dataset_registered_as_one_entry_trains(toy_dataset, tmp_path, in_memory):
    from hkdbench.benchmark.engine.records import load_weights
    from hkdbench.benchmark.engine.trainer import train
    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    cfg = resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo", dataset="toy-brightness",
                             overrides=["data.img_size=16", "data.batch_size=16", "data.workers=0",
                                        f"data.in_memory={in_memory}", "train.epochs=1"])
    result = train(cfg, runs_dir=str(tmp_path), progress=False)
    assert result.status == "done" and result.summary["dataset"] == "toy-brightness"
    assert ("check", "toy-brightness") in toy_dataset  # the pre-run check is the entry's
    assert {call for call in toy_dataset if call[0] == "read"} == {("read", "toy-brightness", True),
                                                                    ("read", "toy-brightness", False)}
    assert datasets.training_split_size(cfg.data) == 48  # an entry without train_size: counted from its split
    # the model was built from the entry's facts: 3 classes, 1 channel
    student = create_model("resnet_mini", 3, in_chans=1, img_size=16)
    student.model.load_state_dict(load_weights(result.run_dir, "last"))


def test_auto_recipe_of_a_new_dataset_is_one_auto_recipes_line(toy_dataset, monkeypatch):
    from hkdbench.benchmark.core.config import ConfigError
    from hkdbench.benchmark.recipes.resolve import AUTO_RECIPES, resolve_run_config

    with pytest.raises(ConfigError, match="no recipe for dataset 'toy-brightness'.*add the dataset to AUTO_RECIPES"):
        resolve_run_config(kind="teacher", student="resnet_mini", dataset="toy-brightness")
    monkeypatch.setitem(AUTO_RECIPES, "toy-brightness", {"cnn": "demo", "other": "demo"})
    cfg = resolve_run_config(kind="teacher", student="resnet_mini", dataset="toy-brightness")
    assert (cfg.recipe, cfg.data.dataset) == ("demo", "toy-brightness")


def test_a_dataset_entry_is_validated(toy_dataset, monkeypatch):
    info = datasets.DatasetInfo("toy-other", 3, 1, 12, (0.4,), (0.33,), in_memory=True)
    per_image = {"check": lambda cfg: None, "image_dataset": lambda cfg, train, transform: None}
    with pytest.raises(ValueError, match="'toy-other' has in_memory=True but no read_tensors"):
        datasets.Dataset(info, **per_image)
    with pytest.raises(ValueError, match="'toy-other' needs read_tensors or image_dataset"):
        datasets.Dataset(info, check=lambda cfg: None)
    with pytest.raises(ValueError, match="'toy-brightness' is already registered"):
        datasets.register_dataset(_toy_dataset([]))
    # a per-image-only dataset (as imagenet) has no whole-split reader
    info = datasets.DatasetInfo("toy-per-image", 3, 1, 12, (0.4,), (0.33,), in_memory=False)
    monkeypatch.setitem(datasets.DATASETS, "toy-per-image", datasets.Dataset(info, **per_image))
    with pytest.raises(ValueError, match="toy-per-image has no in-memory loader"):
        datasets.load_tensors(DataConfig(dataset="toy-per-image"), train=True)
