"""The ``hkdbench`` command line's grammar: every subcommand, option and argument type (argparse)."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional

from hkdbench import __version__
from hkdbench.benchmark.core.config import ConfigError

DEBUG_FLAG, DEBUG_ENV = "--debug", "HKDBENCH_DEBUG"  # the traceback of an error is printed under either


RUNS_DIR_HELP = "the run store (default: $HKDBENCH_RUNS or ./runs)"
DEVICE_HELP = "cuda, cuda:1, cpu (default: CUDA when present)"
_OVERRIDES_HELP = "config overrides, before, between or after the options, over the config file's: data.*, optim.*, " \
                  "train.*, method.* (e.g. optim.lr=0.1 method.eps=[1.5]); `hkdbench config` lists every field"
TEACHER_OVERRIDES_HELP = "; also teacher.<section>.<field>=value for the teacher run (e.g. teacher.train.epochs=3), " \
                         "as sweep takes them"


def _add_config_options(p: argparse.ArgumentParser, teacher_overrides: bool) -> None:
    """What sets a run's config: a config file, the dataset, the recipe, the seed and epochs, key=value overrides
    (``teacher_overrides``: also those of a student's teacher run)."""
    p.add_argument("-c", "--config", default=None, metavar="FILE",
                   help="a run config file (YAML with config.json's fields, any of them: data:, optim:, train:, "
                        "method_cfg:, student:, teacher:, ...; a run's own RUN/config.json replays that run); the "
                        "options and key=value overrides go over it")
    p.add_argument("--dataset", default=None,
                   help="fashion-mnist (default, offline), cifar10, cifar100, imagenet")
    p.add_argument("--data-root", default=None, help="dataset root (same as data.root=PATH)")
    p.add_argument("--recipe", default=None, help="training recipe (default: auto, the papers' choice by dataset "
                                                  "and student family); see `hkdbench recipes`")
    p.add_argument("--seed", type=int, default=None, help="same as train.seed=N")
    p.add_argument("--epochs", type=int, default=None, help="same as train.epochs=N")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=_OVERRIDES_HELP + (TEACHER_OVERRIDES_HELP if teacher_overrides else ""))


def _add_run_options(p: argparse.ArgumentParser, teacher_overrides: bool) -> None:
    _add_config_options(p, teacher_overrides)
    p.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--resume", action="store_true", help="continue an unfinished run from its checkpoint")
    p.add_argument("--restart", action="store_true", help="discard an existing run's progress and start over")
    p.add_argument("--dry-run", action="store_true",
                   help="print every run this command would train, in order (a teacher run first), with its epochs, "
                        "steps per epoch, data settings and state in the run store; train and write nothing")


def at_least(minimum: int, meaning: str = ""):
    """An argparse type: an integer >= ``minimum`` (``meaning``: what the smallest value does, e.g. '0: auto')."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{f' ({meaning})' if meaning else ''}, got {value}")
        return value
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _comma_list(value: str) -> List[str]:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {value!r}")
    return items


def _add_list_option(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    """The one spelling of a list option in every subcommand: ``--flag a,b`` or ``--flag a --flag b``."""
    p.add_argument(flag, action="extend", type=_comma_list, default=None, metavar="A,B",
                   help=f"{help} (comma-separated or repeated)")


# The sweep's Slurm flags: --flag -> slurm.<key> (listed once: the parser and the preset override both use it)
SLURM_FLAGS = (("--partition", "partition", str), ("--time", "time", at_least(1, "minutes")),
               ("--gpus-per-node", "gpus_per_node", at_least(0)), ("--cpus-per-task", "cpus_per_task", at_least(1)),
               ("--mem-gb", "mem_gb", positive_number), ("--account", "account", str), ("--qos", "qos", str),
               ("--constraint", "constraint", str), ("--array-parallelism", "array_parallelism", at_least(1)),
               ("--signal-delay-s", "signal_delay_s", at_least(0)))


def slurm_settings(args) -> List[str]:
    """The Slurm flags given, as the preset's ``slurm.<key>=value`` overrides."""
    items = [f"slurm.{key}={getattr(args, f'slurm_{key}')}" for _, key, _ in SLURM_FLAGS
             if getattr(args, f"slurm_{key}", None) is not None]
    if getattr(args, "sbatch_flag", None):
        items.append(f"slurm.extra={json.dumps(list(args.sbatch_flag))}")
    return items


def overrides(args) -> List[str]:
    items = list(args.overrides)
    if args.data_root:
        items.append(f"data.root={args.data_root}")
    if args.seed is not None:
        items.append(f"train.seed={args.seed}")
    if args.epochs is not None:
        items.append(f"train.epochs={args.epochs}")
    return items


def _add_student_options(p: argparse.ArgumentParser) -> None:
    """The models and method of a student run (train, config)."""
    p.add_argument("--teacher", default=None, help="teacher model (see `hkdbench models`)")
    p.add_argument("--student", default=None, help="student model (see `hkdbench models`; required unless the "
                                                   "config file names one)")
    p.add_argument("--method", action="append", default=None,
                   help="distillation method (see `hkdbench methods`; default: the config file's, else kd); 'none' "
                        "trains the student alone. Several (repeated, or a,b,c) train as one cohort: one data stream "
                        "and one teacher pass per step, each method its own run")
    p.add_argument("--teacher-checkpoint", default=None, help="load the teacher from this state dict instead of "
                                                              "training it")
    p.add_argument("--teacher-pretrained", default=None, metavar="NAME_OR_FILE",
                   help="pretrained weights for the teacher: timm's (architecture.tag, e.g. "
                        "swin_tiny_patch4_window7_224.ms_in1k; from the hub cache, HF_HUB_OFFLINE honoured) or a "
                        "local weight file of the teacher's architecture (its SHA-256 in the hash): used as they "
                        "are on ImageNet, fine-tuned by the teacher run on other datasets")
    p.add_argument("--teacher-recipe", default=None, help="recipe of the teacher run when it is trained here")
    p.add_argument("--teacher-weights", default=None, choices=("best", "last"),
                   help="which weights of the teacher run the student loads: its best epoch by top-1 (default, "
                        "timm's model_best; by validation top-1 with data.val_split) or its last; teacher_top1 is "
                        "theirs")


def _add_teacher_options(p: argparse.ArgumentParser) -> None:
    """The model of a teacher run (teacher, config)."""
    p.add_argument("--model", default=None, help="teacher model (see `hkdbench models`; required unless the config "
                                                 "file names one)")
    p.add_argument("--pretrained", default=None, metavar="NAME_OR_FILE",
                   help="start from pretrained weights (timm's architecture.tag, or a local weight file of the "
                        "model's architecture) and fine-tune them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hkdbench", description="Heterogeneous knowledge distillation benchmark")
    parser.add_argument("--version", action="version", version=f"hkdbench {__version__}",
                        help="print hkdbench's version and exit")
    parser.add_argument(DEBUG_FLAG, action="store_true", help=f"on an error, also print the traceback (anywhere "
                                                               f"on the line; or set {DEBUG_ENV}=1)")
    # every subcommand takes its positionals (key=value overrides, a preset) before, between and after options
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser,
                                help="the command (hkdbench COMMAND --help: its options)")

    p = sub.add_parser("train", help="distil a teacher into a student (the teacher is trained first if needed)")
    _add_student_options(p)
    _add_run_options(p, teacher_overrides=True)

    p = sub.add_parser("teacher", help="train a teacher once per teacher config (reused by every student run)")
    _add_teacher_options(p)
    _add_run_options(p, teacher_overrides=False)

    p = sub.add_parser("teacher-outputs", help="compute and store a teacher's outputs on a run's data stream (every "
                                               "epoch), read by its runs with train.teacher_outputs=stored")
    _add_student_options(p)
    _add_config_options(p, teacher_overrides=True)
    p.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dry-run", action="store_true", help="print where the outputs go, which epochs are stored and "
                                                          "the size of all of them; compute and write nothing")

    p = sub.add_parser("config", help="print every field of a run's resolved config with its value, its default and "
                                      "its help (train's arguments; --model for a teacher run); writes nothing")
    _add_student_options(p)
    _add_teacher_options(p)
    _add_config_options(p, teacher_overrides=True)
    p.add_argument("--format", default="table", choices=("table", "yaml", "json"),
                   help="table (default): field, value, default, help; yaml: the config as a file `train -c` "
                        "takes; json: the fields with their values, defaults and help")

    p = sub.add_parser("methods", help="list the registered distillation methods and their defaults")
    p.add_argument("--pair", nargs=2, metavar=("TEACHER", "STUDENT"),
                   help="also report each method's extra trainable parameters and memory for this pair")
    p.add_argument("--num-classes", type=at_least(2), default=100, help="classes of the pair's heads (default: "
                                                                         "%(default)s)")

    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--stages", action="store_true", help="also print each model's stage layouts (builds them)")

    sub.add_parser("recipes", help="list the training recipes")

    p = sub.add_parser("demo", help="the offline demo: a teacher of one family distilled into a student of another")
    p.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP)
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    _add_analysis_commands(sub)
    _add_sweep_commands(sub)
    _add_eval_export_commands(sub)
    return parser


def _add_eval_export_commands(sub) -> None:
    """eval and export of a finished run's student (benchmark/engine/eval_run.py, benchmark/engine/export.py)."""
    for name, text in (("eval", "top-1/top-5 of a run's kept student weights (and of its teacher)"),
                       ("export", "write a run's deployable student for plain timm (timm), safetensors or ONNX")):
        p = sub.add_parser(name, help=text)
        p.add_argument("run", metavar="RUN", help="the run's directory (RUNS_DIR/<run name>)")
        p.add_argument("--weights", default="best", choices=("best", "last"),
                       help="the run's best epoch by top-1 (best.pt, default; by validation top-1 with "
                            "data.val_split) or its last (final.pt)")
        p.add_argument("--ema", action="store_true", help="the student EMA's weights (runs with train.ema_decay)")
    p.add_argument("--format", required=True, choices=("timm", "safetensors", "onnx"),
                   help="timm: a plain timm model's folder; safetensors: one state-dict file; onnx: the graph")
    p.add_argument("--out", "-o", default=None, help="output folder (default: RUN/export)")
    p = sub.choices["eval"]
    p.__class__ = _IntermixedParser  # data.key=value before or after the options
    p.add_argument("--teacher", action="store_true", help="also evaluate the teacher the run distilled from")
    p.add_argument("--data-root", default=None, help="evaluate on the dataset at this root (same as data.root=PATH)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    p.add_argument("overrides", nargs="*", metavar="data.key=value",
                   help="data settings for the evaluation, e.g. data.eval_subset=1000 data.eval_batch_size=512")


# the accuracies of the tidy table a comparison table can compare (analysis/collect.py RESULT_COLUMNS), and
# `primary` (analysis/tables.py primary_metric: selected_top1 where a table's runs have it, else last_top1)
METRICS = ("primary", "selected_top1", "last_top1", "best_top1", "best_top5", "last_top5", "ema_best_top1",
           "ema_last_top1")


# collect, table and plot write by default where `report` (the whole of them) keeps what they write
REPORT_PLACES = {"collect": "results", "table": "results/tables", "plot": "results/figures", "report": "results"}


def _add_analysis_commands(sub) -> None:
    """overhead, collect, table, plot, report (tools/overhead.py and the analysis package)."""
    p = sub.add_parser("overhead", help="measure every method's train step time, memory, FLOPs and extra "
                                        "parameters for one pair (stored as runs of kind 'overhead')")
    p.add_argument("--teacher", required=True, help="teacher model (see `hkdbench models`)")
    p.add_argument("--student", required=True, help="student model (see `hkdbench models`)")
    _add_list_option(p, "--methods", "default: every registered method ('none' and 'kd' are always measured, for "
                                     "the ratios)")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="images per step (default: %(default)s)")
    p.add_argument("--img-size", type=at_least(1), default=None, help="default: the larger of the two models' sizes")
    p.add_argument("--num-classes", type=at_least(2), default=100, help="classes of the heads (default: "
                                                                         "%(default)s)")
    p.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps first (default: %(default)s)")
    p.add_argument("--repeats", type=at_least(1), default=10, help="timed steps; the median is kept (default: "
                                                                   "%(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="default: the step training runs here (train.precision=auto: bf16 or fp16 on a GPU, fp32 on "
                        "a CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
    p.add_argument("--restart", action="store_true", help="measure again where a result is already stored")
    p.add_argument("--compile", action="store_true", help="torch.compile the step's models (as train.compile=true; "
                                                          "the warm-up steps then include the compilation)")
    p = sub.add_parser("runs", help="list the run store's runs: method, pair, setting, seed, status, epoch, last and "
                                    "best top-1, age (newest first)")
    p.add_argument("--runs-dir", default=None, help=RUNS_DIR_HELP)
    for key, text in (("method", "methods (teacher: the teacher runs)"),
                      ("teacher", "teacher models (their teacher runs too)"), ("student", "student models"),
                      ("status", "done, running, partial, pending, failed, damaged"), ("dataset", "datasets")):
        _add_list_option(p, f"--{key}", f"only these {text}")
    p.add_argument("--format", default="table", choices=("table", "csv", "json"),
                   help="table (default), csv or json (the run's name included)")
    for name, text in (("collect", "write the tidy tables of every run (runs.csv, epochs.csv, steps.csv, cka.csv)"),
                       ("table", "write the comparison tables (Markdown, LaTeX, CSV)"),
                       ("plot", "draw every figure (PNG and PDF)"),
                       ("report", "regenerate every table and figure with an index README.md")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
        p.add_argument("--out", "-o", default=REPORT_PLACES[name],
                       help="output folder (default: %(default)s, where `report` keeps them)")
        if name in ("table", "report"):
            p.add_argument("--metric", default="primary", choices=METRICS,
                           help="the accuracy compared (default: %(default)s: selected_top1, the epoch chosen on "
                                "data.val_split, where every run of a table has it, else last_top1; best_top1 is the "
                                "papers' convention, the epoch chosen on the test set)")
        if name == "report":
            p.add_argument("--published", action="append", metavar="FILE",
                           help="a table of published numbers to set beside ours: a CSV file with the columns "
                                "dataset, teacher, student, method, value, source, quoted_by (paper, note optional); "
                                "repeat for several; 'ofa-kd' names the shipped OFA-KD cells (default: ofa-kd alone)")


class _IntermixedParser(argparse.ArgumentParser):
    """Positionals (the preset, then key=value overrides) may come before, between and after options."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_sweep_commands(sub) -> None:
    """sweep and status (the sweep package)."""
    p = sub.add_parser("sweep", help="run a preset's teacher x student x method x seed grid inline, on local "
                                     "processes or as Slurm job arrays (skips done runs, resumes cut-off ones)")
    from hkdbench.benchmark.sweep.executors import EXECUTORS

    p.add_argument("--executor", default="inline", choices=list(EXECUTORS),
                   help="; ".join(f"{name}: {cls.description}" for name, cls in EXECUTORS.items()))
    p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded grid, each run's status and what "
                                                          "would be submitted; submit nothing")
    _add_grid_options(p)
    p.add_argument("--retry-failed", action="store_true", help="also re-submit runs marked FAILED")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every finished run's resume checkpoint (as train.keep_checkpoint=true; default: "
                        "removed once the run is done)")
    p.add_argument("--cohort", action="store_true",
                   help="train the student runs that share a data stream and a teacher (same student, data, seed, "
                        "teacher run; the student-alone run joins them) as one job each: one batch and one "
                        "teacher pass per step for all of them, each writing its own run (Slurm: one array task "
                        "per cohort)")
    p.add_argument("--no-input-check", action="store_true",
                   help="skip reading the data and teacher checkpoints before submitting (when they exist only "
                        "on the compute nodes)")
    p.add_argument("--parallel", type=at_least(0, "0: the default"), default=0,
                   help="local executor: jobs at a time (default: CPUs / slurm.cpus_per_task)")
    p.add_argument("--wait", action="store_true", help="slurm: wait until the submitted runs end, then print the "
                                                       "status table")
    p.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    for flag, key, typ in SLURM_FLAGS:
        p.add_argument(flag, dest=f"slurm_{key}", type=typ, default=None, help=f"same as slurm.{key}=VALUE")
    p.add_argument("--sbatch-flag", action="append", default=[], metavar="--FLAG[=VALUE]",
                   help="an extra sbatch flag (repeatable), e.g. --sbatch-flag=--exclusive")
    p.add_argument("settings", nargs="*", metavar="[PRESET_OR_YAML] key=value",
                   help="a shipped preset (demo, cifar100-ofa, cifar100-pat, imagenet-ofa) or a YAML file "
                        "(optional with an inline grid: --students ...), then preset overrides: seeds=[0], "
                        "methods=[kd,ofa], train.epochs=1, data.root=PATH, teacher.train.epochs=1, "
                        "method.ofa.eps=[1.5], slurm.partition=gpu")

    p = sub.add_parser("status", help="where every run of a preset or sweep stands: done / running / queued / "
                                      "pending / failed (with the reason and log)")
    p.add_argument("settings", nargs="*", metavar="[PRESET_OR_SWEEP] key=value",
                   help="a preset name or YAML file (expanded with the same key=value overrides as the sweep; "
                        "optional with an inline grid: --students ...), a sweep directory (runs/_sweeps/ID) or a "
                        "sweep's ID (any executor's, inline included)")
    p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
    _add_grid_options(p)
    p = sub.add_parser("cancel", help="stop the queued and running jobs of a sweep's runs (each keeps its checkpoint; "
                                      "the same sweep command resumes them)")
    p.add_argument("settings", nargs="*", metavar="[SWEEP_OR_PRESET] key=value",
                   help="a sweep directory (runs/_sweeps/ID), a sweep's ID, or a preset or inline grid as `status` "
                        "takes it")
    p.add_argument("--runs-dir", default=None, help="the run store (default: $HKDBENCH_RUNS or ./runs)")
    _add_grid_options(p)


def _add_grid_options(p: argparse.ArgumentParser) -> None:
    """The inline grid of sweep and status."""
    _add_list_option(p, "--teachers", "inline grid: teachers (replaces the preset's pairs)")
    _add_list_option(p, "--students", "inline grid: students (replaces the preset's pairs)")
    _add_list_option(p, "--methods", "methods")
    _add_list_option(p, "--seeds", "seeds")


def preset_and_overrides(settings: List[str], what: str = "preset") -> tuple[Optional[str], List[str]]:
    """The positionals of sweep, status and cancel: an optional preset (or YAML file, sweep id or directory) first,
    then ``key=value`` overrides; an inline grid (--students ...) may stand in for the preset."""
    first = settings[0] if settings else None
    preset = first if first is not None and ("=" not in first or first.endswith((".yaml", ".yml"))) else None
    overrides = settings[1:] if preset is not None else list(settings)
    stray = [item for item in overrides if "=" not in item]
    if stray:
        raise ConfigError(f"expected key=value overrides after the {what}, got {' '.join(stray)}")
    return preset, overrides


def grid_of(args) -> Dict[str, object]:
    try:
        seeds = [int(s) for s in args.seeds] if args.seeds else None
    except ValueError:
        raise ConfigError(f"--seeds takes integers, got {','.join(args.seeds)!r}") from None
    return {"teachers": args.teachers, "students": args.students, "methods": args.methods, "seeds": seeds}
