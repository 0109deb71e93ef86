"""Method plugins ($HKDBENCH_METHODS) everywhere (issue 12, bug b): in local-executor workers and in a job
unpickled by a process that never saw the variable (Slurm's path), and in the contract tests."""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hkdbench.benchmark.core.store import RunStore
from _support import LOGIT_MSE_PLUGIN

REPO = Path(__file__).resolve().parents[1]
TINY = {"train_subset": 64, "eval_subset": 64, "batch_size": 32, "img_size": 16}



@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "my_method.py"
    path.write_text(LOGIT_MSE_PLUGIN)
    return path


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "HKDBENCH_METHODS"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), **extra}


def test_the_contract_tests_collect_a_plugin_method(plugin):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                          "tests/test_contract.py"], cwd=REPO, env=_env(HKDBENCH_METHODS=str(plugin)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    collected = [line for line in out.stdout.splitlines() if "logit_mse" in line]
    # one step on each of the 25 family pairs, state-dict round trip, seed, deployed size, the task term's name
    assert len(collected) == 25 + 4, out.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
def test_a_plugin_method_trains_in_a_local_sweep(tmp_path, plugin):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "plugin", "recipe": "demo", "teachers": ["resnet_mini"], "students": ["vit_mini"],
        "methods": ["logit_mse"], "overrides": {"data": TINY, "train": {"epochs": 1}},
        "teacher_overrides": {"data": TINY, "train": {"epochs": 1}}}))
    runs = tmp_path / "runs"
    # a relative plugin path, as a user types it: the workers get it made absolute
    out = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", "sweep", str(preset), "--executor",
                          "local", "--runs-dir", str(runs)], cwd=tmp_path, env=_env(HKDBENCH_METHODS=plugin.name),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (student,) = [r for r in RunStore(runs).runs() if r.config().method == "logit_mse"]
    assert student.is_done and "loss/mse" in student.metrics()[0]


@pytest.mark.slow
@pytest.mark.usefixtures("fmnist_available")
def test_a_pickled_job_loads_its_plugins_where_the_variable_is_unset(tmp_path, plugin, monkeypatch):
    """What a Slurm node does: unpickle the RunJob and call it, in a process whose environment may lack
    HKDBENCH_METHODS (here: it is removed)."""
    from hkdbench.benchmark.sweep.job import RunJob
    from hkdbench.benchmark.recipes.resolve import resolve_run_config
    from hkdbench.methods import load_plugins, unregister_method

    monkeypatch.setenv("HKDBENCH_METHODS", str(plugin))
    load_plugins()
    try:
        overrides = [f"data.{k}={v}" for k, v in TINY.items()] + ["train.epochs=1"]
        cfg = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="logit_mse",
                                 recipe="demo", overrides=overrides, teacher_overrides=overrides)
        job_file = tmp_path / "job.pkl"
        job_file.write_bytes(pickle.dumps(RunJob(cfg.to_dict(), str(tmp_path / "runs"))))
    finally:
        unregister_method("logit_mse")
    code = "import pickle, sys; print(pickle.load(open(sys.argv[1], 'rb'))())"
    out = subprocess.run([sys.executable, "-c", code, str(job_file)], env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "'status': 'done'" in out.stdout
    assert RunStore(tmp_path / "runs").run_dir(cfg).is_done
