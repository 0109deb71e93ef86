"""Divergence is never a result: a non-finite loss (a step's, or the evaluation's) or non-finite weights at the end of
an epoch mark the run FAILED with the epoch and what was seen, never DONE; a teacher run that failed or diverged is
refused as a teacher, named, before the student's run directory exists; the store's files are strict JSON."""
import json
import math
from pathlib import Path

from hkdbench.benchmark.store import RunDir


def strict(text: str, where: Path):
    """``text`` read by a strict JSON parser (RFC 8259: no NaN or Infinity)."""
    def refuse(constant):
        raise AssertionError(f"{where} holds a bare {constant}")

    return json.loads(text, parse_constant=refuse)


def strict_lines(path: Path):
    return [strict(line, path) for line in path.read_text().splitlines()]


def test_the_store_writes_strict_json_and_its_readers_take_it(tmp_path):
    """Every writer of the store emits strict JSON; a non-finite number comes back as itself through the store's
    readers, and the analysis collects such runs (a failed one, a done one with a NaN statistic)."""
    from hkdbench.analysis.collect import collect_runs, epoch_records
    from hkdbench.benchmark.store import from_strict_json, loads, to_strict_json

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
