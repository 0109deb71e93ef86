"""The report, collect, table, plot and status on empty, damaged and partial run stores (issue 26, item 4): a clear
error when there is nothing to read (and nothing written), a warning per damaged file naming it and saying what it
means for the run, advice that fits the run's state; never a silent '-'. And status names the job that trained a
run, not a later one that found it locked."""
import json
import shutil

import pytest

from hkdbench.benchmark.core.store import RunDir

from test_cli_errors import TEACHER, _run, _tree, finished_teacher  # noqa: F401 (a fixture)


@pytest.fixture
def store(finished_teacher, tmp_path):  # noqa: F811
    """A store of two copies of one finished teacher run (the second under another name)."""
    runs = tmp_path / "runs"
    shutil.copytree(finished_teacher.parent, runs)
    shutil.copytree(runs / finished_teacher.name, runs / "teacher_copy")
    return runs


def _report(store, capsys, command="report"):
    out = store.parent / "out"
    code, err = _run([command, "--runs-dir", str(store), "--out", str(out)], capsys)
    return code, err, out


@pytest.mark.parametrize("command", ["report", "collect", "plot", "table"])
def test_an_empty_store_is_said_so_and_nothing_is_written(tmp_path, capsys, command):
    """Before: report printed only 'error: device', after writing runs.csv, epochs.csv and cka.csv."""
    (tmp_path / "runs" / "_sweeps").mkdir(parents=True)  # a store that holds no run
    code, err, out = _report(tmp_path / "runs", capsys, command)
    assert code == 2 and "holds no run directory" in err and "nothing was written" in err, err
    assert not out.exists()


def test_a_store_whose_every_config_is_damaged_is_said_so(store, capsys):
    for run in store.iterdir():
        (run / "config.json").write_text("[]")
    code, err, out = _report(store, capsys)
    assert code == 2 and "no run whose config.json can be read" in err
    assert f"{store / 'teacher_copy' / 'config.json'} is damaged (not a JSON object); the run is left out" in err
    assert not out.exists()


def test_a_done_run_with_a_damaged_summary_is_named_and_counted_apart(store, capsys):
    """Before: counted 'finished' and shown as '-' everywhere, without a word."""
    (store / "teacher_copy" / "summary.json").write_text('{"best_top1": 8')
    code, err, out = _report(store, capsys)
    assert code == 0, err
    assert (f"warning: {store / 'teacher_copy' / 'summary.json'} is damaged (not valid JSON); the run is DONE but "
            "its result is lost, so it is in no table") in err
    assert "Runs: 2 in the store, 1 finished (1 teacher); 0 failed, 0 unfinished, 1 damaged" in \
        (out / "README.md").read_text()
    rows = {r["run"]: r["status"] for r in _csv(out / "runs.csv")}
    assert rows["teacher_copy"] == "damaged" and list(rows.values()).count("done") == 1


def _csv(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_damaged_config_leaves_one_run_out_with_a_warning(store, capsys):
    (store / "teacher_copy" / "config.json").write_text('{"kind": "tea')
    code, err, out = _report(store, capsys)
    assert code == 0 and f"{store / 'teacher_copy' / 'config.json'} is damaged (not valid JSON)" in err
    assert [r["run"] for r in _csv(out / "runs.csv")] == [p.name for p in store.iterdir() if p.name != "teacher_copy"]


def test_a_torn_metrics_line_of_a_done_run_does_not_advise_resume(store, capsys):
    """--resume skips a DONE run, so it cannot rewrite the file: the warning says what holds and what would help."""
    metrics = store / "teacher_copy" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 2, "to\n[1, 2]\n')
    code, err, _ = _report(store, capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "metrics.jsonl" in line]
    assert len(lines) == 2, err  # each damaged line once, though two readers read the file
    assert "line 2 is not valid JSON" in lines[0] and "line 3 is not a JSON object" in lines[1]
    assert all("The run is DONE" in line and "--restart" in line and "Resume the run" not in line for line in lines)


def test_a_torn_metrics_line_of_an_unfinished_run_advises_resume(store):
    rd = RunDir(store / "teacher_copy")
    (rd.path / "DONE").unlink()
    rd.metrics_file.write_text(rd.metrics_file.read_text() + '{"epo')
    with pytest.warns(UserWarning, match=r"line 2 is not valid JSON.*Resume the run \(--resume\)"):
        assert len(rd.metrics()) == 1


def test_a_damaged_sweep_json_is_left_out_of_the_report_with_a_warning(store, capsys):
    manifest = store / "_sweeps" / "abc" / "sweep.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{")
    code, err, out = _report(store, capsys)
    assert code == 0 and f"{manifest} is damaged (not valid JSON" in err and "leaves the sweep out" in err
    assert (out / "README.md").exists()


def test_status_names_a_damaged_failed_record(tmp_path, capsys):
    from hkdbench.benchmark.core.store import RunStore
    from hkdbench.benchmark.sweep.status import format_state_table, run_states

    spec = _student_spec()
    rd = RunStore(tmp_path / "runs").run_dir(spec.cfg)
    rd.claim(spec.cfg)
    rd.failed_file.write_text("{not json")
    (state,) = run_states([spec], RunStore(tmp_path / "runs"))
    assert state.status == "failed" and f"its FAILED record {rd.failed_file} is damaged" in state.reason
    assert "is damaged" in format_state_table([state])


def _student_spec():
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset

    grid = {"teachers": ["resnet_mini"], "students": ["vit_mini"], "methods": ["none"]}
    (spec,) = expand(load_preset(None, ["recipe=demo"], grid)).students
    return spec


def test_status_names_the_job_that_trained_a_run_not_one_that_found_it_locked(tmp_path):
    """A racing sweep's job found the run locked and exited ('owned'); the run's job is the one that trained it.
    Before: status named the last job submitted."""
    import pickle

    from hkdbench.benchmark.core.store import RunStore, append_jsonl
    from hkdbench.benchmark.sweep.status import run_states

    spec = _student_spec()
    store = RunStore(tmp_path / "runs")
    rd = store.run_dir(spec.cfg)
    rd.claim(spec.cfg)
    folder = tmp_path / "submitit"
    folder.mkdir()
    outcomes = {"101": {"status": "done", "run": spec.name}, "202": {"status": "owned", "run": spec.name},
                "303": {"status": "done", "cohort": "c", "runs": {spec.name: "owned", "other": "done"}}}
    for job_id, outcome in outcomes.items():
        (folder / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", outcome)))
        append_jsonl(rd.jobs_file, {"job_id": job_id, "executor": "local", "folder": str(folder)})
    (rd.path / "DONE").write_text("")
    (rd.path / "summary.json").write_text(json.dumps({"best_top1": 50.0}))
    (state,) = run_states([spec], store)
    assert (state.status, state.job_id) == ("done", "101")


def test_status_reads_a_store_with_damaged_job_records(tmp_path, capsys):
    from hkdbench.benchmark.core.store import RunStore
    from hkdbench.benchmark.sweep.status import run_states

    spec = _student_spec()
    store = RunStore(tmp_path / "runs")
    rd = store.run_dir(spec.cfg)
    rd.claim(spec.cfg)
    job = json.dumps({"job_id": "999999999", "executor": "local", "folder": "/nonexistent"})  # a pid no process has
    rd.jobs_file.write_text(f'{job}\n[3]\n{{"executor": "lo\n')
    with pytest.warns(UserWarning, match="jobs.jsonl: line") as seen:
        (state,) = run_states([spec], store)
    assert [str(w.message).split(" (")[0].split(": ", 1)[1] for w in seen] == ["line 2 is not a JSON object",
                                                                               "line 3 is not valid JSON"]
    assert (state.job_id, state.status) == ("999999999", "cancelled")


def test_a_metrics_line_holding_identity_keys_is_warned_about(store, capsys):
    """The fuzz test's find: a metrics line with a 'kind' key made collect fail (pandas: cannot insert kind)."""
    metrics = store / "teacher_copy" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"best_top1": "x", "kind": 7, "runs": 1}\n')
    code, err, out = _report(store, capsys, "collect")
    assert code == 0 and f"{metrics}: key(s) kind name the run, not a metric (an edited file?); ignored" in err, err
    assert (out / "epochs.csv").exists()


def test_a_summary_with_fields_of_the_wrong_type_is_damaged(store, capsys):
    """The fuzz test's find: a summary whose kind was a number made the report fail sorting names."""
    summary = store / "teacher_copy" / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "kind": 7}))
    code, err, out = _report(store, capsys)
    assert code == 0 and f"{summary} is damaged (its kind is 7, not a name)" in err, err
    assert {r["run"]: r["status"] for r in _csv(out / "runs.csv")}["teacher_copy"] == "damaged"
