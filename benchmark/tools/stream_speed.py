"""The data stream and the step it feeds: images/s of the ``cifar-vit`` stream alone, and of a KD step fed by it
without and with the trainer's lookahead (issue #27, item 3).

The stream is the ``cifar-vit`` recipe's (RandomResizedCrop with per-image resampling, flip, RandAugment
rand-m9-mstd0.5-inc1, mixup/cutmix, random erasing) over Fashion-MNIST held on the device, as the trainer builds it;
the step is the trainer's ``TrainStep`` of ``kd`` for a teacher/student pair (random weights: cost does not depend on
them). Four contenders take turns within each repeat, each turn one epoch of ``--steps`` batches:

* ``stream``: the batches drawn, nothing else;
* ``step``: the KD step on one batch drawn beforehand (the step without its data);
* ``serial``: stream and step, each batch drawn after the previous step's host read (the loop before issue 27);
* ``overlap``: the same with each batch drawn inside the previous step, before its host read (``Lookahead``, as the
  trainer does now): on a GPU the host issues the augmentation while the device runs the step.

Reported: each contender's median images/s, and the medians over repeats of ``overlap / serial`` and of ``serial``
against the two parts run one after the other (``1 / (1/stream + 1/step)``). On a CPU nothing runs asynchronously,
so overlap can gain nothing there (the ratio shows its cost is nil); on a GPU it gains up to the stream's host time.
Also the host synchronisations of one batch (``count_stream_syncs``: torch's sync debug mode on CUDA), counted on
the second batch drawn (the first pays the one-time costs). The GPU check runs it as its ``stream`` part (``run`` with
``deadline`` and ``on_progress``: written once the syncs are counted, then after each repeat).

    python -m hkdbench.benchmark.tools.stream_speed --steps 4 --repeats 5
    python -m hkdbench.benchmark.tools.stream_speed --device cuda --teacher resnet18 --student deit_tiny \\
        --img-size 224 --batch-size 128 --steps 8 --repeats 5
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from hkdbench.benchmark.tools.cohort_speed import MARGIN

CONTENDERS = ("stream", "step", "serial", "overlap")


def build_stream(args, device: torch.device, channels_last: bool):
    """The ``cifar-vit`` training stream of ``--steps`` batches per epoch, on ``device``."""
    from hkdbench.benchmark.data import loaders
    from hkdbench.benchmark.data.stream import DataStream
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    overrides = [f"data.img_size={args.img_size}", f"data.batch_size={args.batch_size}",
                 f"data.train_subset={args.steps * args.batch_size}", f"data.eval_subset={args.batch_size}"]
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    cfg = resolve_run_config(kind="student", student=args.student, method="none", recipe="cifar-vit",
                             overrides=overrides)
    train_loader, _, info = loaders.build_loaders(cfg.data, device, 1.0)
    mixup = loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
    return DataStream([train_loader], cfg.train.seed, device, mixup, channels_last), info


def build_kd_step(args, device: torch.device, num_classes: int, in_chans: int):
    """The trainer's setup and step of ``kd`` for the pair (soft targets: the stream mixes)."""
    from timm.loss import SoftTargetCrossEntropy

    from hkdbench.benchmark.core.config import OptimConfig
    from hkdbench.benchmark.engine.evaluation import use_channels_last
    from hkdbench.benchmark.engine.seeding import seed_everything
    from hkdbench.benchmark.engine.step import TrainStep, setup_training
    from hkdbench.benchmark.models.zoo import create_model

    seed_everything(0)
    teacher = create_model(args.teacher, num_classes, in_chans=in_chans, img_size=args.img_size)
    student = create_model(args.student, num_classes, in_chans=in_chans, img_size=args.img_size)
    optim = OptimConfig(name="adamw", lr=1e-4, clip_grad=5.0)
    setup = setup_training("kd", None, student, teacher, num_classes, SoftTargetCrossEntropy(), None, optim,
                           args.precision, use_channels_last("auto", device), device)
    return TrainStep(optim, 1, args.steps, setup.module, setup.module, setup.method, setup.optimizer, setup.scaler,
                     device, dtype=setup.dtype, channels_last=setup.channels_last)


def contenders(stream, train_step) -> Dict[str, Callable[[int], None]]:
    """Each contender as a turn over one epoch of the stream (a new epoch each turn: new batches)."""
    (fixed,) = next(stream.batches(0))[1]  # one rank

    def stream_alone(epoch: int) -> None:
        for _ in stream.batches(epoch):
            pass

    def step_alone(epoch: int) -> None:
        for step in range(len(stream)):
            train_step.step(fixed, 0, step)

    def serial(epoch: int) -> None:
        for step, (batch,) in stream.batches(epoch):
            train_step.step(batch, 0, step)

    def overlap(epoch: int) -> None:
        batches = stream.lookahead(epoch)
        for step, (batch,) in batches:
            train_step.step(batch, 0, step, before_read=batches.draw_next)

    return dict(zip(CONTENDERS, (stream_alone, step_alone, serial, overlap)))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_images_per_s(turn: Callable[[int], None], epoch: int, images: int, device: torch.device) -> float:
    _synchronize(device)
    tic = time.perf_counter()
    turn(epoch)
    _synchronize(device)
    return images / (time.perf_counter() - tic)


def run(args, deadline: Optional[float] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The measurement. ``on_progress`` gets the result as it grows: once the syncs are counted (``repeats_done``
    0), then after each repeat; a repeat after the first starts only where ``MARGIN`` times the longest one so far
    still ends before ``deadline`` (``time.time()``; None: all ``--repeats``)."""
    from hkdbench.benchmark.engine.evaluation import use_channels_last
    from hkdbench.benchmark.tools.host_sync import count_stream_syncs

    if min(args.steps, args.repeats, args.batch_size) < 1:
        raise SystemExit("--steps, --repeats and --batch-size must be >= 1")
    report_progress = on_progress or (lambda result: None)
    device = torch.device(args.device)
    stream, info = build_stream(args, device, use_channels_last("auto", device))
    train_step = build_kd_step(args, device, info.num_classes, info.in_chans)
    next(stream.batches(0))  # the one-time costs (CUDA context, pinned buffers, first kernels) left out of the count
    _, syncs = count_stream_syncs(stream, epoch=0, step=min(1, len(stream) - 1))
    result: Dict[str, Any] = {
        "device": str(device), "device_name": _device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "teacher": args.teacher, "student": args.student, "img_size": args.img_size,
        "batch_size": args.batch_size, "steps": args.steps, "repeats": args.repeats, "repeats_done": 0,
        "precision": str(train_step.dtype or torch.float32).replace("torch.", ""),
        "stream_host_syncs_per_batch": len(syncs), "stream_host_syncs": syncs}
    report_progress(result)
    turns = contenders(stream, train_step)
    epochs = itertools.count(1)
    for turn in turns.values():  # warm-up: allocator pools, cuDNN's autotuner, lazy imports
        turn(next(epochs))
    images = len(stream) * args.batch_size
    rates: Dict[str, List[float]] = {name: [] for name in turns}
    longest = 0.0
    for r in range(args.repeats):
        if r and deadline is not None and time.time() + MARGIN * longest > deadline:
            break  # another repeat would not end in time: the ones measured stay whole
        tic = time.perf_counter()
        for name, turn in turns.items():
            rates[name].append(timed_images_per_s(turn, next(epochs), images, device))
        longest = max(longest, time.perf_counter() - tic)
        result.update(rate_summary(rates), repeats_done=r + 1)
        report_progress(result)
    return result


def rate_summary(rates: Dict[str, List[float]]) -> Dict[str, Any]:
    """Each contender's images/s and their median; the medians of the per-repeat ratios."""
    per_repeat = list(zip(*(rates[name] for name in CONTENDERS)))
    return {"images_per_s": {name: list(values) for name, values in rates.items()},
            "median_images_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "overlap_over_serial": statistics.median(o / s for _, _, s, o in per_repeat),
            "serial_over_parts": statistics.median(s * (1 / a + 1 / b) for a, b, s, _ in per_repeat),
            "overlap_over_parts": statistics.median(o * (1 / a + 1 / b) for a, b, _, o in per_repeat)}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def report(result: Dict[str, object]) -> str:
    lines = [f"{name:<8} {rate:9.1f} images/s (median of {result['repeats_done']}: "
             f"{', '.join(f'{r:.0f}' for r in result['images_per_s'][name])})"
             for name, rate in result["median_images_per_s"].items()]
    lines.append(f"medians of the per-repeat ratios: overlap / serial {result['overlap_over_serial']:.3f}, "
                 f"serial / parts one after the other {result['serial_over_parts']:.3f}, overlap / parts "
                 f"{result['overlap_over_parts']:.3f}")
    lines.append(f"host syncs of one stream batch: {result['stream_host_syncs_per_batch']} "
                 f"({result['device_name']}, {result['teacher']} -> {result['student']}, {result['img_size']} px, "
                 f"batch {result['batch_size']}, {result['steps']} steps per turn, {result['precision']}, "
                 f"{result['threads']} threads)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher", default="resnet_mini")
    p.add_argument("--student", default="vit_mini")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="batches per timed turn (one epoch of the stream)")
    p.add_argument("--repeats", type=int, default=5, help="turns of every contender, interleaved")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="auto",
                   help="the step's autocast, as train.precision (auto: bf16 on a GPU, fp32 on a CPU)")
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: the dataset's own lookup)")
    p.add_argument("--json", help="also write the result to this file")
    return p


def options(**values: Any) -> argparse.Namespace:
    """The command line's options as ``run`` takes them: its defaults, with ``values`` (by their Python names) in
    their place; a name it does not have is a TypeError."""
    args = parser().parse_args([])
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise TypeError(f"stream_speed has no option {', '.join(unknown)}")
    vars(args).update(values)
    return args


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
