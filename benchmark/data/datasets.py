"""The datasets by name (sizes, classes, mean/std, where they are found), reading them into uint8 tensors, and
the checks made before a run directory exists (files present and undamaged, enough training images)."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from hkdbench.benchmark.config import DataConfig


class DataNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_chans: int
    native_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    in_memory: bool  # small enough for the whole-set tensor fast path


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), True),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


_FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


class DataCorruptError(ValueError):
    """A data file exists but cannot be read as what it claims to be (truncated, wrong size)."""


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a read-only array; a damaged file raises DataCorruptError naming it.
    Decoded once per file version: the pre-write checks and the loaders of a run (and its teacher's) read the
    same files, and decompressing them is most of the set-up time."""
    stat = path.stat()
    return _decode_idx(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _decode_idx(name: str, _mtime_ns: int, _size: int) -> np.ndarray:
    path = Path(name)
    fix = "re-download or reinstall it (apt-get install --reinstall dataset-fashion-mnist, or the files of " \
          "https://github.com/zalandoresearch/fashion-mnist)"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as err:  # truncated or not gzip at all
        raise DataCorruptError(f"{path} is damaged ({type(err).__name__}: {err or 'truncated'}); {fix}") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataCorruptError(f"{path} is not an IDX file of bytes (bad header); {fix}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise DataCorruptError(f"{path} has {len(raw)} bytes but its header {dims} says {expected}; {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_fashion_mnist(root: Optional[str]) -> Path:
    candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root else []
    candidates += [FASHION_MNIST_DEBIAN_DIR]
    for folder in candidates:
        if all(any((folder / f"{stem}{ext}").exists() for ext in (".gz", "")) for stem in _FMNIST_FILES[True]):
            return folder
    tried = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"Fashion-MNIST not found (looked in {tried}). Install it with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist under ROOT/FashionMNIST/raw and pass data.root=ROOT")


def _load_fashion_mnist(root: Optional[str], train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    folder = _find_fashion_mnist(root)
    arrays = []
    for stem in _FMNIST_FILES[train]:
        path = folder / f"{stem}.gz"
        arrays.append(_read_idx(path if path.exists() else folder / stem))
    images, labels = arrays
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_cifar(name: str, root: Optional[str], train: bool, download: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    if not root:
        raise DataNotFoundError(f"{name} needs data.root=PATH (a torchvision root; add data.download=true to "
                                "fetch it on a machine with internet access)")
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(root, train=train, download=download)
    except RuntimeError as err:
        raise DataNotFoundError(f"{name} not found under {root!r} ({err}); pass data.download=true on a machine "
                                "with internet access, or point data.root at a torchvision CIFAR root") from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def load_tensors(cfg: DataConfig, train: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 images (N, C, H, W), int64 labels (N,))."""
    if cfg.dataset == "fashion-mnist":
        return _load_fashion_mnist(cfg.root, train)
    if cfg.dataset in ("cifar10", "cifar100"):
        return _load_cifar(cfg.dataset, cfg.root, train, cfg.download)
    raise ValueError(f"{cfg.dataset} has no in-memory loader")


def check_data_available(cfg: DataConfig) -> None:
    """Fails at once, before any model is built, when the data is not where the config says."""
    dataset_info(cfg.dataset)
    if cfg.dataset == "fashion-mnist":
        _check_training_set_size(cfg, len(_load_fashion_mnist(cfg.root, train=True)[1]))
        _load_fashion_mnist(cfg.root, train=False)  # every file read once: a damaged one fails here
    elif cfg.dataset == "imagenet":
        if not cfg.root or not (Path(cfg.root) / "train").is_dir() or not (Path(cfg.root) / "val").is_dir():
            raise DataNotFoundError(f"imagenet needs data.root=PATH with train/ and val/ ImageFolder directories, "
                                    f"got {cfg.root!r}")
        _check_image_folders(Path(cfg.root), DATASETS["imagenet"].num_classes)
    elif not cfg.download:
        if not cfg.root:
            raise DataNotFoundError(f"{cfg.dataset} needs data.root=PATH (a torchvision root; add "
                                    "data.download=true to fetch it on a machine with internet access)")
        _check_cifar_files(cfg.dataset, Path(cfg.root))


def _check_cifar_files(name: str, root: Path) -> None:
    """Every file of torchvision's CIFAR layout is there with the MD5 torchvision knows (0.3 s for 170 MB):
    a missing or damaged batch is named now, not as an unpickling traceback in a worker."""
    import torchvision
    from torchvision.datasets.utils import check_integrity

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataNotFoundError(f"{name} not found: {folder} does not exist; pass data.download=true on a "
                                "machine with internet access, or point data.root at a torchvision CIFAR root")
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = folder / filename
        if not path.is_file():
            raise DataNotFoundError(f"{name}: {path} is missing; the folder is incomplete: download it again "
                                    "(data.download=true on a machine with internet access)")
        if not check_integrity(str(path), md5):
            raise DataCorruptError(f"{name}: {path} is damaged (its MD5 is not torchvision's {md5}); delete "
                                   f"{folder} and download it again (data.download=true)")


def _is_empty(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


def _check_image_folders(root: Path, num_classes: int) -> None:
    """train/ and val/ hold the same ``num_classes`` class folders, none of them empty: ImageFolder numbers the
    classes by sorted folder name, so a missing or extra folder would shift every label after it."""
    classes = {}
    for split in ("train", "val"):
        with os.scandir(root / split) as entries:
            classes[split] = sorted(entry.name for entry in entries if entry.is_dir())
        if len(classes[split]) != num_classes:
            raise DataCorruptError(f"{root / split} has {len(classes[split])} class folders; imagenet needs "
                                   f"{num_classes} (one per class, as ImageFolder reads them)")
        empty = [name for name in classes[split] if _is_empty(root / split / name)]
        if empty:
            raise DataCorruptError(f"{root / split}: class folder(s) {', '.join(empty[:5])} are empty")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise DataCorruptError(f"{root}/train and {root}/val name different classes (e.g. {', '.join(only[:5])}); "
                               "the labels would not match")


def _check_training_set_size(cfg: DataConfig, n: int) -> None:
    kept = len(train_subset_indices(n, cfg.train_subset))
    if kept < cfg.batch_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is larger than the training set ({kept} images"
                         f"{' kept by data.train_subset' if cfg.train_subset else ''}); lower data.batch_size"
                         " or raise data.train_subset")


def train_subset_indices(n: int, subset: int) -> torch.Tensor:
    """The first ``subset`` items of a fixed permutation: every run of a sweep sees the same subset."""
    if subset <= 0 or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(12345))[:subset].sort().values
