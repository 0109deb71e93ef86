"""The documentation site (issue 23, item 2): it builds with `mkdocs build --strict` (a broken link or anchor fails),
its generated reference pages are those the sources give now, and every config field and CLI option is on them."""
import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hkdbench.benchmark.cli.arguments import build_parser
from hkdbench.benchmark.core.config import field_docs

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
sys.path.insert(0, str(ROOT / "scripts"))
import gen_reference  # noqa: E402 -- a script, not a package

pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]'; scripts/bootstrap.sh installs it)")


def _build(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           str(project / "mkdocs.yml"), "-d", str(site)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_the_site_builds_strictly(tmp_path):
    built = _build(ROOT, tmp_path / "site")
    assert built.returncode == 0, built.stdout + built.stderr
    for page in ("index.html", "getting-started/index.html", "reference/config-fields/index.html",
                 "how-to/papers-on-gpus/index.html"):
        assert (tmp_path / "site" / page).exists(), page


@pytest.mark.parametrize("broken", ["[the recipes](reference/recipes.md#no-such-section)", "[a page](no-such-page.md)"])
def test_a_broken_link_or_anchor_fails_the_build(tmp_path, broken):
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    index = project / "docs" / "index.md"
    index.write_text(index.read_text() + f"\nSee {broken}.\n")
    built = _build(project, tmp_path / "site")
    assert built.returncode != 0 and "no-such" in built.stdout + built.stderr


def test_the_generated_pages_are_current():
    assert gen_reference.stale_pages() == [], "run: python scripts/gen_reference.py"


def test_every_config_field_is_on_its_page_with_its_help():
    page = (REFERENCE / "config-fields.md").read_text()
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    docs = field_docs()
    assert docs and set(rows) == {doc.key for doc in docs}
    for doc in docs:
        assert " ".join(doc.help.split()) in rows[doc.key].replace("\\|", "|"), doc.key


def test_every_command_and_option_is_on_the_cli_page():
    page = (REFERENCE / "cli.md").read_text()
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        section = page.split(f"\n## hkdbench {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            for flag in action.option_strings:
                assert f"`{flag}" in section, f"{name} {flag}"


def test_a_stale_page_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(gen_reference, "DOCS", tmp_path)
    assert gen_reference.main([]) == 0 and gen_reference.stale_pages() == []
    fields = tmp_path / "config-fields.md"
    fields.write_text(fields.read_text().replace("| `train.epochs` |", "| `train.epochz` |"))
    assert gen_reference.stale_pages() == ["config-fields.md"] and gen_reference.main(["--check"]) == 1


# README.md: what a newcomer needs first, every command in it run by a test (or by CI itself)
README = ROOT / "README.md"
README_COMMANDS = {
    "bash scripts/demo.sh": "test_the_readme_demo_prints_what_the_readme_shows (with --quick)",
    "bash scripts/test.sh": ".ci/run",
    ".venv/bin/mkdocs build --strict": "test_the_site_builds_strictly",
    ".venv/bin/python scripts/check_layers.py": "tests/test_layers.py",
}


def _readme_commands() -> set:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = {line.split("#")[0].strip() for block in blocks for line in block.splitlines()}
    inline = set(re.findall(r"(?<!`)`((?:bash |\.venv/bin/|hkdbench )[^`\n]*)`(?!`)", text))
    return (lines | inline) - {""}


def test_the_readme_is_short_and_runs_only_tested_commands():
    assert len(README.read_bytes()) < 15_000
    assert _readme_commands() == set(README_COMMANDS)
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "scripts/check_layers.py" in (ROOT / "tests" / "test_layers.py").read_text()


def test_the_readme_links_only_to_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        assert (ROOT / target).exists(), target


def _masked(line: str, runs: str) -> str:
    """A line of the demo's output without what a run's size changes: hashes, numbers, the runs directory."""
    line = line.replace(runs, "RUNS").replace("runs in runs", "runs in RUNS")
    line = re.sub(r"_[0-9a-f]{12}\b", "_HASH", line)
    return re.sub(r"[+-]?\d+(\.\d+)?", "N", line)


@pytest.mark.slow
def test_the_readme_demo_prints_what_the_readme_shows(fmnist_available, tmp_path):
    runs = str(tmp_path / "runs")
    done = subprocess.run(["bash", "scripts/demo.sh", "--quick", "--runs-dir", runs], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = {_masked(line, runs) for line in done.stdout.splitlines()}
    shown = README.read_text().split("## What the demo prints", 1)[1]
    shown = re.search(r"```\n(.*?)```", shown, re.S).group(1)
    for line in shown.splitlines():
        if line.strip() and line != "...":
            assert _masked(line, runs) in printed, line
