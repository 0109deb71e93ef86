"""Images per second of the training augmentation, three ways, on Fashion-MNIST images with the cifar-vit recipe's
data settings (RandomResizedCrop to --img-size, flip, rand-m9-mstd0.5-inc1, random erasing 0.25):

* ``batched``: the in-memory path now (benchmark/data/loaders.py TensorLoader: timm's crop and RandAugment batched
  on the device);
* ``main``: the in-memory path before issue 9, rebuilt here: torchvision's RandAugment(2, 9) per image on the
  uint8 28 px tensor, then a batched fractional crop + bilinear grid_sample resize, colour jitter 0.4, normalise,
  random erasing;
* ``timm``: timm's per-image loader (create_transform in DataLoader workers, as data.in_memory=no), batches moved
  to the device;
* ``batched-without-randaugment``: ``batched`` less RandAugment (crop, flip, normalise, erasing), to show where
  the time goes.

The contenders take turns within each repeat (the machine is noisy), and the report gives each one's median
images/s and the median over repeats of batched's ratio to each other contender. Run from the repository root:

    .venv/bin/python scripts/bench_augment.py --repeats 5 --batches 4 [--device cuda] [--workers 4]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from hkdbench.benchmark.data import datasets

from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.core.config import DataConfig, build_dataclass
from hkdbench.benchmark.engine.seeding import seed_everything
from hkdbench.benchmark.recipes.resolve import RECIPES


def _config(args) -> DataConfig:
    # mixup (and, after it, random erasing) runs in the train step; without it every contender erases itself
    body = {**RECIPES["cifar-vit"]["data"], "dataset": "fashion-mnist", "img_size": args.img_size,
            "batch_size": args.batch_size, "workers": args.workers, "mixup": 0.0, "cutmix": 0.0}
    return build_dataclass(DataConfig, body, "data")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the in-memory path before issue 9 (main at 7e0c1b1)

def _main_boxes(batch: int, scale, device) -> torch.Tensor:
    """Fractional (cx, cy, w, h) crop boxes: 10 tries of area x log-uniform aspect, else the whole image."""
    area = torch.empty(batch, 10, device=device).uniform_(*scale)
    aspect = torch.empty(batch, 10, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
    w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1, device=device))
    idx = first.clamp(min=0).unsqueeze(1)
    w = torch.where(first >= 0, w.gather(1, idx).squeeze(1), torch.ones(batch, device=device))
    h = torch.where(first >= 0, h.gather(1, idx).squeeze(1), torch.ones(batch, device=device))
    cx = torch.rand(batch, device=device) * (1 - w) + w / 2
    cy = torch.rand(batch, device=device) * (1 - h) + h / 2
    return torch.stack([cx, cy, w, h], 1)


def _main_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(1)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = w * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = cx * 2 - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy * 2 - 1
    grid = F.affine_grid(theta, (images.shape[0], images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _main_jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    factor = lambda: torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(1 - strength, 1 + strength)  # noqa
    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * factor() + mean).clamp(0, 255)


def main_transform(cfg: DataConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    from timm.data.random_erasing import RandomErasing
    from torchvision.transforms import v2

    rand_augment = v2.RandAugment(num_ops=2, magnitude=9)
    erasing = RandomErasing(probability=cfg.reprob, mode="pixel", device=str(device))
    mean = torch.tensor(datasets.dataset_info(cfg.dataset).mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(datasets.dataset_info(cfg.dataset).std, device=device).view(1, -1, 1, 1) * 255

    def transform(images: torch.Tensor) -> torch.Tensor:
        x = torch.stack([rand_augment(img) for img in images]).float()
        boxes = _main_boxes(x.shape[0], tuple(cfg.rrc_scale), device)
        x = _main_crop(x, boxes, torch.rand(x.shape[0], device=device) < cfg.hflip, cfg.img_size)
        return erasing((_main_jitter(x, cfg.color_jitter) - mean) / std)

    return transform


# ---------------------------------------------------------------- the contenders

def tensor_turns(cfg: DataConfig, images: torch.Tensor, device: torch.device, transform) -> Callable[[int], int]:
    """A turn of ``count`` batches of ``transform`` over the device-resident images; returns the images done."""
    images = images.to(device)
    starts = itertools.cycle(range(0, len(images) - cfg.batch_size + 1, cfg.batch_size))

    def turn(count: int) -> int:
        for _ in range(count):
            start = next(starts)
            transform(images[start:start + cfg.batch_size])
        return count * cfg.batch_size

    return turn


def timm_turns(cfg: DataConfig, device: torch.device) -> Callable[[int], int]:
    """A turn of timm's per-image loader: persistent workers, a sampler of exactly ``count`` batches per turn (no
    work left over to run during the other contenders' turns), the batches moved to the device."""
    per_image = DataConfig(**{**cfg.__dict__, "in_memory": "no"})
    dataset = loaders._image_dataset(per_image, datasets.dataset_info(cfg.dataset), True, 1.0)
    sampler = _TurnSampler(len(dataset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                                         pin_memory=device.type == "cuda")

    def turn(count: int) -> int:
        sampler.length = count * cfg.batch_size
        return sum(images.to(device, non_blocking=True).shape[0] for images, _ in loader)

    return turn


class _TurnSampler(torch.utils.data.Sampler):
    def __init__(self, n: int):
        self.n, self.length = n, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return iter(torch.randperm(self.n)[:self.length].tolist())


def measure(turn: Callable[[int], int], count: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    images = turn(count)
    _synchronize(device)
    return images / (time.perf_counter() - start)


def run(args) -> Dict[str, object]:
    device = torch.device(args.device)
    cfg = _config(args)
    seed_everything(0)
    images, _ = datasets.load_tensors(cfg, train=True)
    images = images[:args.images]
    info, labels = datasets.dataset_info(cfg.dataset), torch.zeros(cfg.batch_size, dtype=torch.long)
    loader = loaders.TensorLoader(images[:cfg.batch_size], labels, cfg, info, True, device, 1.0)
    plain_cfg = DataConfig(**{**cfg.__dict__, "auto_augment": None})
    no_rand_augment = loaders.TensorLoader(images[:cfg.batch_size], labels, plain_cfg, info, True, device, 1.0)
    contenders = {"batched": tensor_turns(cfg, images, device, loader._transform),
                  "main": tensor_turns(cfg, images, device, main_transform(cfg, device)),
                  "timm": timm_turns(cfg, device),
                  "batched-without-randaugment": tensor_turns(cfg, images, device, no_rand_augment._transform)}
    for turn in contenders.values():  # warm-up: workers started, kernels compiled
        turn(1)
    rates = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, turn in contenders.items():
            rates[name].append(measure(turn, args.batches, device))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    # within one repeat the contenders ran back to back, so their ratio is less exposed to the machine's load
    ratio = lambda other: statistics.median(a / b for a, b in zip(rates["batched"], rates[other]))  # noqa: E731
    return {"device": str(device), "img_size": cfg.img_size, "batch_size": cfg.batch_size, "workers": cfg.workers,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "batches": args.batches,
            "images_per_s": rates, "median_images_per_s": medians,
            "batched_over_main": ratio("main"), "batched_over_timm": ratio("timm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="batches per timed turn")
    parser.add_argument("--repeats", type=int, default=5, help="turns of every contender, interleaved")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of timm's per-image loader")
    parser.add_argument("--images", type=int, default=8192, help="Fashion-MNIST training images cycled through")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = run(args)
    for name, rate in result["median_images_per_s"].items():
        print(f"{name:<28} {rate:9.1f} images/s (median of {args.repeats}; "
              f"{', '.join(f'{r:.0f}' for r in result['images_per_s'][name])})")
    print(f"median of the per-repeat ratios: batched / main {result['batched_over_main']:.2f}x, "
          f"batched / timm {result['batched_over_timm']:.2f}x "
          f"({result['device']}, {result['img_size']} px, batch {result['batch_size']}, "
          f"{result['threads']} threads, timm workers {result['workers']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
