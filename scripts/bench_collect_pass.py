"""What the collecting pass of emulated ranks costs (engine/exchange.py): SPOFA's step on ranks trained in turn,
which collects every rank's statistics first at every step, against the same step with SPOFA's adaptive weights off
(``enable_adaptive=False``: no mean over the ranks, so no collecting pass; the rest of the step is the same).

One process, the two steps interleaved, ``--repeats`` rounds; each step's median and their ratio. Synthetic images,
random weights (the cost does not depend on them). On a shared machine only the ratio means something.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_collect_pass.py --student resnet_mini --teacher resnet_mini
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hkdbench.benchmark.core.config import OptimConfig
from hkdbench.benchmark.data.stream import Batch, Targets
from hkdbench.benchmark.engine.ranks import RankLayout, RankStates
from hkdbench.benchmark.engine.step import TrainStep, setup_training
from hkdbench.benchmark.models.zoo import create_model


def emulated_step(adaptive: bool, args) -> TrainStep:
    """A SPOFA TrainStep of ``args.ranks`` ranks in this process, on the CPU."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    student = create_model(args.student, 10, in_chans=3, img_size=args.size)
    teacher = create_model(args.teacher, 10, in_chans=3, img_size=args.size)
    setup = setup_training("spofa", {"enable_adaptive": adaptive}, student, teacher, 10,
                           torch.nn.CrossEntropyLoss(), None, OptimConfig(), "fp32", False, device)
    ranks = RankStates(RankLayout(args.ranks), setup.module, device)
    setup.method.exchange = ranks.exchange
    ranks.seed_epoch(0, 0)
    return TrainStep(OptimConfig(), 1, 10 ** 6, setup.module, setup.module, setup.method, setup.optimizer,
                     setup.scaler, device, ranks=ranks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="resnet_mini")
    parser.add_argument("--teacher", default="resnet_mini")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(1)
    batches = [Batch(torch.randn(args.batch, 3, args.size, args.size), labels := torch.randint(0, 10, (args.batch,)),
                     Targets(hard=labels)) for _ in range(args.ranks)]
    steps = {"collecting (adaptive on)": emulated_step(True, args), "no collecting (adaptive off)":
             emulated_step(False, args)}
    times = {name: [] for name in steps}
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        for name, step in steps.items():
            tic = time.perf_counter()
            step.step_ranks(batches, 0, round_)
            if round_ >= 2:
                times[name].append(time.perf_counter() - tic)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"{name}: median {median * 1e3:.1f} ms per step of {args.ranks} ranks x {args.batch}")
    on, off = medians.values()
    print(f"ratio collecting / not: {on / off:.2f} ({args.student} <- {args.teacher}, {args.size}px, "
          f"{args.repeats} interleaved rounds)")


if __name__ == "__main__":
    main()
