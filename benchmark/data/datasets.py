"""The datasets by name: each is one ``Dataset`` entry of ``DATASETS`` holding its facts (classes, sizes,
mean/std), how it is read (the whole split as uint8 tensors, and/or a per-image torch dataset) and the check made
before a run directory exists (files present and undamaged, enough training images). The loaders and the
pre-run checks ask the entry; nothing else branches on a dataset's name."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from hkdbench.benchmark.core.config import ConfigError, DataConfig
from hkdbench.benchmark.core.errors import HkdbenchError


class DataNotFoundError(HkdbenchError, FileNotFoundError):
    pass


class DataCorruptError(HkdbenchError, ValueError):
    """A data file exists but cannot be read as what it claims to be (truncated, wrong size)."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_chans: int
    native_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    in_memory: bool  # small enough for the whole-set tensor fast path


Tensors = Tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, C, H, W), int64 labels (N,)


@dataclass(frozen=True)
class Dataset:
    """One dataset. ``check(cfg)`` fails before anything is written when the data is missing or damaged;
    ``read_tensors(cfg, train)`` gives a whole split (needed when ``info.in_memory``);
    ``image_dataset(cfg, train, transform)`` gives a torch dataset of (transformed image, label) for the
    per-image path, with its labels in ``targets`` as torchvision's datasets have them (CRD reads them without
    decoding images); without one, that path serves ``read_tensors``' images one by one. ``train_size(cfg)``:
    how many images the training split at ``cfg``'s root holds, known without reading them (a plan counts steps
    with it); without one, the split is read (or listed) to count them. ``test_size(cfg)``: the same for the test
    split."""
    info: DatasetInfo
    check: Callable[[DataConfig], None]
    read_tensors: Optional[Callable[[DataConfig, bool], Tensors]] = None
    image_dataset: Optional[Callable[[DataConfig, bool, Callable], torch.utils.data.Dataset]] = None
    train_size: Optional[Callable[[DataConfig], int]] = None
    test_size: Optional[Callable[[DataConfig], int]] = None

    def __post_init__(self):
        if self.read_tensors is None and self.image_dataset is None:
            raise ValueError(f"dataset {self.info.name!r} needs read_tensors or image_dataset (or both)")
        if self.info.in_memory and self.read_tensors is None:
            raise ValueError(f"dataset {self.info.name!r} has in_memory=True but no read_tensors to read it whole")


DATASETS: Dict[str, Dataset] = {}  # filled by the register_dataset calls at the end of this module


def register_dataset(entry: Dataset) -> Dataset:
    """Makes ``entry`` known under its ``info.name``; a name already taken by another entry is refused."""
    name = entry.info.name
    if name in DATASETS and DATASETS[name] is not entry:
        raise ValueError(f"dataset name {name!r} is already registered; pick another name")
    DATASETS[name] = entry
    return entry


def unregister_dataset(name: str) -> None:
    """Removes a dataset (for tests that register temporary ones)."""
    DATASETS.pop(name, None)


def dataset(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}") from None


def dataset_info(name: str) -> DatasetInfo:
    return dataset(name).info


def load_tensors(cfg: DataConfig, train: bool) -> Tensors:
    """The whole split as (uint8 images (N, C, H, W), int64 labels (N,))."""
    read = dataset(cfg.dataset).read_tensors
    if read is None:
        raise ValueError(f"{cfg.dataset} has no in-memory loader")
    return read(cfg, train)


def check_data_available(cfg: DataConfig) -> None:
    """Fails at once, before any model is built, when the data is not where the config says, a subset asks
    for more images than its split holds, or the validation split leaves a class or the validation set empty."""
    dataset(cfg.dataset).check(cfg)
    _check_subsets(cfg)
    if cfg.val_split:
        _check_val_split(cfg)


def _check_subsets(cfg: DataConfig) -> None:
    """A subset larger than its split would train (or evaluate) on the whole split under another run hash: a
    duplicate of the run without the subset. Counted only when a subset is set (ImageNet lists its files)."""
    for key, train, split in (("train_subset", True, "training"), ("eval_subset", False, "test")):
        asked = getattr(cfg, key)
        if asked and asked > (n := split_size(cfg, train)):
            raise ConfigError(f"data.{key}={asked} is more than the {n} images of {cfg.dataset}'s {split} split; "
                              f"give at most {n}, or 0 for the whole split")


def split_size(cfg: DataConfig, train: bool) -> int:
    """How many images a split at ``cfg``'s root holds (before ``data.train_subset`` / ``data.eval_subset``)."""
    entry = dataset(cfg.dataset)
    known = entry.train_size if train else entry.test_size
    if known is not None:
        return known(cfg)
    if entry.image_dataset is not None:  # lists the files (as the loader would), decodes none
        return len(entry.image_dataset(cfg, train, None))
    return len(entry.read_tensors(cfg, train)[1])


def training_split_size(cfg: DataConfig) -> int:
    """How many images the training split at ``cfg``'s root holds (before ``data.train_subset``)."""
    return split_size(cfg, train=True)


def training_images(cfg: DataConfig) -> int:
    """How many images a run with these data settings trains on: the training split, less what
    ``data.train_subset`` leaves out and ``data.val_split`` holds out (which reads the labels)."""
    if cfg.val_split:
        return len(train_val_indices(cfg)[0])
    return subset_size(training_split_size(cfg), cfg.train_subset)


def subset_size(n: int, subset: int) -> int:
    """How many of ``n`` items :func:`train_subset_indices` keeps."""
    return n if subset <= 0 or subset >= n else subset


def _check_training_set_size(cfg: DataConfig, n: int) -> None:
    kept = training_images(cfg) if cfg.val_split else subset_size(n, cfg.train_subset)
    if kept < cfg.batch_size:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is larger than the training set ({kept} images"
                          f"{' kept by data.train_subset' if cfg.train_subset else ''}"
                          f"{' less data.val_split' if cfg.val_split else ''}); lower data.batch_size"
                          " or raise data.train_subset")


def train_subset_indices(n: int, subset: int) -> torch.Tensor:
    """The first ``subset`` items of a fixed permutation: every run of a sweep sees the same subset."""
    if subset <= 0 or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(12345))[:subset].sort().values


# The held-out images are drawn with a fixed seed, not the run's: every seed, method and teacher run of a dataset
# holds out the same images, so a teacher run with the same data.val_split never trains on a student's validation
# images and seeds differ only in training randomness (as data.train_subset's fixed permutation).
VAL_SPLIT_SEED = 271828


def held_out_mask(labels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Which images of the whole training split (their ``labels``) are held out for validation: in each class, the
    round(fraction x its size) images with the smallest fixed random keys, at most all but one. Over the whole split
    it is stratified by class; a run on ``data.train_subset`` validates on the held-out images of its subset, so
    the held-out set of any subset lies inside the whole split's (nested)."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    keys = torch.rand(len(labels), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED), dtype=torch.float64)
    by_key = keys.argsort()
    order = by_key[labels[by_key].argsort(stable=True)]  # by class, then by key within a class
    counts = torch.bincount(labels)
    quota = torch.minimum(torch.floor(counts.double() * fraction + 0.5).long(), counts - 1)
    class_start = counts.cumsum(0) - counts
    sorted_labels = labels[order]
    rank_in_class = torch.arange(len(labels)) - class_start[sorted_labels]
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[order] = rank_in_class < quota[sorted_labels]
    return mask


def training_labels(cfg: DataConfig) -> torch.Tensor:
    """The label of every image of the training split at ``cfg``'s root (before any subset), in index order."""
    entry = dataset(cfg.dataset)
    if entry.read_tensors is not None:
        return entry.read_tensors(cfg, True)[1]
    return torch.as_tensor(entry.image_dataset(cfg, True, None).targets)  # listed, not decoded


def train_val_indices(cfg: DataConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the indices of the training split a run trains on, those it validates on): the ``data.train_subset`` pool
    less its held-out images, and those (empty without ``data.val_split``); sorted."""
    labels = training_labels(cfg) if cfg.val_split else None
    n = len(labels) if labels is not None else training_split_size(cfg)
    pool = train_subset_indices(n, cfg.train_subset)
    if not cfg.val_split:
        return pool, pool[:0]
    held = held_out_mask(labels, cfg.val_split)[pool]
    return pool[~held], pool[held]


def _check_val_split(cfg: DataConfig) -> None:
    """The validation split holds some images and leaves every class of the training pool some training images."""
    train, val = train_val_indices(cfg)
    pool = f"the {len(train) + len(val)} training images{' kept by data.train_subset' if cfg.train_subset else ''}"
    if len(val) == 0:
        raise ConfigError(f"data.val_split={cfg.val_split:g} holds out none of {pool}; raise data.val_split (or "
                          "data.train_subset), or give 0 for no validation split")
    labels = training_labels(cfg)
    emptied = sorted(set(labels[val].tolist()) - set(labels[train].tolist()))
    if emptied:
        raise ConfigError(f"data.val_split={cfg.val_split:g} holds out every training image of class(es) "
                          f"{', '.join(map(str, emptied[:10]))} among {pool}; lower data.val_split or raise "
                          "data.train_subset")


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: the IDX files of Debian's dataset-fashion-mnist package or of a torchvision root
# --------------------------------------------------------------------------------------------------------------

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


_FMNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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


def _has_fashion_mnist(folder: Path) -> bool:
    return all(any((folder / f"{stem}{ext}").exists() for ext in (".gz", "")) for stems in _FMNIST_FILES.values()
               for stem in stems)


def _find_fashion_mnist(root: Optional[str]) -> Path:
    """The folder of the four IDX files: under ``data.root`` when it is given (and nowhere else: a root that
    lacks them is an error, not a reason to read another copy), else Debian's."""
    if not root:
        if _has_fashion_mnist(FASHION_MNIST_DEBIAN_DIR):
            return FASHION_MNIST_DEBIAN_DIR
        raise DataNotFoundError(
            f"Fashion-MNIST not found (looked in {FASHION_MNIST_DEBIAN_DIR}). Install it with "
            "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four IDX files from "
            "https://github.com/zalandoresearch/fashion-mnist under ROOT/FashionMNIST/raw and pass data.root=ROOT")
    path = Path(root)
    expected = (f"a folder holding the four IDX files ({', '.join(n + '[.gz]' for n in _fmnist_names())}) "
                "or holding them under FashionMNIST/raw (torchvision's layout)")
    try:
        exists = path.exists()
    except (OSError, ValueError) as err:  # a name longer than the filesystem takes, a NUL
        raise DataNotFoundError(f"data.root={root} is no path this filesystem can hold "
                                f"({getattr(err, 'strerror', None) or err}); Fashion-MNIST's data.root is {expected}"
                                ) from None
    if not exists:
        raise DataNotFoundError(f"data.root={root} does not exist; Fashion-MNIST's data.root is {expected}. "
                                "Leave data.root out to read Debian's copy")
    if not path.is_dir():
        raise DataNotFoundError(f"data.root={root} is a file, not a folder; Fashion-MNIST's data.root is {expected}")
    for folder in (path, path / "FashionMNIST" / "raw"):
        if _has_fashion_mnist(folder):
            return folder
    raise DataNotFoundError(f"data.root={root} holds no Fashion-MNIST (looked in {path} and "
                            f"{path / 'FashionMNIST' / 'raw'}); it must be {expected}: the files of "
                            "https://github.com/zalandoresearch/fashion-mnist")


def _fmnist_names():
    return [stem for stems in _FMNIST_FILES.values() for stem in stems]


def _read_fashion_mnist(cfg: DataConfig, train: bool) -> Tensors:
    folder = _find_fashion_mnist(cfg.root)
    arrays = []
    for stem in _FMNIST_FILES[train]:
        path = folder / f"{stem}.gz"
        arrays.append(_read_idx(path if path.exists() else folder / stem))
    images, labels = arrays
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _fashion_mnist_size(cfg: DataConfig, train: bool) -> int:
    """The image count in the header of a split's labels IDX file (its first 8 bytes)."""
    folder = _find_fashion_mnist(cfg.root)
    path = folder / f"{_FMNIST_FILES[train][1]}.gz"
    path = path if path.exists() else folder / _FMNIST_FILES[train][1]
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        header = f.read(8)
    if len(header) < 8 or header[:4] != b"\0\0\x08\x01":
        return len(_read_fashion_mnist(cfg, train)[1])  # not a labels file: the full read names what is wrong
    return int.from_bytes(header[4:8], "big")


def _check_fashion_mnist(cfg: DataConfig) -> None:
    _check_training_set_size(cfg, len(_read_fashion_mnist(cfg, train=True)[1]))
    _read_fashion_mnist(cfg, train=False)  # every file read once: a damaged one fails here


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10/100: torchvision's datasets under data.root
# --------------------------------------------------------------------------------------------------------------

def _cifar_class(torchvision_name: str):
    import torchvision

    return getattr(torchvision.datasets, torchvision_name)


def _cifar_root(cfg: DataConfig) -> str:
    if not cfg.root:
        raise DataNotFoundError(f"{cfg.dataset} needs data.root=PATH (a torchvision root; add data.download=true "
                                "to fetch it on a machine with internet access)")
    return cfg.root


def _read_cifar(torchvision_name: str, cfg: DataConfig, train: bool) -> Tensors:
    root = _cifar_root(cfg)
    try:
        ds = _cifar_class(torchvision_name)(root, train=train, download=cfg.download)
    except RuntimeError as err:
        raise DataNotFoundError(f"{cfg.dataset} not found under {root!r} ({err}); pass data.download=true on a "
                                "machine with internet access, or point data.root at a torchvision CIFAR root"
                                ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _cifar_images(torchvision_name: str, cfg: DataConfig, train: bool, transform) -> torch.utils.data.Dataset:
    return _cifar_class(torchvision_name)(cfg.root, train=train, download=cfg.download, transform=transform)


def _check_cifar(torchvision_name: str, cfg: DataConfig) -> None:
    if not cfg.download:  # a download fetches (and checks) the files itself
        _check_cifar_files(cfg.dataset, _cifar_class(torchvision_name), Path(_cifar_root(cfg)))


def _check_cifar_files(name: str, cls, root: Path) -> None:
    """Every file of torchvision's CIFAR layout is there with the MD5 torchvision knows (0.3 s for 170 MB):
    a missing or damaged batch is named now, not as an unpickling traceback in a worker."""
    folder = root / cls.base_folder
    if not folder.is_dir():
        raise DataNotFoundError(f"{name} not found: {folder} does not exist; pass data.download=true on a "
                                "machine with internet access, or point data.root at a torchvision CIFAR root")
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        path = folder / filename
        if not path.is_file():
            raise DataNotFoundError(f"{name}: {path} is missing; the folder is incomplete: download it again "
                                    "(data.download=true on a machine with internet access)")
        stat = path.stat()
        if not _md5_matches(str(path), stat.st_mtime_ns, stat.st_size, md5):
            raise DataCorruptError(f"{name}: {path} is damaged (its MD5 is not torchvision's {md5}); delete "
                                   f"{folder} and download it again (data.download=true)")


@functools.lru_cache(maxsize=16)
def _md5_matches(name: str, _mtime_ns: int, _size: int, md5: str) -> bool:
    """torchvision's MD5 check, once per file version: a student run checks its data and its teacher run's,
    often the same files."""
    from torchvision.datasets.utils import check_integrity

    return check_integrity(name, md5)


def _torchvision_cifar(info: DatasetInfo, torchvision_name: str) -> Dataset:
    """The entry of torchvision's ``torchvision_name`` dataset: read whole or per image, its files' MD5s checked."""
    return Dataset(info, check=functools.partial(_check_cifar, torchvision_name),
                   read_tensors=functools.partial(_read_cifar, torchvision_name),
                   image_dataset=functools.partial(_cifar_images, torchvision_name),
                   # both CIFARs: the files whose MD5s the check holds
                   train_size=lambda cfg: 50_000, test_size=lambda cfg: 10_000)


# --------------------------------------------------------------------------------------------------------------
# ImageNet: an ImageFolder root with train/ and val/
# --------------------------------------------------------------------------------------------------------------

def _imagenet_images(cfg: DataConfig, train: bool, transform) -> torch.utils.data.Dataset:
    import torchvision

    return torchvision.datasets.ImageFolder(os.path.join(cfg.root, "train" if train else "val"), transform)


def _check_imagenet(cfg: DataConfig) -> None:
    if not cfg.root or not (Path(cfg.root) / "train").is_dir() or not (Path(cfg.root) / "val").is_dir():
        raise DataNotFoundError(f"imagenet needs data.root=PATH with train/ and val/ ImageFolder directories, "
                                f"got {cfg.root!r}")
    _check_image_folders(Path(cfg.root), dataset_info(cfg.dataset).num_classes)


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


# --------------------------------------------------------------------------------------------------------------
# The known datasets: a new one is one entry here (and, for --recipe auto, one AUTO_RECIPES line)
# --------------------------------------------------------------------------------------------------------------

register_dataset(Dataset(DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), in_memory=True),
                         check=_check_fashion_mnist, read_tensors=_read_fashion_mnist,
                         train_size=functools.partial(_fashion_mnist_size, train=True),
                         test_size=functools.partial(_fashion_mnist_size, train=False)))
register_dataset(_torchvision_cifar(DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465),
                                               (0.2470, 0.2435, 0.2616), in_memory=True), "CIFAR10"))
register_dataset(_torchvision_cifar(DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409),
                                               (0.2673, 0.2564, 0.2762), in_memory=True), "CIFAR100"))
register_dataset(Dataset(DatasetInfo("imagenet", 1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                                     in_memory=False),
                         check=_check_imagenet, image_dataset=_imagenet_images))
