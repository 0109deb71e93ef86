"""``hkdbench runs`` (issue 23, item 3): the store listed in the terminal, each run's method, pair, setting, seed,
state, epoch, last and best top-1 and age; filters; table, CSV or JSON; torch-free (tests/test_layers.py)."""
import io
import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.cli.runs_listing import _age
from hkdbench.benchmark.core.store import RunDir, RunStore

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    """The committed results store's kd runs and its teacher runs, plus one run in each other state:
    a copy of a done run left partial (its checkpoint, one epoch), pending (its config only), failed, and one whose
    lock a process holds."""
    source = REPO / "results" / "runs"
    runs = tmp_path / "runs"
    runs.mkdir()
    names = [p.name for p in source.iterdir() if p.name.startswith(("kd_", "teacher_"))]
    for name in names:
        shutil.copytree(source / name, runs / name)
    done = RunDir(runs / sorted(n for n in names if n.startswith("kd_") and "_to_resnet_mini_" in n)[0])
    for state in ("partial", "pending", "failed", "running"):
        rd = RunDir(runs / f"{state}_copy")
        rd.path.mkdir()
        shutil.copy(done.config_file, rd.config_file)
        if state in ("partial", "running"):
            rd.checkpoint_file.write_bytes(b"")
            rd.metrics_file.write_text(done.metrics_file.read_text().splitlines()[0] + "\n")
        if state == "failed":
            rd.mark_failed("loss is nan at epoch 1 step 3")
    return runs, done


def _listing(capsys, *argv):
    assert main(["runs", *argv]) == 0
    return capsys.readouterr().out


def test_every_run_with_its_state_and_accuracies(store, capsys):
    runs, done = store
    table = pd.read_csv(io.StringIO(_listing(capsys, "--runs-dir", str(runs), "--format", "csv")))
    assert len(table) == len(RunStore(runs).runs())
    by_run = table.set_index("run")
    summary, config = done.summary(), json.loads(done.config_file.read_text())
    epochs = config["train"]["epochs"]
    row = by_run.loc[done.path.name]
    assert (row["method"], row["pair"], row["dataset"], row["setting"], row["seed"], row["status"], row["epoch"]) == \
        ("kd", f"{config['teacher']['name']} -> resnet_mini", "fashion-mnist", config["recipe"], summary["seed"],
         "done", f"{epochs}/{epochs}")
    assert (row["last_top1"], row["best_top1"]) == (summary["last_top1"], summary["best_top1"])
    first = json.loads(done.metrics_file.read_text().splitlines()[0])
    assert by_run.loc["partial_copy", ["status", "epoch", "last_top1"]].tolist() == \
        ["partial", f"1/{epochs}", first["top1"]]
    assert by_run.loc["pending_copy", ["status", "epoch"]].tolist() == ["pending", f"0/{epochs}"]
    # not started, it has no pipeline version yet: unknown, which sets no label apart (the done run's is plain kd too)
    assert by_run.loc["pending_copy", "method"] == "kd"
    assert pd.isna(by_run.loc["pending_copy", "last_top1"])
    assert by_run.loc["failed_copy", "status"] == "failed"
    teacher = next(r for r in table.itertuples() if r.run.startswith("teacher_resnet_mini"))
    assert (teacher.method, teacher.pair) == ("(teacher run)", "resnet_mini")


def test_a_run_another_process_trains_is_running(store, capsys):
    runs, _ = store
    held, release = threading.Event(), threading.Event()

    def hold():
        with RunDir(runs / "running_copy").lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        held.wait(30)
        out = json.loads(_listing(capsys, "--runs-dir", str(runs), "--format", "json", "--status", "running"))
    finally:
        release.set()
        thread.join()
    assert [r["run"] for r in out] == ["running_copy"]


@pytest.mark.parametrize("filters,expected", [
    (["--method", "teacher"], lambda r: r["run"].startswith("teacher_")),
    (["--student", "resnet_mini", "--method", "kd"], lambda r: r["pair"].endswith("-> resnet_mini")),
    (["--teacher", "mixer_mini,vit_mini", "--status", "done"],  # their teacher runs too
     lambda r: r["pair"].split(" -> ")[0] in ("mixer_mini", "vit_mini") and r["status"] == "done"),
    (["--student", "resnet_mini"], lambda r: r["pair"].endswith("-> resnet_mini")),
    (["--status", "failed", "--status", "pending"], lambda r: r["status"] in ("failed", "pending")),
    (["--dataset", "cifar100"], lambda r: False),
])
def test_filters_keep_exactly_the_runs_asked_for(store, capsys, filters, expected):
    runs, _ = store
    # the age is read from the clock by each listing: two calls may straddle a second
    everything = [{**r, "age": None} for r in json.loads(_listing(capsys, "--runs-dir", str(runs), "--format", "json"))]
    kept = [{**r, "age": None} for r in json.loads(_listing(capsys, "--runs-dir", str(runs), "--format", "json",
                                                             *filters))]
    assert kept == [r for r in everything if expected(r)]
    assert kept or filters[0] in ("--dataset",)


def test_the_table_is_aligned_and_newest_first(store, capsys):
    runs, done = store
    lines = _listing(capsys, "--runs-dir", str(runs)).splitlines()
    assert lines[0].split()[:4] == ["method", "pair", "dataset", "setting"] and "best top-1 (test)" in lines[0]
    assert len(lines) == len(RunStore(runs).runs()) + 1
    unit = {"s": 1, "min": 60, "h": 3600, "d": 86400}
    ages = [line.split()[-2:] for line in lines[1:]]
    assert ages[0][1] in ("s", "min")  # the copies just made come first
    seconds = [int(n) * unit[u] for n, u in ages]
    assert seconds == sorted(seconds) and seconds[-1] > seconds[0]  # the committed runs finished before (summaries)


def test_an_empty_store_and_a_missing_one(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _listing(capsys, "--runs-dir", str(tmp_path / "empty")).strip() == "no runs"
    assert main(["runs", "--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_age_reads_in_the_largest_unit():
    assert [_age(0, now) for now in (59, 60, 7199, 86400 * 3 + 5)] == ["59 s", "1 min", "1 h", "3 d"]
