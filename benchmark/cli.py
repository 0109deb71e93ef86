"""The ``hkdbench`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, Sequence

from .config import ConfigError


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default, offline), cifar10, cifar100, imagenet")
    p.add_argument("--data-root", default=None, help="dataset root (same as data.root=PATH)")
    p.add_argument("--recipe", default="auto", help="training recipe (default: auto, the papers' choice by dataset "
                                                     "and student family); see `hkdbench recipes`")
    p.add_argument("--seed", type=int, default=None, help="same as train.seed=N")
    p.add_argument("--epochs", type=int, default=None, help="same as train.epochs=N")
    p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run from its checkpoint")
    p.add_argument("--restart", action="store_true", help="discard an existing run's progress and start over")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: data.*, optim.*, train.*, method.* (e.g. optim.lr=0.1 method.eps=[1.5])")


def _overrides(args) -> List[str]:
    items = list(args.overrides)
    if args.data_root:
        items.append(f"data.root={args.data_root}")
    if args.seed is not None:
        items.append(f"train.seed={args.seed}")
    if args.epochs is not None:
        items.append(f"train.epochs={args.epochs}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hkdbench", description="Heterogeneous knowledge distillation benchmark")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="distil a teacher into a student (the teacher is trained first if needed)")
    p.add_argument("--teacher", default=None, help="teacher model (see `hkdbench models`)")
    p.add_argument("--student", required=True, help="student model (see `hkdbench models`)")
    p.add_argument("--method", default="kd", help="distillation method (see `hkdbench methods`); 'none' trains "
                                                   "the student alone")
    p.add_argument("--teacher-checkpoint", default=None, help="load the teacher from this state dict instead of "
                                                              "training it")
    p.add_argument("--teacher-recipe", default=None, help="recipe of the teacher run when it is trained here")
    p.add_argument("--teacher-override", action="append", default=[], metavar="key=value",
                   help="override of the teacher run's config (repeatable)")
    _add_run_options(p)

    p = sub.add_parser("teacher", help="train a teacher once per teacher config (reused by every student run)")
    p.add_argument("--model", required=True, help="teacher model (see `hkdbench models`)")
    _add_run_options(p)

    p = sub.add_parser("methods", help="list the registered distillation methods and their defaults")
    p.add_argument("--pair", nargs=2, metavar=("TEACHER", "STUDENT"),
                   help="also report each method's extra trainable parameters and memory for this pair")
    p.add_argument("--num-classes", type=int, default=100)

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--stages", action="store_true", help="also print each model's stage layouts (builds them)")

    sub.add_parser("recipes", help="list the training recipes")

    p = sub.add_parser("demo", help="the offline demo: a teacher of one family distilled into a student of another")
    p.add_argument("--runs-dir", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        from hkdbench.methods import load_plugins

        load_plugins()
        return _dispatch(args)
    except (ConfigError, KeyError, ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"hkdbench {args.command}: error: {message}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from . import commands

    return getattr(commands, f"cmd_{args.command}")(args, _overrides if hasattr(args, "overrides") else None)


if __name__ == "__main__":
    sys.exit(main())
