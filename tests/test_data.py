"""Datasets and the batched tensor pipelines."""
import gzip
import struct

import numpy as np
import pytest
import torch

from hkdbench.benchmark import data as D
from hkdbench.benchmark.config import DataConfig


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
    x, y = D.load_tensors(DataConfig(root=str(tmp_path)), train=True)
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.uint8
    assert np.array_equal(x[:, 0].numpy(), images) and np.array_equal(y.numpy(), labels)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "nothing")
    with pytest.raises(D.DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        D.check_data_available(DataConfig(root=str(tmp_path)))
    with pytest.raises(D.DataNotFoundError, match="data.root"):
        D.check_data_available(DataConfig(dataset="cifar100"))
    with pytest.raises(ValueError, match="known datasets: fashion-mnist, cifar10, cifar100, imagenet"):
        D.dataset_info("mnist")


def test_real_fashion_mnist(fmnist_available):
    x, y = D.load_tensors(DataConfig(), train=True)
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10
    assert abs(x.float().mean().item() / 255 - 0.2860) < 1e-3


def test_epoch_order_is_a_deterministic_function_of_seed_and_epoch():
    a = D.epoch_permutation(100, seed=1, epoch=3)
    assert torch.equal(a, D.epoch_permutation(100, 1, 3))
    assert not torch.equal(a, D.epoch_permutation(100, 1, 4))
    assert sorted(a.tolist()) == list(range(100))


def test_crop_resize_with_the_whole_image_box_is_identity_and_flip_mirrors():
    x = torch.rand(2, 3, 8, 8) * 255
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2)
    same = D._crop_resize(x, whole, torch.tensor([False, True]), 8)
    assert torch.allclose(same[0], x[0], atol=1e-4)
    assert torch.allclose(same[1], x[1].flip(-1), atol=1e-4)


def test_crop_resize_of_a_quarter_box_upsamples_that_quarter():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    top_left = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    out = D._crop_resize(x, top_left, torch.tensor([False]), 2)
    assert torch.allclose(out.view(-1), torch.tensor([0.0, 1.0, 4.0, 5.0]))


def test_rrc_boxes_lie_inside_the_image_with_the_scale_range():
    torch.manual_seed(0)
    boxes = D._rrc_boxes(2000, (0.08, 1.0))
    cx, cy, w, h = boxes.unbind(1)
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6


def test_random_crop_flip_without_padding_is_a_flip_or_identity():
    x = torch.rand(6, 1, 5, 5)
    out = D._random_crop_flip(x, padding=0, hflip=0.5)
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))


def test_tensor_loader_batches_shapes_and_resume_offset():
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    cfg = DataConfig(batch_size=8, img_size=32)
    loader = D.TensorLoader(images, labels, cfg, D.dataset_info("fashion-mnist"), True, torch.device("cpu"), 1.0)
    assert len(loader) == 5
    batches = list(loader.batches(seed=0, epoch=2))
    resumed = list(loader.batches(seed=0, epoch=2, start_step=3))
    assert [b[1].tolist() for b in batches[3:]] == [b[1].tolist() for b in resumed]
    assert batches[0][0].shape == (8, 1, 32, 32)


def test_paper224_pipeline_shapes():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    cfg = DataConfig(dataset="cifar100", pipeline="paper224", img_size=224, batch_size=4, eval_batch_size=4)
    info = D.dataset_info("cifar100")
    train = D.TensorLoader(images, torch.zeros(4, dtype=torch.long), cfg, info, True, torch.device("cpu"), 0.875)
    test = D.TensorLoader(images, torch.zeros(4, dtype=torch.long), cfg, info, False, torch.device("cpu"), 0.875)
    assert next(train.batches())[0].shape == (4, 3, 224, 224)
    assert next(test.batches())[0].shape == (4, 3, 224, 224)


def test_train_subset_is_fixed_across_runs():
    a = D.train_subset_indices(1000, 100)
    assert torch.equal(a, D.train_subset_indices(1000, 100)) and len(a.unique()) == 100
    assert len(D.train_subset_indices(1000, 0)) == 1000


def test_per_image_path_gives_the_same_eval_tensors_as_the_fast_path(fmnist_available):
    cfg = DataConfig(eval_subset=20, eval_batch_size=10, workers=0, train_subset=64, batch_size=16)
    fast_train, fast_test, info = D.build_loaders(cfg, torch.device("cpu"), 1.0)
    slow_train, slow_test, _ = D.build_loaders(DataConfig(**{**cfg.__dict__, "in_memory": "no"}),
                                               torch.device("cpu"), 1.0)
    assert isinstance(slow_test, D.ImageLoader) and isinstance(fast_test, D.TensorLoader)
    for (xa, ya), (xb, yb) in zip(fast_test.batches(), slow_test.batches()):
        assert torch.equal(ya, yb)
        assert torch.allclose(xa, xb, atol=1e-5)
    xa, ya = next(fast_train.batches(seed=3, epoch=1))
    xb, yb = next(slow_train.batches(seed=3, epoch=1))
    assert torch.equal(ya, yb) and xa.shape == xb.shape == (16, 1, 32, 32)
