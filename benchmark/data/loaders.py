"""The two input pipelines, over the datasets registered in ``datasets.py`` (``DATASETS``), which are:

* ``fashion-mnist`` (the offline default): the four gzipped IDX files of Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``) or of a torchvision root (``ROOT/FashionMNIST/raw``).
* ``cifar10`` / ``cifar100``: torchvision datasets under a root (``data.download=true`` fetches them where the
  machine is online).
* ``imagenet``: an ImageFolder root with ``train/`` and ``val/``.

Pipelines: ``paper224`` is the papers' CIFAR-at-224 pipeline, timm 0.6.5's ``create_transform`` in its order:
RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, ``data.train_interpolation``: bilinear, bicubic, or ``random``
= either per image) -> horizontal flip -> RandAugment when ``data.auto_augment`` is set, else colour jitter (timm
applies no colour jitter under an auto-augment policy) -> normalise -> random erasing (under mixup/cutmix in the
train step after mixing, ``MixThenErase``, as timm train.py's prefetcher erases the mixed batch); eval: resize to
img_size / crop_pct + center crop. ``small`` keeps the native resolution (padded to ``img_size``) with random crop
+ flip for the demo and tests, then the same RandAugment-or-jitter, normalise, erasing steps.

Datasets that fit in memory take the fast path: the whole split is one uint8 tensor on the training device and
every augmentation is a batched tensor op, no per-image PIL work: crop boxes drawn as timm draws them, the resize
computed as Pillow computes it (equal to Pillow's uint8 output), RandAugment from ``data/randaugment.py`` on
the whole-number crop. None of it makes the host wait for the device (``tests/test_host_sync.py`` counts one
batch's reads): every random draw is a device op or a host draw (RandAugment's, mixup's, erasing's), and the
epoch's order goes to the device without blocking (``data/transfer.py``). ImageNet (or ``data.in_memory=no``)
goes through a DataLoader with timm's per-image transforms. Every epoch's order comes from (seed, epoch), so a run
resumed mid-epoch sees the same batches.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.data import Mixup

from hkdbench.benchmark.core.config import ConfigError, DataConfig
from hkdbench.benchmark.data.randaugment import BatchRandAugment, fill_from_mean
from hkdbench.benchmark.data.transfer import to_device
from hkdbench.benchmark.data.datasets import (DatasetInfo, check_data_available, dataset, dataset_info,
                                             load_tensors, train_subset_indices, train_val_indices, training_images)


# --------------------------------------------------------------------------------------------------------------
# Batched tensor augmentation
# --------------------------------------------------------------------------------------------------------------

def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=g)


def _rrc_params(batch: int, height: int, width: int, scale: Tuple[float, float], ratio=(3 / 4, 4 / 3),
                device=None) -> Tuple[torch.Tensor, ...]:
    """Integer crop boxes (top, left, h, w) drawn as timm's RandomResizedCropAndInterpolation.get_params draws
    them, for a batch: 10 tries of a target area (a ``scale`` fraction of the image) and a log-uniform aspect,
    rounded to whole pixels; the first box that fits, placed uniformly; else timm's central fallback crop."""
    tries = 10
    opts = {"device": device, "dtype": torch.float64}
    target = torch.empty(batch, tries, **opts).uniform_(scale[0], scale[1]) * (height * width)
    aspect = torch.empty(batch, tries, **opts).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (target * aspect).sqrt().round(), (target / aspect).sqrt().round()  # round half to even, as Python
    fits = (w <= width) & (h <= height)
    found = fits.any(1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    fallback_h, fallback_w = _central_crop_size(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h)).clamp(min=1)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w)).clamp(min=1)
    top = torch.where(found, (torch.rand(batch, **opts) * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (torch.rand(batch, **opts) * (width - w + 1)).floor(), (width - w) // 2)
    return top.long(), left.long(), h.long(), w.long()


def _central_crop_size(height: int, width: int, ratio) -> Tuple[int, int]:
    """timm's fallback box (h, w): the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def _pil_kernel(x: torch.Tensor, bicubic: torch.Tensor) -> torch.Tensor:
    """Pillow's resampling filters at distance ``x``: bilinear (triangle, support 1) or bicubic (a = -0.5,
    support 2), chosen per element by ``bicubic``."""
    ax, a = x.abs(), -0.5
    triangle = (1 - ax).clamp(min=0)
    cubic = torch.where(ax < 1, ((a + 2) * ax - (a + 3)) * ax * ax + 1,
                        torch.where(ax < 2, (((ax - 5) * ax + 8) * ax - 4) * a, torch.zeros_like(ax)))
    return torch.where(bicubic, cubic, triangle)


def _resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                      bicubic: torch.Tensor) -> torch.Tensor:
    """(B, out_size, in_size) fixed-point weights that resize the span [start, start + length) of an axis of
    ``in_size`` pixels to ``out_size``, as Pillow's ``crop(...).resize(...)`` does (Resample.c
    ``precompute_coeffs`` on the cropped image: the filter widened by the downscale factor, taps stopped at the
    crop's edges and renormalised, then ``normalize_coeffs_8bpc``). Computed on each output pixel's few taps."""
    opts = {"device": start.device, "dtype": torch.float64}
    scale = length.to(torch.float64) / out_size
    filter_scale = scale.clamp(min=1)[:, None, None]
    support = torch.where(bicubic, 2.0, 1.0).to(torch.float64)[:, None, None] * filter_scale
    center = ((torch.arange(out_size, **opts) + 0.5)[None] * scale[:, None])[..., None]  # (B, out, 1), crop coords
    first = (center - support + 0.5).floor().clamp(min=0)
    end = torch.minimum((center + support + 0.5).floor(), length[:, None, None].to(torch.float64))
    taps = 2 * math.ceil(2 * max(in_size / out_size, 1)) + 1  # enough for any span of the axis (no device sync)
    pixel = first + torch.arange(taps, **opts)  # (B, out, taps), crop coords
    weights = _pil_kernel((pixel - center + 0.5) / filter_scale, bicubic[:, None, None])
    weights = torch.where(pixel < end, weights, 0.0)
    weights = _pil_fixed_point(weights / weights.sum(-1, keepdim=True))
    index = (pixel + start[:, None, None]).clamp(max=in_size - 1).long()  # out-of-span taps carry weight 0
    return torch.zeros(len(start), out_size, in_size, **opts).scatter_add_(2, index, weights)


_PIL_PRECISION_BITS = 22  # Pillow's fixed-point weights for 8-bit images (32 - 8 - 2 bits)


def _pil_fixed_point(weights: torch.Tensor) -> torch.Tensor:
    """Weights as Pillow stores them: rounded (half away from zero) to whole multiples of 2**-22."""
    scaled = weights * (1 << _PIL_PRECISION_BITS)
    return torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc() / (1 << _PIL_PRECISION_BITS)


def _pil_round_(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8, in place: a weighted sum rounded half up and clipped to 0-255 (float64 sums of 8-bit
    values and 22-bit weights are exact, so the rounding is Pillow's)."""
    return sums.add_(0.5).floor_().clamp_(0, 255)


def _resized_crop(images: torch.Tensor, box: Tuple[torch.Tensor, ...], flip: torch.Tensor, size: int,
                  bicubic: torch.Tensor) -> torch.Tensor:
    """timm's RandomResizedCrop resize then horizontal flip, batched, exactly as Pillow computes it: each image's
    box (top, left, h, w) resized to size x size in Pillow's two passes, horizontal then vertical (Pillow before
    2026; newer releases may run the vertical pass first when the height shrinks more), each pass with Pillow's
    fixed-point weights and rounded to uint8 as Pillow stores it; flipped where ``flip``; bicubic where
    ``bicubic``, else bilinear. ``images`` are float (B, C, H, W), values 0-255; the result (float32) holds the
    whole numbers 0-255 of the uint8 image that timm's next transform receives. Float64 keeps the integer
    sums exact."""
    top, left, h, w = box
    cols = _resample_weights(left, w, images.shape[-1], size, bicubic)  # (B, size, W)
    cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    rows = _resample_weights(top, h, images.shape[-2], size, bicubic)  # (B, size, H)
    b, c, height, width = images.shape
    x = _pil_round_(torch.bmm(images.to(torch.float64).reshape(b, c * height, width), cols.transpose(1, 2)))
    x = torch.bmm(rows, x.view(b, c, height, size).transpose(1, 2).reshape(b, height, c * size))
    return _pil_round_(x).view(b, size, c, size).transpose(1, 2).to(torch.float32)


def _per_image_bicubic(batch: int, interpolation: str, device) -> torch.Tensor:
    """Which images are resized bicubic: none, all, or each with probability 1/2 ('random', timm's choice
    between bilinear and bicubic per image)."""
    if interpolation == "random":
        return torch.rand(batch, device=device) < 0.5
    return torch.full((batch,), interpolation == "bicubic", device=device)


def _pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    if h > size or w > size:
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def _random_crop_flip(images: torch.Tensor, padding: int, hflip: float) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip for the whole batch via gather indices."""
    b, c, h, w = images.shape
    if padding:
        images = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (b,), device=images.device)
        dx = torch.randint(0, 2 * padding + 1, (b,), device=images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device)[None])  # (B, H)
        cols = (dx[:, None] + torch.arange(w, device=images.device)[None])  # (B, W)
    else:
        rows = torch.arange(h, device=images.device).expand(b, h)
        cols = torch.arange(w, device=images.device).expand(b, w)
    flip = torch.rand(b, device=images.device) < hflip
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    images = images.gather(2, rows[:, None, :, None].expand(b, c, h, images.shape[3]))
    return images.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class TensorLoader:
    """Batches of one in-memory split, augmented on the device. Iterating starts at ``start_step``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, info: DatasetInfo,
                 train: bool, device: torch.device, crop_pct: float, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size  # DDP: each rank takes its slice of every global batch
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.cfg, self.info, self.train, self.device, self.crop_pct = cfg, info, train, device, crop_pct
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1) * 255
        self.rand_augment = _rand_augment(cfg, info) if train and cfg.auto_augment else None
        self.jitter = effective_color_jitter(cfg.color_jitter, cfg.auto_augment) if train else 0.0
        erases_here = train and cfg.reprob > 0 and not mixes(cfg)  # under mixup it erases after mixing
        self.erasing = _random_erasing(cfg, device) if erases_here else None

    def __len__(self) -> int:
        return _num_batches(len(self.labels), self.batch_size, self.train, self.rank, self.world_size)

    def batches(self, seed: int = 0, epoch: int = 0, start_step: int = 0, with_index: bool = False) -> Iterator[tuple]:
        """(images, labels) per step, or with ``with_index`` (images, labels, index): each sample's index in
        this split (for methods with per-sample state)."""
        n = len(self.labels)
        order = (to_device(epoch_permutation(n, seed, epoch), self.device) if self.train
                 else torch.arange(n, device=self.device))
        for step in range(start_step, len(self)):
            idx = order[_batch_slice(step, self.batch_size, self.train, self.rank, self.world_size)]
            batch = (self._transform(self.images[idx]), self.labels[idx])
            yield batch + (idx,) if with_index else batch

    def all_labels(self) -> torch.Tensor:
        """The label of every sample of the split, in index order (on the CPU)."""
        return self.labels.cpu()

    def _transform(self, images: torch.Tensor) -> torch.Tensor:
        """timm's order: crop/resize and flip, then RandAugment or else colour jitter, normalise, random erasing."""
        x = images.float()
        if self.cfg.pipeline == "paper224":
            x = self._train_crop(x) if self.train else self._eval_crop(x)
        else:  # 'small': the native image padded to img_size, random crop + flip (values stay whole numbers)
            x = _pad_to(x, self.cfg.img_size)
            if self.train:
                x = _random_crop_flip(x, self.cfg.crop_padding, self.cfg.hflip)
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        elif self.jitter > 0:
            x = _color_jitter(x, self.jitter)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        return x

    def _train_crop(self, x: torch.Tensor) -> torch.Tensor:
        cfg, b = self.cfg, x.shape[0]
        box = _rrc_params(b, x.shape[-2], x.shape[-1], tuple(cfg.rrc_scale), device=x.device)
        flip = torch.rand(b, device=x.device) < cfg.hflip
        return _resized_crop(x, box, flip, cfg.img_size, _per_image_bicubic(b, cfg.train_interpolation, x.device))

    def _eval_crop(self, x: torch.Tensor) -> torch.Tensor:
        """timm's eval transform: Pillow's resize (``data.eval_interpolation``) to img_size / crop_pct, then the
        center crop."""
        b, size = x.shape[0], self.cfg.img_size
        resize = math.floor(size / self.crop_pct)
        whole = [torch.full((b,), v, device=x.device) for v in (0, 0, x.shape[-2], x.shape[-1])]
        never = torch.zeros(b, dtype=torch.bool, device=x.device)
        bicubic = torch.full((b,), self.cfg.eval_interpolation == "bicubic", device=x.device)
        x = _resized_crop(x, whole, never, resize, bicubic=bicubic)
        top = int(round((resize - size) / 2))  # torchvision's CenterCrop
        return x[..., top:top + size, top:top + size]


def _color_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation jitter by factors in [1-s, 1+s], per image (0-255 floats)."""
    b = x.shape[0]
    factor = lambda: torch.empty(b, 1, 1, 1, device=x.device).uniform_(1 - strength, 1 + strength)  # noqa: E731
    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    if x.shape[1] == 3:
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * factor() + gray
    return x.clamp(0, 255)


def effective_color_jitter(color_jitter: float, auto_augment: Optional[str]) -> float:
    """The colour jitter a train transform applies: none under an auto-augment policy, as timm's
    transforms_imagenet_train (0.6.5: RandAugment ``elif`` colour jitter; 1.x: off unless forced)."""
    return 0.0 if auto_augment else color_jitter


def color_jitter_note(color_jitter: float, auto_augment: Optional[str]) -> str:
    """A line saying that a recipe's colour jitter is not applied, or '' when it is (or is 0)."""
    if color_jitter and not effective_color_jitter(color_jitter, auto_augment):
        return (f"color_jitter {color_jitter:g} is not applied: timm turns colour jitter off under the "
                f"auto-augment policy {auto_augment!r}")
    return ""


def _rand_augment(cfg: DataConfig, info: DatasetInfo) -> BatchRandAugment:
    """timm's RandAugment for the policy string, batched on the device, filling with the dataset mean colour."""
    return BatchRandAugment(cfg.auto_augment, fill=fill_from_mean(info.mean), interpolation=cfg.train_interpolation)


ERASING_MODE = "pixel"  # OFA-KD's / PAT's train.py --remode default: erase with per-pixel normal noise


def _random_erasing(cfg: DataConfig, device):
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=cfg.reprob, mode=ERASING_MODE, device=str(device))


def mixes(cfg: DataConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float):
    """timm's batch Mixup/CutMix (soft targets) followed by the recipe's random erasing (``MixThenErase``), or
    None when the recipe has neither mixup nor cutmix."""
    if not mixes(cfg):
        return None
    return MixThenErase(cfg, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=label_smoothing,
                        num_classes=num_classes, mode="batch")


class MixThenErase(Mixup):
    """timm's Mixup, then random erasing of the mixed batch: timm train.py's order with its default prefetcher
    (FastCollateMixup mixes in the loader's collate, the prefetcher then normalises and erases), so an erased
    patch is pure noise, never blended into another image. The loaders leave erasing to this step when the
    recipe mixes."""

    def __init__(self, cfg: DataConfig, **mixup_args):
        super().__init__(**mixup_args)
        self.data_cfg, self.erasing = cfg, None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        images, soft = super().__call__(images, labels)
        if self.data_cfg.reprob > 0:
            if self.erasing is None:
                self.erasing = _random_erasing(self.data_cfg, images.device)
            images = self.erasing(images)
        return images, soft


# --------------------------------------------------------------------------------------------------------------
# Per-image path (ImageNet, or data.in_memory=no)
# --------------------------------------------------------------------------------------------------------------

class ImageLoader:
    """A DataLoader over a torchvision dataset with timm transforms; same interface as TensorLoader."""

    def __init__(self, dataset, cfg: DataConfig, train: bool, device: torch.device, rank: int = 0,
                 world_size: int = 1):
        self.dataset, self.cfg, self.train, self.device = dataset, cfg, train, device
        self.rank, self.world_size = rank, world_size
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size

    def __len__(self) -> int:
        return _num_batches(len(self.dataset), self.batch_size, self.train, self.rank, self.world_size)

    def batches(self, seed: int = 0, epoch: int = 0, start_step: int = 0, with_index: bool = False):
        """As ``TensorLoader.batches``; the index of a batch is its slice of the sampler's order."""
        n = len(self.dataset)
        order = epoch_permutation(n, seed, epoch) if self.train else torch.arange(n)
        order = torch.cat([order[_batch_slice(s, self.batch_size, self.train, self.rank, self.world_size)]
                           for s in range(start_step, len(self))] or [order[:0]])
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=order.tolist(), num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda", drop_last=self.train, persistent_workers=False)
        for i, (images, labels) in enumerate(loader):
            batch = (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            if with_index:
                batch += (to_device(order[i * self.batch_size:(i + 1) * self.batch_size], self.device),)
            yield batch

    def all_labels(self) -> torch.Tensor:
        """The label of every sample of the dataset, in index order, read without decoding images."""
        dataset, keep = self.dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            dataset, keep = dataset.dataset, torch.as_tensor(dataset.indices)
        labels = getattr(dataset, "labels", None)  # _TensorImageDataset
        labels = torch.as_tensor(dataset.targets) if labels is None else labels  # torchvision's sets
        return labels if keep is None else labels[keep]


def _image_transform(cfg: DataConfig, info: DatasetInfo, train: bool, crop_pct: float):
    """Per-image transforms: timm's for the 224 pipeline; for the small one pad + random crop + flip, then timm's
    RandAugment or else colour jitter, normalise, random erasing (the order of the in-memory path)."""
    from torchvision import transforms as T

    if cfg.pipeline == "paper224":
        from timm.data import create_transform

        # timm itself turns colour jitter off under auto_augment, and hands a train interpolation other than
        # 'random' to RandAugment's geometric ops too; random erasing as train.py's defaults (--remode pixel,
        # --recount 1), not create_transform's ('const')
        transform = create_transform(
            cfg.img_size, is_training=train, scale=tuple(cfg.rrc_scale), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment,
            re_prob=0.0 if mixes(cfg) else cfg.reprob,  # under mixup it erases after mixing (MixThenErase)
            re_mode=ERASING_MODE, re_count=1,
            interpolation=cfg.train_interpolation if train else cfg.eval_interpolation,
            mean=info.mean, std=info.std, crop_pct=crop_pct)
        return with_zero_bit_posterize(transform)
    if not train:
        pad = T.Lambda(lambda x: _pad_to(x.unsqueeze(0), cfg.img_size).squeeze(0))
        return T.Compose([T.ToTensor(), pad, T.Normalize(info.mean, info.std)])
    return with_zero_bit_posterize(T.Compose(_small_train_steps(cfg, info)))


def _small_train_steps(cfg: DataConfig, info: DatasetInfo) -> list:
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from timm.data.transforms import str_to_pil_interp
    from torchvision import transforms as T

    steps = [T.Lambda(lambda image: _pad_image_to(image, cfg.img_size)),
             T.RandomCrop(cfg.img_size, padding=cfg.crop_padding), T.RandomHorizontalFlip(cfg.hflip)]
    jitter = effective_color_jitter(cfg.color_jitter, cfg.auto_augment)
    if cfg.auto_augment:  # the hparams timm's create_transform gives RandAugment
        hparams = {"translate_const": int(cfg.img_size * 0.45), "img_mean": fill_from_mean(info.mean)}
        if cfg.train_interpolation != "random":
            hparams["interpolation"] = str_to_pil_interp(cfg.train_interpolation)
        steps.append(rand_augment_transform(cfg.auto_augment, hparams))
    elif jitter > 0:
        steps.append(T.ColorJitter(jitter, jitter, jitter))
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if cfg.reprob > 0 and not mixes(cfg):  # under mixup it erases after mixing (MixThenErase)
        steps.append(RandomErasing(probability=cfg.reprob, mode=ERASING_MODE, device="cpu"))
    return steps


def _pad_image_to(image, size: int):
    """A PIL image zero-padded to size x size, centred as ``_pad_to`` (larger ones resized down)."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    if image.width > size or image.height > size:
        return image.resize((size, size), Image.BILINEAR)
    return TF.center_crop(image, [size, size])


def posterize_keeping_zero_bits(img, bits_to_keep, **_):
    """timm's posterize op as it ran under the Pillow of timm 0.6.5's day: keeping 0 bits masks every value to 0
    (a black image). timm's ``inc`` policies ask for 0 bits at magnitude 10; current Pillow refuses that."""
    from timm.data.auto_augment import posterize

    if bits_to_keep < 1:
        return img.point([0] * 256 * len(img.getbands()))
    return posterize(img, bits_to_keep)


def with_zero_bit_posterize(transform):
    """``transform`` (a timm Compose) with every RandAugment posterize op running
    ``posterize_keeping_zero_bits``: a change to these op objects only, not to timm's module."""
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", ()):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_keeping_zero_bits
    return transform


def _image_dataset(cfg: DataConfig, info: DatasetInfo, train: bool, crop_pct: float,
                   training_split: Optional[bool] = None):
    """The dataset entry's per-image dataset, or else its whole-split tensors served one image at a time; with
    ``train``'s transforms, over the training split when ``training_split`` (default: ``train``)."""
    transform = _image_transform(cfg, info, train, crop_pct)
    split = train if training_split is None else training_split
    entry = dataset(cfg.dataset)
    if entry.image_dataset is not None:
        return entry.image_dataset(cfg, split, transform)
    images, labels = entry.read_tensors(cfg, split)
    return _TensorImageDataset(images, labels, transform)


class _TensorImageDataset(torch.utils.data.Dataset):
    """uint8 (N, C, H, W) images served as PIL images (grayscale or RGB) to per-image transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        image = self.images[i]
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        return self.transform(Image.fromarray(array)), int(self.labels[i])


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

def _num_batches(n: int, batch: int, train: bool, rank: int, world: int) -> int:
    """Steps per epoch (train: whole global batches of batch x world) or this rank's eval batches (rank-strided
    batches of the test set: rank r evaluates batches r, r + world, ...)."""
    if train:
        return n // (batch * world)
    total = math.ceil(n / batch)
    return len(range(rank, total, world))


def train_steps_per_epoch(cfg: DataConfig, world_size: int = 1) -> int:
    """The training steps of one epoch for these data settings, as the training loader will have them, counted
    without loading the data."""
    return _num_batches(training_images(cfg), cfg.batch_size, True, 0, world_size)


def _batch_slice(step: int, batch: int, train: bool, rank: int, world: int) -> slice:
    """The items of this rank's ``step``-th batch in the epoch's order (world 1: ``[step*B:(step+1)*B]``)."""
    if train:
        start = step * batch * world + rank * batch
    else:
        start = (rank + step * world) * batch
    return slice(start, start + batch)


def in_memory_path(cfg: DataConfig) -> bool:
    """Whether the run's data is read whole (the batched on-device pipeline) rather than image by image."""
    info = dataset_info(cfg.dataset)
    use_memory = info.in_memory if cfg.in_memory == "auto" else cfg.in_memory == "yes"
    if use_memory and not info.in_memory:
        raise ConfigError(f"data.in_memory=yes is not available for {cfg.dataset}; use auto or no")
    return use_memory


def build_loaders(cfg: DataConfig, device: torch.device, crop_pct: float, rank: int = 0, world_size: int = 1):
    """(train loader, eval loader, DatasetInfo) for a data config; with ``world_size > 1`` each loader yields
    rank ``rank``'s share (see engine/distributed.py)."""
    trains, test, info = build_rank_loaders(cfg, device, crop_pct, [rank], world_size, rank, world_size)
    return trains[0], test, info


def build_rank_loaders(cfg: DataConfig, device: torch.device, crop_pct: float, ranks: Sequence[int], world: int,
                       process: int = 0, processes: int = 1):
    """([a train loader for each of ``ranks``], eval loader, DatasetInfo): the training slices of ranks ``ranks``
    of ``world`` (train.world; a process emulating several ranks takes several), over one copy of the data; the
    evaluation shard of process ``process`` of ``processes`` (the test set is split over processes, not ranks)."""
    if cfg.eval_interpolation == "model":
        raise ValueError("data.eval_interpolation=model is resolved to the student's default when a run's config is "
                         "built (recipes.resolve_run_config); pass 'bilinear' or 'bicubic' to build_loaders")
    info = dataset_info(cfg.dataset)
    check_data_available(cfg)
    eval_shard = {"rank": process, "world_size": processes}
    if in_memory_path(cfg):
        train_x, train_y = load_tensors(cfg, train=True)
        keep = _training_indices(cfg, len(train_y))
        train_x, train_y = train_x[keep].to(device), train_y[keep].to(device)  # one copy for every rank's loader
        test_x, test_y = load_tensors(cfg, train=False)
        if cfg.eval_subset:
            test_x, test_y = test_x[:cfg.eval_subset], test_y[:cfg.eval_subset]
        trains = [TensorLoader(train_x, train_y, cfg, info, True, device, crop_pct, rank=r, world_size=world)
                  for r in ranks]
        test = TensorLoader(test_x, test_y, cfg, info, False, device, crop_pct, **eval_shard)
    else:
        train_ds = _image_dataset(cfg, info, True, crop_pct)
        if cfg.train_subset or cfg.val_split:
            train_ds = torch.utils.data.Subset(train_ds, _training_indices(cfg, len(train_ds)).tolist())
        trains = [ImageLoader(train_ds, cfg, True, device, rank=r, world_size=world) for r in ranks]
        test_ds = _image_dataset(cfg, info, False, crop_pct)
        if cfg.eval_subset:
            test_ds = torch.utils.data.Subset(test_ds, range(min(cfg.eval_subset, len(test_ds))))
        test = ImageLoader(test_ds, cfg, False, device, **eval_shard)
    if len(trains[0]) == 0:
        raise ConfigError(f"the training set has fewer images than one global batch ({cfg.batch_size} x {world} "
                          f"rank(s)); lower data.batch_size or raise data.train_subset")
    return trains, test, info


def _training_indices(cfg: DataConfig, n: int) -> torch.Tensor:
    """The images of the ``n`` of the training split that a run trains on (data.train_subset, less data.val_split)."""
    return train_val_indices(cfg)[0] if cfg.val_split else train_subset_indices(n, cfg.train_subset)


def build_val_loader(cfg: DataConfig, device: torch.device, crop_pct: float, process: int = 0, processes: int = 1):
    """The evaluation loader of the images ``data.val_split`` holds out of the training split (evaluation transforms,
    sharded over processes as the test set), or None without a validation split."""
    if not cfg.val_split:
        return None
    info = dataset_info(cfg.dataset)
    held_out = train_val_indices(cfg)[1]
    eval_shard = {"rank": process, "world_size": processes}
    if in_memory_path(cfg):
        images, labels = load_tensors(cfg, train=True)
        return TensorLoader(images[held_out], labels[held_out], cfg, info, False, device, crop_pct, **eval_shard)
    images = _image_dataset(cfg, info, False, crop_pct, training_split=True)
    return ImageLoader(torch.utils.data.Subset(images, held_out.tolist()), cfg, False, device, **eval_shard)
