"""What a per-step record costs the host (engine/step_log.py): ``StepLog.add`` per step with records turned off
(``train.log_interval=0``), with steps.jsonl alone (``train.log=none``) and with steps.jsonl and TensorBoard
(``train.log=tensorboard``), each recording every step. The three take turns within each round (the machine is
noisy); the report gives each one's median microseconds per step over the rounds. A record every
``train.log_interval`` steps costs that over the interval. Run from the repository root:

    .venv/bin/python scripts/step_log_cost.py --rounds 15 --steps 200
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hkdbench.benchmark.core.store import RunDir
from hkdbench.benchmark.engine.step_log import StepLog
from hkdbench.benchmark.engine.tracking import NullTracker, TensorBoardTracker
from hkdbench.benchmark.recipes.resolve import resolve_run_config

# a method's host values: two loss terms, a statistic, the lr
VALUES = {"loss/ce": 2.0, "loss/kd": 0.1, "stat/weight": 1.0, "lr": 1e-3}


def contenders(folder: Path):
    cfg = resolve_run_config(kind="teacher", student="resnet_mini")
    for name in ("off", "file", "tensorboard"):
        (folder / name).mkdir()
    tensorboard = TensorBoardTracker(cfg, "cost", str(folder / "tensorboard" / "events"), 0)
    huge = 10 ** 9  # steps per epoch: no epoch ends inside the measurement
    return {"off (log_interval=0)": StepLog(RunDir(folder / "off"), NullTracker(), 0, huge),
            "steps.jsonl": StepLog(RunDir(folder / "file"), NullTracker(), 1, huge),
            "steps.jsonl + tensorboard": StepLog(RunDir(folder / "tensorboard"), tensorboard, 1, huge)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200, help="steps per contender and round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        logs = contenders(Path(folder))
        micros = {name: [] for name in logs}
        for round_ in range(args.rounds):
            for name, log in logs.items():
                first = round_ * args.steps
                tic = time.perf_counter()
                for step in range(first, first + args.steps):
                    log.add(VALUES, 0, step, 64, 0.01)
                micros[name].append((time.perf_counter() - tic) / args.steps * 1e6)
    for name, values in micros.items():
        print(f"{name:>26}: median {statistics.median(values):7.1f} us per step")


if __name__ == "__main__":
    main()
