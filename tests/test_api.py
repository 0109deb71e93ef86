"""The Python API (issue 23, item 4): the docs' notebook example (docs/how-to/python-api.md) runs as written at
tiny sizes; the entry points take what the commands take and go through the same resolution and checks; their hints
are there for type checkers (py.typed, tests/test_packaging.py)."""
import inspect
import re
import typing
from pathlib import Path

import pandas as pd
import pytest

from hkdbench import api
from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.core.store import RunStore

PAGE = Path(__file__).resolve().parent.parent / "docs" / "how-to" / "python-api.md"


def _docs_example() -> str:
    text = PAGE.read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_the_docs_example_runs_as_written(fmnist_available, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_docs_example(), "docs/how-to/python-api.md", "exec"), namespace)
    runs = RunStore(tmp_path / "runs").runs()
    students = {r.config().method for r in runs if r.config().kind == "student"}
    assert students == {"kd", "none", "dkd"} and all(r.is_done for r in runs)
    frame = namespace["runs_df"]
    assert isinstance(frame, pd.DataFrame)
    assert set(frame.loc[frame["kind"] == "student", "method"]) == {"kd", "none", "dkd"}
    assert len(namespace["epochs_df"]) >= 3 and namespace["index"].exists()
    listed = namespace["api"].list_runs("runs", method=["kd", "dkd"])
    assert sorted(listed["method"]) == ["dkd", "kd"]
    assert [r.status for r in namespace["cohort"]] == ["done", "done"]
    assert "done True" in capsys.readouterr().out


def test_resolve_is_the_command_lines_resolution(tmp_path):
    from hkdbench.benchmark.recipes.resolve import RunRequest

    cfg = api.resolve("vit_mini", teacher="resnet_mini", method="dkd", recipe="demo",
                      overrides=["train.epochs=2", "teacher.train.epochs=3"], teacher_weights="last")
    same = RunRequest("student").given(student="vit_mini", teacher="resnet_mini", recipe="demo",
                                       teacher_weights="last") \
        .with_overrides(["train.epochs=2", "teacher.train.epochs=3"]).resolve("dkd")
    assert cfg == same and cfg.teacher.weights == "last"
    teacher = api.resolve("resnet_mini", teacher_run=True, recipe="demo")
    assert (teacher.kind, teacher.student.name, teacher.method) == ("teacher", "resnet_mini", "none")


def test_bad_input_raises_the_commands_errors_before_any_write(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="unknown field"):
        api.train("vit_mini", teacher="resnet_mini", overrides=["optim.lrr=1"], runs_dir=runs)
    with pytest.raises(ConfigError, match="exclude each other"):
        api.train("vit_mini", teacher="resnet_mini", runs_dir=runs, resume=True, restart=True)
    with pytest.raises(ConfigError, match="unknown filter"):
        api.list_runs(tmp_path, statuss=["done"])
    with pytest.raises(ConfigError, match="unknown metric 'top1'"):
        api.report(tmp_path, out=tmp_path / "out", metric="top1")
    assert not runs.exists()


def test_every_entry_point_is_typed_and_documented():
    for name in api.__all__:
        function = getattr(api, name)
        hints = typing.get_type_hints(function, globalns={**vars(api), "pd": pd, **_annotation_types()})
        parameters = inspect.signature(function).parameters
        assert "return" in hints, name
        assert all(p in hints for p, v in parameters.items() if v.kind is not v.VAR_KEYWORD), name
        assert function.__doc__ and function.__doc__.strip(), name
    assert "stable entry points" in api.__doc__


def _annotation_types():
    from hkdbench.benchmark.core.config import RunConfig
    from hkdbench.benchmark.engine.member import RunResult
    from hkdbench.benchmark.recipes.resolve import RunRequest

    return {"RunConfig": RunConfig, "RunResult": RunResult, "RunRequest": RunRequest}
