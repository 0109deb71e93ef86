"""The ``hkdbench`` subcommands that read the run store without building a model: runs, collect, table, plot, report,
status, and cancel (which also stops jobs through their executors). Nothing here imports torch or a method, except
where a preset is expanded as the sweep would (status or cancel given a preset)."""
from __future__ import annotations

from hkdbench.benchmark.cli.arguments import grid_of, preset_and_overrides
from hkdbench.benchmark.core.config import ConfigError


def _analysis_paths(args):
    """The run store to read and the folder to write, both checked before anything is read or written."""
    from hkdbench.benchmark.core.store import RunStore, check_folder

    return RunStore(args.runs_dir).root, check_folder(args.out, "--out")


def cmd_collect(args, _overrides) -> int:
    from hkdbench.analysis.report import write_tidy

    runs_dir, out = _analysis_paths(args)
    for name, path in write_tidy(runs_dir, out).items():
        print(f"{name}: {path}")
    return 0


def cmd_table(args, _overrides) -> int:
    from hkdbench.analysis.collect import collect_runs
    from hkdbench.analysis.report import check_readable
    from hkdbench.analysis.tables import comparison_tables

    runs_dir, out = _analysis_paths(args)
    tables = comparison_tables(check_readable(collect_runs(runs_dir), runs_dir), args.metric)
    if not tables:
        print(f"no finished distillation runs in {runs_dir}")
    for table in tables:
        print(table.to_markdown() + "\n")
        for path in table.write(out):
            print(f"wrote {path}")
    return 0


def cmd_plot(args, _overrides) -> int:
    from hkdbench.analysis.plots import all_plots
    from hkdbench.analysis.report import tidy_tables

    runs_dir, out = _analysis_paths(args)
    tidy = tidy_tables(runs_dir)
    for kind, paths in all_plots(tidy["runs"], tidy["epochs"], out, cka=tidy["cka"], steps=tidy["steps"]).items():
        for path in paths:
            print(f"{kind}: {path}")
    return 0


def cmd_report(args, _overrides) -> int:
    import shlex
    import sys

    from hkdbench.analysis.published import SHIPPED
    from hkdbench.analysis.report import make_report

    runs_dir, out = _analysis_paths(args)
    command = "hkdbench " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["report"] else None
    index = make_report(runs_dir, out, args.metric, command=command, published=args.published or [SHIPPED])
    print(f"wrote {index}")
    return 0


def cmd_runs(args, _overrides) -> int:
    from hkdbench.benchmark.cli.runs_listing import FILTERS, format_runs, runs_table
    from hkdbench.benchmark.core.store import RunStore

    table = runs_table(RunStore(args.runs_dir).root, {key: getattr(args, key) for key in FILTERS})
    print(format_runs(table, args.format))
    return 0


def cmd_status(args, _overrides) -> int:
    from hkdbench.benchmark.sweep.status import format_state_table, run_states
    from hkdbench.benchmark.core.store import RunStore

    specs, runs_dir, title = _status_specs(args)
    store = RunStore(runs_dir)
    print(f"{title}; run store {store.root}")
    print(format_state_table(run_states(specs, store), order=specs))
    names = {spec.name for spec in specs}
    for outputs in store.teacher_outputs():  # the stored teacher outputs of these runs' teacher runs
        if (outputs.manifest() or {}).get("made_by", {}).get("teacher", {}).get("run") in names:
            print(outputs.describe())
    return 0


def cmd_cancel(args, _overrides) -> int:
    """Stops the queued and running jobs of a sweep's runs through the executor that submitted each; every run keeps
    its last checkpoint, and the same sweep command later resumes them."""
    from hkdbench.benchmark.core.store import RunStore
    from hkdbench.benchmark.sweep.status import cancel, run_states

    specs, runs_dir, title = _status_specs(args)
    store = RunStore(runs_dir)
    jobs = cancel(run_states(specs, store), store)
    if not jobs:
        print(f"{title}: no queued or running job to cancel")
        return 0
    print(f"{title}: cancelled {len(jobs)} job(s): {', '.join(jobs)}. Each run keeps its last checkpoint; the same "
          "sweep command resumes them")
    return 0


def _status_specs(args):
    """(the runs, the run store, a title) of what ``status`` was given: a sweep directory, a sweep's id, or a preset
    expanded as the sweep would."""
    from pathlib import Path

    from hkdbench.benchmark.core.store import SWEEPS_DIR, RunStore, SweepDir
    from hkdbench.benchmark.sweep.preset import preset_names

    args.target, args.settings = preset_and_overrides(args.settings, "preset or sweep")
    if args.target is None:
        if not grid_of(args)["students"]:
            raise ConfigError("give a sweep (its directory or id), a preset, or an inline grid (--teachers A "
                              "--students B ...) as the sweep was given")
        return _expanded(None, args)
    target = Path(args.target)
    by_id = RunStore(args.runs_dir).sweep_dir(args.target)
    if not _exists(target) and "/" not in args.target and _exists(by_id.manifest_file):
        target = by_id.path  # a sweep named by its id, as the sweep printed it
    if _exists(SweepDir(target).manifest_file):
        manifest = SweepDir(target).manifest()
        return (_manifest_specs(SweepDir(target), manifest), args.runs_dir or manifest.get("runs_dir"),
                f"sweep {manifest.get('sweep', target.name)} ({target})")
    if _exists(target) and target.is_dir() and not target.suffix:
        raise ConfigError(f"{target} is not a sweep directory (no sweep.json); sweeps are under RUNS/{SWEEPS_DIR}/")
    if not _exists(target) and args.target not in preset_names() and not args.target.endswith((".yaml", ".yml")):
        raise ConfigError(f"unknown preset {args.target!r}, and no sweep of that id in the run store "
                          f"{by_id.path.parent.parent} (no {by_id.manifest_file}); shipped presets: "
                          f"{', '.join(preset_names())}, or a YAML file's path")
    return _expanded(args.target, args)


def _expanded(preset, args):
    """(the runs, the run store, a title) of a preset or inline grid, expanded as the sweep would."""
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset
    from hkdbench.methods import load_plugins

    load_plugins()  # a preset may name a plugin's method
    plan = expand(load_preset(preset, list(args.settings), grid_of(args)))
    return plan.runs, args.runs_dir, f"preset {plan.preset.name} (sweep {plan.sweep_id()})"


def _manifest_specs(sweep, manifest) -> list:
    """The run specs a sweep's manifest records; a config in it this version cannot read names the file."""
    from hkdbench.benchmark.core.config import run_config_from_dict
    from hkdbench.benchmark.core.errors import HkdbenchError, StoreError
    from hkdbench.benchmark.sweep.plan import RunSpec

    if "runs" not in manifest:
        raise StoreError(f"{sweep.manifest_file} lists no runs (no 'runs' field); submit the sweep again to rewrite it")
    try:
        return [RunSpec(run_config_from_dict(r["config"]), r["kind"], r.get("teacher_run"),
                        [tuple(c) for c in r.get("cells", [])]) for r in manifest["runs"]]
    except (HkdbenchError, TypeError) as err:
        message = err.message() if isinstance(err, HkdbenchError) else str(err)
        raise StoreError(f"{sweep.manifest_file} records a run this hkdbench cannot read ({message}); submit the "
                         "sweep again to rewrite it") from None


def _exists(path) -> bool:
    """Whether ``path`` exists; False for a path no filesystem can hold (a name too long, a NUL)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False
