"""The import contracts of pyproject.toml ([tool.importlinter]) hold, checked by import-linter itself
(scripts/check_layers.py), and the check fails on a violation of each kind; the commands that only read the run
store run without torch."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import check_layers  # noqa: E402


def test_every_import_contract_is_kept():
    out = check_layers.check()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module,source,broken", [
    ("hkdbench.benchmark.core.upward", "from hkdbench.benchmark.engine import trainer\n", "is not allowed to import"),
    ("hkdbench.analysis.heavy", "import torch\n", "hkdbench.analysis.heavy -> torch"),
    ("hkdbench.benchmark.models.loop", "from hkdbench.benchmark.models import zoo\n", "No cycles"),
])
def test_a_violation_of_each_kind_is_caught(module, source, broken):
    extra = {module: source}
    if module.endswith(".loop"):  # zoo -> loop -> zoo
        extra["hkdbench.benchmark.models.zoo"] = ((REPO / "benchmark/models/zoo.py").read_text()
                                                  + "\nfrom hkdbench.benchmark.models import loop  # noqa\n")
    out = check_layers.check(extra)
    assert out.returncode == 1
    assert broken in out.stdout, out.stdout


HEAVY_BLOCKED = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "timm", "torchvision"}:
            raise ImportError(f"a store command imported {name}")
sys.meta_path.insert(0, Block())
from hkdbench.benchmark.cli.main import main
sys.exit(main(sys.argv[1:] + ["--debug"]))
"""


@pytest.mark.parametrize("command", [["status", "SWEEP"], ["collect", "--out", "OUT"], ["table", "--out", "OUT"],
                                     ["report", "--out", "OUT"], ["runs"]], ids=lambda c: c[0])
def test_a_command_that_reads_the_store_imports_no_torch(command, tmp_path):
    runs = REPO / "results" / "runs"
    sweep = sorted((runs / "_sweeps").iterdir())[0]
    argv = [{"SWEEP": str(sweep), "OUT": str(tmp_path)}.get(a, a) for a in command]
    if command[0] != "status":
        argv += ["--runs-dir", str(runs)]
    out = subprocess.run([sys.executable, "-c", HEAVY_BLOCKED, *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imported" not in out.stderr
