"""The ``hkdbench`` command line: parses (cli/arguments.py), runs the subcommand (cli/run_commands.py, or
cli/store_commands.py for those that only read the run store) and turns any error into one line and an exit code."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

from hkdbench.benchmark.cli.arguments import DEBUG_ENV, DEBUG_FLAG, build_parser, overrides
from hkdbench.benchmark.core.errors import HkdbenchError

# Exit codes: 0 done; 1 the command could not finish its work (a sweep's run failed, out of memory); 2 bad input or
# a file or store state the message names; 3 a run diverged (train); 70 a bug (sysexits' EX_SOFTWARE); 128 + N a
# stop by signal N.
EXIT_BUG = 70


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _print_any_path()
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    # --debug is taken anywhere on the line, so that "rerun with --debug" means: append it
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage error (2) or the help (0)
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = argv  # the command line as given, for provenance (sweep manifests)
    prefix = f"hkdbench {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(prefix)
        try:
            return _dispatch(args)
        except (KeyboardInterrupt, Exception) as err:  # noqa: BLE001 -- every error ends here, judged by its kind
            return report_error(prefix, err, debug)


def _print_any_path() -> None:
    """A path is bytes: one that is not UTF-8 (surrogate-escaped by Python) is printed as those bytes, where a
    strict stdout would fail the command on printing it."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="surrogateescape")


def _warning_printer(prefix: str):
    """A warning (a damaged file skipped, a setting ignored) as one line, as an error is, and each text once (a
    file read by two readers is warned about once)."""
    seen = set()

    def show(message, *_args, **_kwargs) -> None:
        if str(message) not in seen:
            seen.add(str(message))
            print(f"{prefix}: warning: {message}", file=sys.stderr)
    return show


def report_error(prefix: str, err: BaseException, debug: bool = False) -> int:
    """Prints what went wrong in one line (with ``debug``, after the traceback) and returns the exit code: 2 for an
    expected error (:class:`HkdbenchError`, a write the store cannot take), 130 for Ctrl-C, 1 for a lack of memory,
    :data:`EXIT_BUG` for anything else: a bug, never passed off as bad input."""
    from hkdbench.benchmark.core.store import WRITE_ERRNOS, describe_write_error

    if debug:
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    if isinstance(err, BrokenPipeError):  # the reader went away (`hkdbench runs | head`): nothing left to say
        with contextlib.suppress(OSError, ValueError):  # Python's own flush at exit would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a shell reports a process ended by SIGPIPE
    if isinstance(err, KeyboardInterrupt):
        print(f"{prefix}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    if isinstance(err, HkdbenchError):
        print(f"{prefix}: error: {err.message()}", file=sys.stderr)
        return 2
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:  # a write the store's own checks did not see coming
        print(f"{prefix}: error: {describe_write_error(err.filename or '?', err)}", file=sys.stderr)
        return 2
    if _out_of_memory(err):
        print(f"{prefix}: out of memory: {_first_line(err)}. Lower data.batch_size, data.eval_batch_size or "
              "data.img_size (a stopped run resumes with --resume)", file=sys.stderr)
        return 1
    print(f"{prefix}: internal error: {type(err).__name__}: {_first_line(err)}{_where(err)}. This is a bug, not bad "
          f"input: rerun with {DEBUG_FLAG} (or {DEBUG_ENV}=1) for the traceback and report it", file=sys.stderr)
    return EXIT_BUG


def _where(err: BaseException) -> str:
    """`` (at module:line in function)`` of the innermost frame of hkdbench's own code the error passed through."""
    frames = [(frame, line) for frame, line in traceback.walk_tb(err.__traceback__)]
    ours = [(f, n) for f, n in frames if f.f_globals.get("__name__", "").startswith("hkdbench.")]
    if not (ours or frames):
        return ""
    frame, line = (ours or frames)[-1]
    where = frame.f_globals.get("__name__") if ours else os.path.basename(frame.f_code.co_filename)
    return f" (at {where}:{line} in {frame.f_code.co_name})"


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["(no message)"])[0]


def _out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never imported for this check
    return isinstance(err, MemoryError) or (torch is not None and isinstance(err, torch.cuda.OutOfMemoryError))


# What reads only the run store (no model, no method): these never import torch, so they answer at once
STORE_COMMANDS = ("collect", "table", "plot", "report", "status", "cancel", "runs")


def _dispatch(args) -> int:
    if args.command in STORE_COMMANDS:
        from hkdbench.benchmark.cli import store_commands as commands
    else:
        from hkdbench.benchmark.cli import run_commands as commands
        from hkdbench.methods import load_plugins

        load_plugins()
    command = getattr(commands, f"cmd_{args.command.replace('-', '_')}")
    return command(args, overrides if hasattr(args, "overrides") else None)


if __name__ == "__main__":
    sys.exit(main())
