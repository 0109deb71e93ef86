"""Fixtures for the tests that submit real jobs to a local single-node Slurm cluster through submitit.

``slurm_cluster`` (session scope) uses a cluster that already answers ``scontrol ping``; otherwise, as root with
apt-get available, it starts one with ``scripts/slurm/start.sh`` and stops it with ``scripts/slurm/stop.sh`` at the
end of the session. When neither is possible the tests are skipped, except with ``CI=true``, where they fail.
Every test in this directory is marked ``slurm`` (deselect them with ``-m "not slurm"``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SCRIPTS = HERE.parents[1] / "scripts" / "slurm"
START_TIMEOUT_S = 900  # a cold start installs about 30 Debian packages
STOP_TIMEOUT_S = 120


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE == Path(item.path).resolve().parent or HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    started_here: bool  # True when this session started it (and stops it at teardown)
    cpus: int  # CPUs of the (single) node


def _ping() -> tuple[bool, str]:
    if shutil.which("sbatch") is None:
        return False, "sbatch not found on PATH"
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"scontrol ping failed: {exc}"
    if r.returncode == 0 and "is UP" in r.stdout:
        return True, r.stdout.strip()
    # When down, scontrol prints a banner of asterisks around the line that matters.
    lines = [ln.strip() for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and not ln.startswith("*")]
    return False, f"scontrol ping: {lines[0] if lines else f'exit status {r.returncode}'}"


def _node_cpus() -> int:
    r = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, timeout=20)
    try:
        return int(r.stdout.split()[0].rstrip("+"))
    except (IndexError, ValueError):
        return 0


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but no Slurm cluster is available: {reason}", pytrace=False)
    pytest.skip(f"no Slurm cluster: {reason}")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def slurm_cluster():
    up, why = _ping()
    if up:
        yield SlurmCluster(started_here=False, cpus=_node_cpus())
        return
    if os.geteuid() != 0:
        _unavailable(f"{why}; and not root, so scripts/slurm/start.sh cannot start one")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        _unavailable(f"{why}; and apt-get is not available to install the Slurm packages")

    try:
        r = subprocess.run(
            ["bash", str(SCRIPTS / "start.sh")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(["bash", str(SCRIPTS / "stop.sh")], capture_output=True, timeout=STOP_TIMEOUT_S)
        pytest.fail(f"scripts/slurm/start.sh did not finish within {exc.timeout} s", pytrace=False)
    if r.returncode != 0:
        pytest.fail(
            f"scripts/slurm/start.sh failed (exit status {r.returncode}):\n{_tail(r.stdout)}\n{_tail(r.stderr)}",
            pytrace=False,
        )
    up, why = _ping()
    if not up:
        pytest.fail(f"scripts/slurm/start.sh succeeded but the cluster does not answer: {why}", pytrace=False)
    try:
        yield SlurmCluster(started_here=True, cpus=_node_cpus())
    finally:
        s = subprocess.run(
            ["bash", str(SCRIPTS / "stop.sh")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STOP_TIMEOUT_S,
        )
        if s.returncode != 0:
            print(f"scripts/slurm/stop.sh failed (exit status {s.returncode}):\n{s.stdout}\n{s.stderr}")
