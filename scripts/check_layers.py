"""Checks the import contracts of pyproject.toml ([tool.importlinter]: the layers, and what the ground and the
analysis may not import) with import-linter.

import-linter reads a package from its folder on disk, but the code folders (benchmark/, methods/, analysis/) sit at
the top of the repository and install under hkdbench.* by a mapping (setup.py). So the check runs on a mirror: a
temporary hkdbench/ tree holding copies of the sources, imported ahead of the installed package.

    python scripts/check_layers.py [--add MODULE=SOURCE ...]

--add puts an extra module into the mirror (the test uses it to show that a violation is caught). Exit status is
lint-imports' own: 0 when every contract is kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("benchmark", "methods", "analysis")


def build_mirror(root: Path) -> Path:
    """hkdbench/ with the code folders' .py files copied under it, as the installed package lays them out."""
    package = root / "hkdbench"
    shutil.copytree(REPO / "hkdbench", package, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in CODE_FOLDERS:
        shutil.copytree(REPO / folder, package / folder, ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return package


def add_module(package: Path, dotted: str, source: str) -> None:
    path = package.parent.joinpath(*dotted.split(".")).with_suffix(".py")
    path.write_text(source)


def check(extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="hkdbench-layers-") as tmp:
        package = build_mirror(Path(tmp))
        for dotted, source in (extra or {}).items():
            add_module(package, dotted, source)
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = Path(sys.executable).with_name("lint-imports")
        return subprocess.run([str(lint), "--no-logo", "--no-cache", "pyproject.toml"], cwd=tmp, env=env,
                              capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--add", action="append", default=[], metavar="MODULE=SOURCE",
                   help="an extra module for the mirror, e.g. hkdbench.benchmark.core.bad='import torch'")
    args = p.parse_args()
    extra = dict(item.split("=", 1) for item in args.add)
    out = check(extra)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
