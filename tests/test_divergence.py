"""Divergence is never a result: a non-finite loss (a step's, or the evaluation's) or non-finite weights at the end of
an epoch mark the run FAILED with the epoch and what was seen, never DONE; a teacher run that failed or diverged is
refused as a teacher, named, before the student's run directory exists; the store's files are strict JSON."""
import json
import math
from pathlib import Path

import pytest
import torch

from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.store import RunDir, RunStore

# the run of issue 26: DONE with eval_loss NaN and top-1 12.50 before
DIVERGING_TEACHER = ["teacher", "--model", "resnet_mini", "data.train_subset=256", "data.eval_subset=128",
                     "train.epochs=1", "optim.lr=1e30"]
TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=1"]
STUDENT = ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "kd", "--recipe", "demo", *TINY,
           *[f"teacher.{item}" for item in TINY]]


def strict(text: str, where: Path):
    """``text`` read by a strict JSON parser (RFC 8259: no NaN or Infinity)."""
    def refuse(constant):
        raise AssertionError(f"{where} holds a bare {constant}")

    return json.loads(text, parse_constant=refuse)


def strict_lines(path: Path):
    return [strict(line, path) for line in path.read_text().splitlines()]


def store_listing(runs_dir):
    root = Path(runs_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_a_non_finite_evaluation_loss_fails_the_run_never_done(fmnist_available, runs_dir, capsys):
    assert main([*DIVERGING_TEACHER, "--runs-dir", runs_dir]) != 0
    (rd,) = RunStore(runs_dir).runs()
    assert rd.is_failed and rd.status() == "failed"
    for name in ("summary.json", "DONE", "best.pt", "final.pt"):
        assert not (rd.path / name).exists(), name
    failure = rd.failure()
    assert failure["epoch"] == 1 and "diverged at the end of epoch 1: eval_loss=nan" in failure["reason"]
    assert math.isnan(failure["losses"]["eval_loss"])
    assert "FAILED: diverged at the end of epoch 1" in capsys.readouterr().out
    # the epoch that diverged is recorded, in strict JSON: null, with the number's spelling beside it
    (line,) = strict_lines(rd.metrics_file)
    assert line["eval_loss"] is None and line["nonfinite"] == {"eval_loss": "nan"}
    assert math.isnan(rd.metrics()[0]["eval_loss"])  # the store's reader puts the number back
    strict(rd.failed_file.read_text(), rd.failed_file)


def test_non_finite_weights_at_the_end_of_an_epoch_fail_the_run(fmnist_available, runs_dir, monkeypatch):
    """Finite losses, but a weight that overflowed: the epoch's check of the weights catches it, names the tensor."""
    from hkdbench.benchmark.engine import loop
    from hkdbench.benchmark.engine.trainer import DivergedError, train
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    record = loop.epoch_metrics

    def poisoned(m, *args):
        out = record(m, *args)
        with torch.no_grad():
            m.student.model.fc.bias[3] = float("inf")
        return out

    monkeypatch.setattr(loop, "epoch_metrics", poisoned)
    cfg = resolve_run_config(kind="teacher", student="resnet_mini", recipe="demo", overrides=TINY)
    with pytest.raises(DivergedError, match=r"diverged at the end of epoch 1: non-finite weights in 1 tensor\(s\) "
                                            r"\(student\.model\.fc\.bias\)"):
        train(cfg, runs_dir=runs_dir, progress=False)
    rd = RunStore(runs_dir).run_dir(cfg)
    assert rd.is_failed and not rd.summary_file.exists() and not (rd.path / "best.pt").exists()
    assert strict_lines(rd.metrics_file)[0]["eval_loss"] is not None  # the losses were finite


def test_the_store_writes_strict_json_and_its_readers_take_it(tmp_path):
    """Every writer of the store emits strict JSON; a non-finite number comes back as itself through the store's
    readers, and the analysis collects such runs (a failed one, a done one with a NaN statistic)."""
    from hkdbench.analysis.collect import collect_runs, epoch_records
    from hkdbench.benchmark.core.store import from_strict_json, loads, to_strict_json

    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": float("-inf")}, "e": 2.5}
    written = to_strict_json(value)
    assert json.dumps(written, allow_nan=False)
    assert written == {"a": None, "nonfinite": {"a": "nan"}, "b": [1.0, None], "c": {"d": None,
                                                                                    "nonfinite": {"d": "-inf"}},
                      "e": 2.5}
    back = from_strict_json(written)
    assert math.isnan(back["a"]) and back["c"]["d"] == float("-inf") and back["e"] == 2.5
    assert math.isnan(loads('{"a": NaN}')["a"])  # a file of older code (bare NaN) reads as it did

    failed, done = RunDir(tmp_path / "failed_run"), RunDir(tmp_path / "done_run")
    for rd in (failed, done):
        rd.path.mkdir()
        rd.config_file.write_text(json.dumps({"kind": "student", "method": "kd", "student": {"name": "vit_mini"},
                                              "data": {"dataset": "fashion-mnist"}, "train": {"seed": 0}}))
    failed.mark_failed("non-finite loss at epoch 1, step 3: ce=2.3, kd=nan", epoch=1, step=3,
                       losses={"ce": 2.3, "kd": float("nan")})
    done.write_metrics([{"epoch": 1, "top1": 50.0, "stat/ratio": float("inf"), "loss/ce": 1.0}])
    done.mark_done({"best_top1": 50.0, "last_top1": 50.0, "teacher_top1": float("nan")})
    for path in (failed.failed_file, done.summary_file):
        strict(path.read_text(), path)
    strict_lines(done.metrics_file)
    assert math.isnan(failed.failure()["losses"]["kd"]) and done.metrics()[0]["stat/ratio"] == float("inf")
    runs = collect_runs(tmp_path).set_index("run")
    assert runs.loc["failed_run", "status"] == "failed" and "kd=nan" in runs.loc["failed_run", "failure"]
    assert runs.loc["done_run", "status"] == "done" and math.isnan(runs.loc["done_run", "teacher_top1"])
    epochs = epoch_records(tmp_path)
    assert "nonfinite" not in epochs.columns and epochs["stat/ratio"].tolist() == [float("inf")]


def test_a_teacher_run_that_diverges_is_refused_naming_it_and_no_student_run_is_written(fmnist_available,
                                                                                        runs_dir, capsys):
    argv = [*STUDENT, "teacher.optim.lr=1e30", "--runs-dir", runs_dir]
    assert main(argv) == 2
    err = capsys.readouterr().err
    (t_dir,) = RunStore(runs_dir).runs()
    assert t_dir.path.name.startswith("teacher_") and t_dir.is_failed
    assert f"teacher run {t_dir.path.name} FAILED (diverged at the end of epoch 1" in err
    assert "student run was not started" in err and "Traceback" not in err
    before, log = store_listing(runs_dir), t_dir.log_file.read_text()
    # again: the FAILED teacher run is refused at once (not trained again), and still no student run
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"teacher run {t_dir.path.name} FAILED" in err and "cannot be a teacher" in err
    assert store_listing(runs_dir) == before and t_dir.log_file.read_text() == log


def _bare_nan_eval_loss(t_dir):  # what hkdbench wrote before divergence was checked at the end of an epoch
    records = t_dir.metrics()
    records[-1]["eval_loss"] = float("nan")
    t_dir.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in records))


def _nan_weights(t_dir):
    state = torch.load(t_dir.weights_file("best"), weights_only=True)
    state["fc.bias"][0] = float("nan")
    torch.save(state, t_dir.weights_file("best"))


@pytest.mark.parametrize("damage,message", [
    (_bare_nan_eval_loss, "diverged (eval_loss=nan) though marked DONE"),
    (_nan_weights, "diverged (non-finite weights in 1 tensor(s) (fc.bias)) though marked DONE"),
])
def test_a_done_teacher_run_that_diverged_is_refused_naming_it(done_teacher_store, tmp_path, capsys, damage,
                                                               message):
    runs, t_dir, student = done_teacher_store(tmp_path)
    damage(t_dir)
    before = store_listing(runs)
    assert main([*student, "--runs-dir", runs]) == 2
    err = capsys.readouterr().err
    assert f"teacher run {t_dir.path.name}: {message}" in err and "Traceback" not in err
    assert store_listing(runs) == before
