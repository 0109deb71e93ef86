"""hkdbench's Python API: the stable entry points for notebooks and scripts. Everything here keeps its name and
arguments across versions (new keyword arguments may be added); the modules under hkdbench.benchmark, .methods and
.analysis are internals that may change.

* :func:`resolve` -- a run's config without training it (as ``hkdbench config``);
* :func:`train` -- one run, :func:`train_cohort` -- several methods on one data stream (as ``hkdbench train``);
* :func:`sweep` -- a preset's or an inline grid (as ``hkdbench sweep``);
* :func:`load_runs`, :func:`load_epochs`, :func:`load_steps`, :func:`list_runs` -- the run store as pandas
  DataFrames;
* :func:`report` -- every table and figure with an index (as ``hkdbench report``).

Each takes what the command takes, spelled as keyword arguments: a config file (``config=``, a run's config.json
replays it), then the models and recipe, then ``overrides`` (``["optim.lr=0.1", "teacher.train.epochs=3"]``), and
goes through the same resolution and checks as the command line.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:  # the annotations only: importing hkdbench.api stays cheap
    import pandas as pd

    from hkdbench.benchmark.core.config import RunConfig
    from hkdbench.benchmark.engine.member import RunResult
    from hkdbench.benchmark.recipes.resolve import RunRequest

__all__ = ["resolve", "train", "train_cohort", "sweep", "load_runs", "load_epochs", "load_steps", "list_runs",
           "report"]


def _request(student: Optional[str], teacher: Optional[str], config: Optional[str], dataset: Optional[str],
             recipe: Optional[str], overrides: Sequence[str], teacher_kind: bool = False,
             **flags: Optional[str]) -> "RunRequest":
    from hkdbench.benchmark.recipes.resolve import RunRequest
    from hkdbench.methods import load_plugins

    load_plugins()  # a config may name a plugin's method, as on the command line
    kind = "teacher" if teacher_kind else "student"
    request = RunRequest.from_file(str(config) if config is not None else None, kind)
    if teacher_kind:
        request.given(student=student, dataset=dataset, recipe=recipe, pretrained=flags.get("pretrained"))
    else:
        request.given(student=student, teacher=teacher, dataset=dataset, recipe=recipe, **flags)
    return request.with_overrides(list(overrides))


def resolve(student: Optional[str] = None, *, teacher: Optional[str] = None, method: Optional[str] = None,
            config: Optional[str | Path] = None, dataset: Optional[str] = None, recipe: Optional[str] = None,
            overrides: Sequence[str] = (), teacher_run: bool = False, **teacher_options: Optional[str]) -> "RunConfig":
    """The resolved config of one run (``teacher_run=True``: of a teacher run of the model ``student``), without
    training or writing anything. ``teacher_options``: teacher_checkpoint, teacher_pretrained, teacher_recipe,
    teacher_weights (a teacher run: pretrained)."""
    return _request(student, teacher, config, dataset, recipe, overrides, teacher_run, **teacher_options) \
        .resolve(None if teacher_run else method)


def train_cohort(methods: Sequence[Optional[str]], student: Optional[str] = None, *, teacher: Optional[str] = None,
                 config: Optional[str | Path] = None, dataset: Optional[str] = None, recipe: Optional[str] = None,
                 overrides: Sequence[str] = (), runs_dir: Optional[str | Path] = None, device: Optional[str] = None,
                 resume: bool = False, restart: bool = False, teacher_run: bool = False,
                 **teacher_options: Optional[str]) -> List["RunResult"]:
    """Trains one run per method on one data stream and one teacher pass per step (one method: a single run),
    each written to the run store (``runs_dir``, default $HKDBENCH_RUNS or ./runs) as ``hkdbench train`` writes it;
    a run already done is skipped. Returns each run's result (status 'done' or 'failed', its directory)."""
    from hkdbench.benchmark.cli.run_commands import checked_configs
    from hkdbench.benchmark.core.config import ConfigError
    from hkdbench.benchmark.engine.trainer import train as train_runs
    from hkdbench.benchmark.engine.trainer import train_cohort as train_runs_together

    if resume and restart:
        raise ConfigError("resume and restart exclude each other")
    request = _request(student, teacher, config, dataset, recipe, overrides, teacher_run, **teacher_options)
    cfgs = checked_configs(request, list(methods) or [None], device)
    where = dict(runs_dir=None if runs_dir is None else str(runs_dir), resume=resume, restart=restart,
                 device=device)
    return [train_runs(cfgs[0], **where)] if len(cfgs) == 1 else train_runs_together(cfgs, **where)


def train(student: Optional[str] = None, *, teacher: Optional[str] = None, method: Optional[str] = None,
          config: Optional[str | Path] = None, dataset: Optional[str] = None, recipe: Optional[str] = None,
          overrides: Sequence[str] = (), runs_dir: Optional[str | Path] = None, device: Optional[str] = None,
          resume: bool = False, restart: bool = False, teacher_run: bool = False,
          **teacher_options: Optional[str]) -> "RunResult":
    """Trains one run (``method``: default the config file's, else kd; ``teacher_run=True``: a teacher run of the
    model ``student``), its teacher run first where needed; see :func:`train_cohort`."""
    (result,) = train_cohort([method], student, teacher=teacher, config=config, dataset=dataset, recipe=recipe,
                             overrides=overrides, runs_dir=runs_dir, device=device, resume=resume, restart=restart,
                             teacher_run=teacher_run, **teacher_options)
    return result


def sweep(preset: Optional[str | Path] = None, *, overrides: Sequence[str] = (),
          teachers: Optional[Sequence[str]] = None, students: Optional[Sequence[str]] = None,
          methods: Optional[Sequence[str]] = None, seeds: Optional[Sequence[int]] = None, executor: str = "inline",
          runs_dir: Optional[str | Path] = None, device: Optional[str] = None, cohort: bool = False,
          retry_failed: bool = False, parallel: int = 0, wait: bool = False) -> int:
    """Runs a preset (a shipped name or a YAML file) or an inline grid (teachers x students x methods x seeds) with
    the preset's ``key=value`` overrides, as ``hkdbench sweep``: done runs skipped, cut-off ones resumed. Returns the
    sweep's exit code (0: every run done, or submitted)."""
    from hkdbench.benchmark.engine.tracking import check_tracker_available
    from hkdbench.benchmark.sweep.dispatch import Sweep
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset
    from hkdbench.methods import load_plugins

    load_plugins()
    grid = {"teachers": _names(teachers), "students": _names(students), "methods": _names(methods),
            "seeds": None if seeds is None else [int(s) for s in seeds]}
    plan = expand(load_preset(None if preset is None else str(preset), list(overrides), grid))
    for kind in sorted({r.cfg.train.log for r in plan.runs}):
        check_tracker_available(kind)
    runner = Sweep(plan, runs_dir=None if runs_dir is None else str(runs_dir), device=device, cohort=cohort)
    return runner.run(executor, retry_failed=retry_failed, parallel=parallel, wait=wait,
                      command="hkdbench.api.sweep").exit_code


def _names(items: Optional[Sequence[str]]) -> Optional[List[str]]:
    return None if items is None else [str(item) for item in items]


def _store_root(runs_dir: Optional[str | Path]) -> Path:
    from hkdbench.benchmark.core.store import RunStore

    return RunStore(None if runs_dir is None else str(runs_dir)).root


def load_runs(runs_dir: Optional[str | Path] = None, include_unfinished: bool = True) -> "pd.DataFrame":
    """One row per run of the store: identity (method, method_label, teacher, student, dataset, recipe, setting,
    seed), status, results (best_top1, last_top1, ...), overhead and probe columns, provenance."""
    from hkdbench.analysis.collect import collect_runs

    return collect_runs(_store_root(runs_dir), include_unfinished=include_unfinished)


def load_epochs(runs_dir: Optional[str | Path] = None) -> "pd.DataFrame":
    """One row per (run, epoch) of every finished training run: its metrics.jsonl with the run's identity columns."""
    from hkdbench.analysis.collect import collect_epochs

    return collect_epochs(_store_root(runs_dir))


def load_steps(runs_dir: Optional[str | Path] = None) -> "pd.DataFrame":
    """One row per (run, logged step) of every finished training run: its steps.jsonl (every train.log_interval
    steps: the step's loss terms, lr, train_loss, images_per_s, at ``step``) with the run's identity columns."""
    from hkdbench.analysis.collect import collect_steps

    return collect_steps(_store_root(runs_dir))


def list_runs(runs_dir: Optional[str | Path] = None, **filters: Sequence[str]) -> "pd.DataFrame":
    """The listing of ``hkdbench runs`` (method, pair, setting, seed, status, epoch, last and best top-1, age, run),
    newest first; ``filters``: method, teacher, student, status, dataset -> the values kept."""
    from hkdbench.benchmark.cli.runs_listing import FILTERS, runs_table
    from hkdbench.benchmark.core.config import ConfigError

    unknown = sorted(set(filters) - set(FILTERS))
    if unknown:
        raise ConfigError(f"unknown filter(s) {', '.join(unknown)}; allowed: {', '.join(FILTERS)}")
    return runs_table(_store_root(runs_dir), {k: [v] if isinstance(v, str) else list(v) for k, v in filters.items()})


def report(runs_dir: Optional[str | Path] = None, out: str | Path = "results", metric: str = "primary",
           published: Sequence[str | Path] = ("ofa-kd",)) -> Path:
    """Writes every table and figure of the store with an index README.md into ``out``; returns the index's path.
    ``metric``: 'primary' (the validation-selected epoch where a table's runs have one, else the last epoch) or a
    summary column (``hkdbench report --metric``).
    ``published``: the tables of published numbers set beside ours ('ofa-kd', the shipped cells, or CSV files in
    their format: ``hkdbench report --published``)."""
    from hkdbench.analysis.report import make_report
    from hkdbench.benchmark.cli.arguments import METRICS
    from hkdbench.benchmark.core.config import ConfigError
    from hkdbench.benchmark.core.store import check_folder

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    return make_report(_store_root(runs_dir), check_folder(str(out), "out"), metric,
                       published=[str(table) for table in published])
