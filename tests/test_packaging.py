"""The wheel holds every module of the code folders under hkdbench.* (packages are found by setup.py, not listed),
the presets, the published cells, and the command's entry point."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("benchmark", "methods", "analysis")


def _source_files():
    files = {f"hkdbench/{p.relative_to(REPO / 'hkdbench')}" for p in (REPO / "hkdbench").rglob("*.py")}
    for folder in CODE_FOLDERS:
        for p in (REPO / folder).rglob("*"):
            if p.suffix in (".py", ".yaml", ".csv") and "__pycache__" not in p.parts:
                files.add(f"hkdbench/{p.relative_to(REPO)}")
    return files


def test_the_wheel_holds_every_module_and_preset(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources it builds
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "results", "build", "*.egg-info", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    wheel, = tmp_path.glob("hkdbench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _source_files()
    assert any(n.startswith("hkdbench/benchmark/presets/") for n in expected)
    assert "hkdbench/analysis/published.csv" in expected  # package data the report reads (--published ofa-kd)
    assert expected <= names, sorted(expected - names)
    assert "hkdbench/py.typed" in names  # PEP 561: the API's type hints reach the users' type checkers
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hkdbench = hkdbench.benchmark.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_torch_torchvision_and_timm_are_within_the_declared_bounds():
    """The bounds of pyproject.toml are the releases the suite passed on: a run of the suite on others must widen
    them on purpose (after the golden runs pass there), not slip past them."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    bounds = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    for name in ("torch", "torchvision", "timm"):
        assert bounds[name].filter([version(name)], prereleases=True), (name, version(name), str(bounds[name]))
        assert any(spec.operator == "<" for spec in bounds[name]), f"{name} has no upper bound"
