"""The golden runs (tests/_golden.py): every built-in method's tiny fixed run, and the pipeline's, reproduce the
numbers pinned at their versions; a changed computation fails until its version is bumped (issue 20)."""
import pytest

import _golden
from hkdbench.methods import get_method

pytestmark = pytest.mark.usefixtures("fmnist_available")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden_runs")  # one store: the methods' goldens share the teacher run


@pytest.mark.parametrize("name", _golden.golden_names())
def test_a_golden_run_reproduces_its_numbers(name, runs_dir):
    entry = _golden.load()["runs"].get(name)
    stale = _golden.stale_version(name, entry)
    assert stale is None, stale
    found = _golden.differences(entry, _golden.run_golden(name, runs_dir))
    version = "PIPELINE_VERSION" if name in _golden.PIPELINE_GOLDENS else f"{name}'s version"
    assert not found, (f"{name} computes other numbers than its golden run at the same version: if the change is "
                       f"meant, bump {version} and record the goldens again (python scripts/record_goldens.py):\n"
                       + "\n".join(found))


def test_every_built_in_method_has_a_golden_run():
    assert set(_golden.builtin_methods()) <= set(_golden.load()["runs"])


def test_a_changed_method_fails_its_golden(tmp_path, monkeypatch):
    """KD's KL divergence taken the other way round (teacher || student swapped): a change of what KD computes that
    its version does not say."""
    import hkdbench.methods.kd as kd

    real = kd.kd_kl
    monkeypatch.setattr(kd, "kd_kl", lambda s, t, temperature: real(t, s, temperature))
    found = _golden.differences(_golden.load()["runs"]["kd"], _golden.run_golden("kd", tmp_path))
    assert any(line.startswith("loss/kd epoch 1") for line in found), found
    assert _golden.differences(_golden.load()["runs"]["none"], _golden.run_golden("none", tmp_path)) == []


def test_a_bumped_version_asks_for_the_goldens_again(monkeypatch):
    monkeypatch.setattr(get_method("kd"), "version", get_method("kd").version + 1)
    message = _golden.stale_version("kd", _golden.load()["runs"]["kd"])
    assert message and "record the goldens again" in message
    assert _golden.stale_version("kd", None).startswith("kd has no golden run")
