"""The local Slurm cluster works with submitit as a real cluster would: results, arrays, states from sacct, cancel.

The jobs run ``sys.executable`` (this venv's python) on the local node; submitit's logs go to ``tmp_path``.
"""

from __future__ import annotations

import sys
import time

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

pytestmark = pytest.mark.usefixtures("slurm_cluster")

# The job's python cannot import this test module by name: ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

_UNFINISHED = {"UNKNOWN", "PENDING", "RUNNING", "COMPLETING", "REQUEUED", "READY", "PREEMPTED"}
WAIT_S = 60  # upper bound for any single job to finish; the usual is about 1 s


def _executor(folder, **params) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug", **params)
    return ex


def _wait_done(job: submitit.Job, timeout_s: float = WAIT_S) -> None:
    """job.result() has no timeout: poll so that a broken cluster fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s (state {job.state})")
        time.sleep(0.2)


def _wait_state(job: submitit.Job, predicate, timeout_s: float = WAIT_S) -> str:
    """Polls sacct (through submitit) until predicate(state) holds; returns the state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job.get_info(mode="force").get("State", "UNKNOWN")
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"job {job.job_id}: state still {state!r} after {timeout_s} s")
        time.sleep(0.2)


def _double_in_job(x):
    import os

    return 2 * x, os.environ.get("SLURM_JOB_ID")


def _square(x):
    return x * x


def _boom():
    raise ValueError("boom from the job")


def test_submit_returns_result_and_sacct_reports_completed(tmp_path):
    job = _executor(tmp_path).submit(_double_in_job, 21)
    _wait_done(job)
    value, slurm_job_id = job.result()
    assert value == 42
    assert slurm_job_id == job.job_id  # it really ran as a Slurm job
    # The result pickle is written before the job step ends, and sacct lags behind slurmctld: wait a moment.
    _wait_state(job, lambda s: s == "COMPLETED", timeout_s=15)
    assert job.state == "COMPLETED"


def test_map_array_returns_results_in_order(tmp_path):
    ex = _executor(tmp_path, slurm_array_parallelism=3)
    jobs = ex.map_array(_square, [1, 2, 3])
    assert len(jobs) == 3
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    for j in jobs:
        _wait_done(j)
    assert [j.result() for j in jobs] == [1, 4, 9]


def test_failing_job_raises_and_sacct_reports_failed(tmp_path):
    job = _executor(tmp_path).submit(_boom)
    _wait_done(job)
    with pytest.raises(FailedJobError, match="boom from the job"):
        job.result()
    # sacct lags behind the job (slurmctld sends its records to slurmdbd asynchronously): wait for a final state.
    assert _wait_state(job, lambda s: s not in _UNFINISHED, timeout_s=15) == "FAILED"


def test_cancelled_job_is_reported_cancelled(tmp_path):
    job = _executor(tmp_path).submit(time.sleep, 300)
    job._results_timeout_s = 0  # no result pickle will ever come: skip submitit's 15 s wait for it
    _wait_state(job, lambda s: s == "RUNNING", timeout_s=30)
    job.cancel(check=True)
    state = _wait_state(job, lambda s: s.startswith("CANCELLED"), timeout_s=15)
    assert state.startswith("CANCELLED")
    _wait_done(job, timeout_s=15)
    with pytest.raises(UncompletedJobError):
        job.result()
    assert job.state.startswith("CANCELLED")
