"""The one base of the errors hkdbench expects and explains.

Bad input (an argument, a config field, a preset, a path), a damaged or missing file, a state of the run store the
user must resolve (a run locked by another process, a checkpoint without ``--resume``), a run that diverged: each
is raised as a subclass of :class:`HkdbenchError` whose message says what is wrong and what is allowed or what to
do. The CLI prints that message alone and exits 2. Any other exception that reaches the CLI is a bug, reported as
one (exit 1), never dressed up as bad input. Each subclass also keeps the builtin base its callers catch it by
(``ValueError``, ``KeyError``, ``FileNotFoundError``, ``RuntimeError``).

Torch-free and import-free: every layer may raise these.
"""
from __future__ import annotations


class HkdbenchError(Exception):
    """An expected error whose message is the whole story for the user (no traceback needed)."""

    def message(self) -> str:
        """The text to show: ``str()`` of a KeyError would quote it, so take its argument."""
        return str(self.args[0]) if isinstance(self, KeyError) and self.args else str(self)


class StoreError(HkdbenchError):
    """The run store, or a file in it, cannot be used as it is: a path that is not a folder, a name too long for
    the filesystem, a file that does not hold what the store wrote there."""
