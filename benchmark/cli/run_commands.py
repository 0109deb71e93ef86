"""The ``hkdbench`` subcommands that build models or train: train, teacher, config, demo, eval, export, overhead,
sweep, and the listings of models, recipes and methods."""
from __future__ import annotations

import shlex
import signal
import sys
import time
from typing import List, Optional, Sequence

from hkdbench.benchmark.cli.arguments import grid_of, preset_and_overrides, slurm_settings
from hkdbench.benchmark.core.config import ConfigError, RunConfig
from hkdbench.benchmark.recipes.resolve import RECIPES, RunRequest


def cmd_train(args, overrides) -> int:
    from hkdbench.benchmark.engine.trainer import train, train_cohort

    if args.resume and args.restart:
        raise ConfigError("--resume and --restart exclude each other")
    cfgs = checked_configs(run_request(args, overrides), _method_list(args.method), args.device)
    if args.dry_run:
        return _dry_run(cfgs, args)
    if len(cfgs) == 1:
        return _train_until_done_or_stopped(lambda **kw: [train(cfgs[0], **kw)], args)
    return _train_until_done_or_stopped(lambda **kw: train_cohort(cfgs, **kw), args)


def run_request(args, overrides) -> RunRequest:
    """What ``train``, ``teacher`` or ``config`` asks for: the config file (-c), then the flags, then the key=value
    overrides."""
    kind = "teacher" if args.command == "teacher" else "student"
    if args.command == "config":
        kind = _config_kind(args)
    request = RunRequest.from_file(args.config, kind)
    if kind == "teacher":
        request.given(student=args.model, pretrained=args.pretrained, dataset=args.dataset, recipe=args.recipe)
    else:
        request.given(student=args.student, teacher=args.teacher, dataset=args.dataset, recipe=args.recipe,
                      teacher_checkpoint=args.teacher_checkpoint, teacher_recipe=args.teacher_recipe,
                      teacher_weights=args.teacher_weights, teacher_pretrained=args.teacher_pretrained)
    return request.with_overrides(overrides(args))


def _config_kind(args) -> str:
    """The kind of run ``hkdbench config`` shows: a teacher run with --model, else the config file's kind."""
    from hkdbench.benchmark.core.config import load_config_file

    student_flags = [f"--{name.replace('_', '-')}" for name in ("student", "teacher", "method", "teacher_checkpoint",
                                                                 "teacher_pretrained", "teacher_recipe",
                                                                 "teacher_weights") if getattr(args, name)]
    if args.model or args.pretrained:
        if student_flags:
            raise ConfigError(f"--model (a teacher run) excludes a student run's {', '.join(student_flags)}")
        return "teacher"
    body = load_config_file(args.config) if args.config and not student_flags else {}
    return "teacher" if body.get("kind") == "teacher" else "student"


def _dry_run(cfgs, args) -> int:
    """Prints what the command would train (engine/plan.py); writes nothing. It fails where the training would,
    before any training: a probe teacher run missing, a checkpoint without --resume or --restart."""
    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.engine.plan import format_plan, plan_runs
    from hkdbench.benchmark.engine.trainer import check_probe_teachers, unfinished_run_error
    from hkdbench.benchmark.core.store import RunStore

    select_device(args.device)  # a device this machine lacks fails here as the training would
    store = RunStore(args.runs_dir)
    check_probe_teachers(cfgs, store)
    runs = plan_runs(cfgs, store, resume=args.resume, restart=args.restart)
    print(format_plan(runs, store))
    refused = [r for r in runs if r.refused]
    if refused:
        raise unfinished_run_error(store.run_dir(refused[0].cfg))
    return 0


def _method_list(given) -> list:
    """``--method`` values (repeated, or comma lists) in order, each once; [None] when none is given (the config
    file's method, else kd)."""
    methods = []
    for item in given or []:
        for name in item.split(","):
            if name.strip() and name.strip() not in methods:
                methods.append(name.strip())
    if given and not methods:
        raise ConfigError("--method needs a method name (see `hkdbench methods`)")
    return methods or [None]


def _train_until_done_or_stopped(train_runs, args) -> int:
    """Trains (one run, or a cohort's); on SIGTERM/SIGINT every run saves a checkpoint and the exit code is 128 +
    the signal's number; 3 when a run failed (diverged)."""
    from hkdbench.benchmark.engine.stopping import stop_signals
    from hkdbench.benchmark.engine.trainer import TeacherUnavailableError

    with stop_signals() as stops:
        try:
            results = train_runs(runs_dir=args.runs_dir, resume=args.resume, restart=args.restart,
                                 device=args.device, should_stop=stops.requested)
        except TeacherUnavailableError:
            if not stops.requested():
                raise
            results = None  # stopped while training the teacher: its own run holds the checkpoint
        except KeyboardInterrupt:  # a second Ctrl-C: no step finished, no checkpoint written
            print(f"hkdbench {args.command}: aborted by a second Ctrl-C without saving; every run keeps its last "
                  "checkpoint (the steps since are lost). Continue with the same command and --resume",
                  file=sys.stderr)
            return 128 + signal.SIGINT
    if stops.requested() and (results is None or any(r.status == "interrupted" for r in results)):
        where = (" in " + ", ".join(str(r.run_dir.path) for r in results if r.status == "interrupted")
                 if results is not None else " of the teacher's run")
        print(f"hkdbench {args.command}: stopped by {signal.Signals(stops.signum).name}; checkpoint saved{where}. "
              "Continue with the same command and --resume", file=sys.stderr)
        return stops.exit_code
    for r in results:
        if r.status == "failed":
            print(f"hkdbench {args.command}: {r.run_dir.path.name} FAILED: {r.reason}", file=sys.stderr)
    return 0 if all(r.status == "done" for r in results) else 3


def cmd_teacher(args, overrides) -> int:
    from hkdbench.benchmark.engine.trainer import train

    if args.resume and args.restart:
        raise ConfigError("--resume and --restart exclude each other")
    (cfg,) = checked_configs(run_request(args, overrides), [None], args.device)
    if args.dry_run:
        return _dry_run([cfg], args)
    return _train_until_done_or_stopped(lambda **kw: [train(cfg, **kw)], args)


def cmd_teacher_outputs(args, overrides) -> int:
    """Computes (or with --dry-run describes) the stored teacher outputs that ``train`` with the same options and
    ``train.teacher_outputs=stored`` would read: one set per cohort of the methods asked for."""
    from hkdbench.benchmark.core.store import RunStore
    from hkdbench.benchmark.engine.cohort import group_cohorts, reads_stored
    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.engine.teacher_outputs import describe_outputs
    from hkdbench.benchmark.engine.trainer import compute_teacher_outputs

    request = run_request(args, overrides).with_overrides(["train.teacher_outputs=stored"])
    cfgs = checked_configs(request, _method_list(args.method), args.device)
    cohorts = [g for g in group_cohorts(cfgs) if any(reads_stored(c) for c in g)]
    if not cohorts:
        compute_teacher_outputs(cfgs, args.runs_dir, args.device)  # says why none of them can
    for cohort in cohorts:
        if args.dry_run:
            print(describe_outputs(cohort, RunStore(args.runs_dir), select_device(args.device)))
        else:
            outputs = compute_teacher_outputs(cohort, args.runs_dir, args.device)
            print(f"teacher outputs: {outputs.folder.path} ({len(outputs.manifest()['shards'])} epochs stored)")
    return 0


def cmd_config(args, overrides) -> int:
    """Prints each resolved run config (one per --method) with every field's value, default and help."""
    from hkdbench.benchmark.cli.config_listing import format_config

    request = run_request(args, overrides)
    methods = _method_list(args.method) if request.kind == "student" else [None]
    print("\n\n".join(format_config(request.resolve(method), args.format) for method in methods))
    return 0


def checked_configs(request: RunRequest, methods: Sequence[Optional[str]], device: Optional[str]) -> List[RunConfig]:
    """The configs of ``request`` (one per method: a cohort when several), each checked before anything is built or
    written (its data, the device, the tracker); a cohort's student alone probed against its teacher. The command
    line and the Python API (hkdbench.api) train through this."""
    from hkdbench.benchmark.engine.cohort import check_cohort, probing_the_cohorts_teacher

    cfgs = [request.resolve(method) for method in methods]
    for cfg in cfgs:
        check_before_training(cfg, device)
    if len(cfgs) > 1:
        check_cohort(cfgs)
        cfgs = probing_the_cohorts_teacher(cfgs)
    return cfgs


def check_before_training(cfg: RunConfig, device: Optional[str]) -> None:
    """Fails before anything is built or written: missing data, a device or tracker this machine lacks."""
    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.engine.preflight import check_on_device, check_run_inputs
    from hkdbench.benchmark.engine.tracking import check_tracker_available

    check_run_inputs(cfg)
    check_on_device(cfg, select_device(device))
    check_tracker_available(cfg.train.log)
    if cfg.kind == "teacher":
        from hkdbench.benchmark.models.pretrained import warn_scratch_imagenet_teacher

        warn_scratch_imagenet_teacher(cfg)


def cmd_models(args, _overrides) -> int:
    from hkdbench.benchmark.models.zoo import create_model, zoo

    print(f"{'model':<16} {'family':<9} {'img':>4} {'crop':>5}  description")
    for name, entry in zoo().items():
        print(f"{name:<16} {entry.family:<9} {entry.img_size:>4} {entry.crop_pct:>5}  {entry.description}")
        if args.stages:
            model = create_model(name, num_classes=100, in_chans=3)
            for s, info in model.stage_info.items():
                print(f"{'':<16}   stage {s}: {info.layout:<6} {tuple(info.shape)} grid {info.grid}"
                      f"{f' +{info.num_prefix} prefix' if info.num_prefix else ''}")
    return 0


def cmd_recipes(args, _overrides) -> int:
    from hkdbench.benchmark.data.loaders import color_jitter_note

    from hkdbench.benchmark.recipes.resolve import AUTO_RECIPES, RUNS_VARIANTS

    print("auto, by dataset (CNN students / the others): "
          + "; ".join(f"{d}: {r['cnn']} / {r['other']}" for d, r in AUTO_RECIPES.items()))
    for name, body in RECIPES.items():
        o, d, t = body["optim"], body["data"], body["train"]
        extras = [k for k in ("auto_augment", "mixup", "cutmix", "reprob") if d.get(k)]
        jitter_note = color_jitter_note(d.get("color_jitter", 0.0), d.get("auto_augment"))
        sched = o.get("sched", "cosine") + (f" every {o['decay_epochs']}" if o.get("sched") == "step" else "")
        stepping = "per update" if o.get("sched_on_updates") else "per epoch"
        print(f"{name}: {o['name']} lr {o['lr']} wd {o['weight_decay']} {sched} ({stepping}) "
              f"warmup {o['warmup_epochs']} "
              f"epochs {t['epochs']} batch {d['batch_size']}/process img {d['img_size']} ({d['pipeline']}, "
              f"train interpolation {d.get('train_interpolation', 'bilinear')}, "
              f"eval {d.get('eval_interpolation', 'bilinear')})"
              f"{' + ' + ', '.join(extras) if extras else ''}{'; ' + jitter_note if jitter_note else ''}")
    print("the authors' runs (auto-ofa-runs / auto-pat-runs pick one by student family, as auto does):")
    for name, variant in RUNS_VARIANTS.items():
        changes = " ".join(f"{key}={value}" for key, (value, _source) in variant.changes.items())
        print(f"{name}: {variant.base} with {changes}")
    return 0


def cmd_methods(args, _overrides) -> int:
    from hkdbench.methods import list_methods, method_source

    for name, cls in list_methods().items():
        fields = ", ".join(f"{k}={v}" for k, v in cls.config_fields().items())
        source = method_source(name)
        where = "" if source["code"].startswith("v") else f" from {source['file']}"  # a plugin: which file
        print(f"{name:<8} {cls.paper} [code {source['code']}{where}]\n{'':<8} {fields}")
    if args.pair:
        print()
        print_method_costs(*args.pair, args.num_classes)
    return 0


def print_method_costs(teacher: str, student: str, num_classes: int) -> None:
    from hkdbench.benchmark.tools.overhead import method_costs

    costs = method_costs(teacher, student, num_classes)
    print(f"train-time cost for {teacher} -> {student} at {costs['img_size']}px, {num_classes} classes "
          f"(student alone: {costs['student_params'] / 1e6:.2f}M params)")
    print(f"{'method':<8} {'extra params':>13} {'extra MB (w+g+adam)':>20} {'buffers MB':>11}")
    print(f"(buffers of per-sample methods such as crd: for a training set of {costs['train_set_size']} images)")
    for name, c in costs["methods"].items():
        if "unsupported" in c:
            print(f"{name:<8} not supported for this pair: {c['unsupported']}")
        else:
            print(f"{name:<8} {c['extra_params'] / 1e6:>12.3f}M {c['extra_train_mb']:>20.1f} {c['buffers_mb']:>11.2f}")


def cmd_demo(args, _overrides) -> int:
    from hkdbench.benchmark.engine.demo import run_demo

    return run_demo(runs_dir=args.runs_dir, device=args.device, quick=args.quick)


def cmd_overhead(args, _overrides) -> int:
    from hkdbench.analysis.overhead_table import print_overhead_table
    from hkdbench.benchmark.tools.overhead import run_overhead

    results = run_overhead(args.teacher, args.student, methods=args.methods, batch_size=args.batch_size,
                 img_size=args.img_size, warmup=args.warmup, repeats=args.repeats, device=args.device,
                 runs_dir=args.runs_dir, num_classes=args.num_classes, precision=args.precision,
                 restart=args.restart, compile=args.compile)
    print_overhead_table(results)
    return 0


def cmd_sweep(args, _overrides) -> int:
    from hkdbench.benchmark.sweep.dispatch import Sweep
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset

    preset_arg, args.settings = preset_and_overrides(args.settings)
    grid = grid_of(args)
    if preset_arg is None and not grid["students"]:
        raise ConfigError("give a preset (demo, cifar100-ofa, cifar100-pat, imagenet-ofa or a YAML file) or an "
                          "inline grid (--teachers A,B --students C --methods kd,ofa --seeds 0,1)")
    kept = ["train.keep_checkpoint=true"] if args.keep_checkpoints else []
    preset = load_preset(preset_arg, [*args.settings, *kept, *slurm_settings(args)], grid)
    start = time.time()
    plan = expand(preset)
    from hkdbench.benchmark.engine.tracking import check_tracker_available

    for kind in sorted({r.cfg.train.log for r in plan.runs}):  # before anything is submitted or written
        check_tracker_available(kind)
    sweep = Sweep(plan, runs_dir=args.runs_dir, device=args.device, cohort=args.cohort)
    if args.dry_run:
        sweep.dry_run(args.executor, args.retry_failed)
        return 0
    result = sweep.run(args.executor, retry_failed=args.retry_failed, parallel=args.parallel, wait=args.wait,
                       command=shlex.join(["hkdbench", *args.argv]), check_inputs=not args.no_input_check)
    if args.executor != "slurm" or args.wait:
        from hkdbench.benchmark.sweep.status import format_state_table, run_states

        print()
        print(format_state_table(run_states(plan.runs, sweep.store), order=plan.runs))
        print(f"\nwall time {time.time() - start:.0f} s; sweep dir {result.sweep_dir}")
        return result.exit_code
    return 0


def cmd_eval(args, _overrides) -> int:
    from hkdbench.benchmark.engine.eval_run import evaluate_run

    items = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    results = evaluate_run(args.run, weights=args.weights, ema=args.ema, teacher=args.teacher, overrides=items,
                           device=args.device)
    for role, r in results.items():
        print(f"{role}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f} loss {r['loss']:.4f} ({r['weights']})")
    return 0


def cmd_export(args, _overrides) -> int:
    from hkdbench.benchmark.engine.export import export_run

    print(f"wrote {export_run(args.run, args.format, out=args.out, weights=args.weights, ema=args.ema)}")
    return 0
