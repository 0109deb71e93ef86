"""The store owns every run name (issue 24, items 3 and 5): one naming rule for every kind of run (training runs and
overhead measurements), a run without a teacher named for what it is (``student_<model>_...``), a run stored under an
earlier name still found, the overhead's records read back through the store as what they are, the metric keys and
the sweep's records spelled in one place, and no module outside the store that builds or parses a run name."""
import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest

from hkdbench.benchmark.core.config import PIPELINE_VERSION, OverheadConfig, identity_hash, run_config_from_dict
from hkdbench.benchmark.core.errors import StoreError
from hkdbench.benchmark.core.store import (CkaKey, RunDir, RunStore, atomic_write_json, cka_key, cka_prefix,
                                           first_run_name, legacy_run_names, parse_cka_key, run_name,
                                           teacher_model_from_name)
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config

REPO = Path(__file__).resolve().parents[1]


def _run(method="kd", teacher="resnet_mini", seed=0):
    return resolve_run_config(kind="student", student="vit_mini", teacher=teacher if method != "none" else None,
                              method=method, recipe="demo", overrides=[f"train.seed={seed}"])


def _overhead(**kw):
    return OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", batch_size=8, img_size=16,
                          method_code="v1", **kw)


def test_one_rule_names_every_kind_of_run():
    kd, alone = _run("kd"), _run("none")
    teacher = teacher_run_config(kd)
    assert run_name(teacher) == f"teacher_resnet_mini_fashion-mnist_s0_{teacher.run_hash()}"
    assert run_name(kd) == f"kd_resnet_mini_to_vit_mini_fashion-mnist_s0_{kd.run_hash()}"
    assert run_name(alone) == f"student_vit_mini_fashion-mnist_s0_{alone.run_hash()}"
    assert run_name(_overhead(device="cuda:1")) == (f"overhead_kd_resnet_mini_to_vit_mini_b8_16px_cuda_"
                                                    f"{_overhead(device='cuda:1').run_hash()}")
    for cfg in (kd, alone, teacher):  # the configs' own name is the store's
        assert cfg.run_name() == run_name(cfg)


def test_every_run_is_stored_under_the_rule_s_name(tmp_path):
    store = RunStore(tmp_path)
    for cfg in (_run("kd"), _run("none"), _overhead()):
        assert store.run_dir(cfg).path == tmp_path / run_name(cfg)


def test_the_overhead_hash_is_the_one_it_had_before_the_config_moved_to_the_store():
    cfg = _overhead(precision="bf16")
    # the rule tools/overhead.py hashed with: the fields away from their defaults, plus kind, method code and pipeline
    before = identity_hash(replace(cfg, method_code=""), kind="overhead", method_code="v1", pipeline=PIPELINE_VERSION)
    assert cfg.run_hash() == before
    with pytest.raises(ValueError, match="no method_code"):
        replace(cfg, method_code="").run_hash()


def test_a_run_without_a_teacher_keeps_its_hash_and_its_earlier_name_is_found(tmp_path):
    alone = _run("none")
    (legacy,) = legacy_run_names(alone)
    assert legacy == f"none_none_to_vit_mini_fashion-mnist_s0_{alone.run_hash()}"
    assert legacy_run_names(_run("kd")) == [] and legacy_run_names(teacher_run_config(_run("kd"))) == []
    stored = RunDir(tmp_path / legacy)  # a finished run of an earlier version
    stored.claim(alone)
    stored.mark_done({"best_top1": 50.0})
    store = RunStore(tmp_path)
    assert store.run_dir(alone).path == stored.path and store.run_dir(alone).is_done
    assert store.run_dir(_run("none", seed=1)).path.name.startswith("student_vit_mini_fashion-mnist_s1_")


def test_a_finished_run_under_its_earlier_name_is_not_trained_again(tmp_path):
    from hkdbench.benchmark.engine.plan import plan_runs

    alone = _run("none")
    stored = RunDir(tmp_path / legacy_run_names(alone)[0])
    stored.claim(alone)
    stored.mark_done({"best_top1": 50.0})
    (planned,) = plan_runs([alone], RunStore(tmp_path))
    assert (planned.status, planned.action, planned.trains) == ("done", "skipped", False)


def test_a_sweep_keeps_its_id_across_the_renaming():
    from hkdbench.benchmark.sweep.plan import SweepPlan

    alone, kd = _run("none"), _run("kd")
    assert first_run_name(alone) == legacy_run_names(alone)[0] and first_run_name(kd) == run_name(kd)
    plan = SweepPlan(preset=None, cells=[], teachers=[], students=[_spec(alone), _spec(kd)])
    earlier = sorted([f"none_none_to_vit_mini_fashion-mnist_s0_{alone.run_hash()}", run_name(kd)])
    assert plan.digest() == hashlib.sha256("\n".join(earlier).encode()).hexdigest()[:10]


def _spec(cfg):
    from hkdbench.benchmark.sweep.plan import RunSpec

    return RunSpec(cfg, "student")


def test_an_overhead_run_reads_back_as_an_overhead_config(tmp_path):
    cfg = _overhead()
    rd = RunStore(tmp_path).run_dir(cfg)
    with rd.lock():
        rd.store_measurement(cfg, {"device": "cpu"}, {"kind": "overhead", "step_time_ms": 1.0})
    assert rd.is_done and rd.overhead_config() == cfg and rd.env() == {"device": "cpu"}
    assert rd.summary()["step_time_ms"] == 1.0 and rd.config_record()["kind"] == "overhead"
    with pytest.raises(StoreError, match="holds an overhead measurement's .* config, not a run config"):
        rd.config()  # what `hkdbench eval` and `export` read: a measurement has no weights to load
    # one stored before the config recorded the method's code reads back too
    atomic_write_json(rd.config_file, {k: v for k, v in rd.config_record().items() if k != "method_code"})
    assert rd.overhead_config() == replace(cfg, method_code="")


def test_a_training_run_reads_back_as_a_run_config_and_its_record_as_stored(tmp_path):
    cfg = _run("kd")
    rd = RunStore(tmp_path).run_dir(cfg)
    rd.claim(cfg)
    assert rd.config() == cfg == run_config_from_dict(rd.config_record())
    with pytest.raises(StoreError, match="holds a training run's config, not an overhead config"):
        rd.overhead_config()
    atomic_write_json(rd.config_file, {**cfg.to_dict(), "field_of_a_later_version": 1})
    assert rd.config_record()["field_of_a_later_version"] == 1  # the analysis reads it as it is
    with pytest.raises(StoreError, match="does not hold a run config"):
        rd.config()


def test_a_teacher_run_s_model_is_read_from_its_name_by_the_store_alone():
    assert teacher_model_from_name("teacher_mixer_mini_fashion-mnist_s0_0123456789ab", "fashion-mnist") == "mixer_mini"
    assert teacher_model_from_name("teacher_mixer_mini_cifar100_s0_0123456789ab", "fashion-mnist") is None
    assert teacher_model_from_name("my_old_teacher", "fashion-mnist") is None


def test_cka_keys_are_written_and_read_by_one_spelling():
    own, named = cka_key(cka_prefix(), "linear", 1, 2), cka_key(cka_prefix("teacher_t_d_s0_ab"), "rbf", 3, 3)
    assert (own, named) == ("cka/linear/t1_s2", "cka@teacher_t_d_s0_ab/rbf/t3_s3")
    assert parse_cka_key(own) == CkaKey(None, "linear", 1, 2)
    assert parse_cka_key(named) == CkaKey("teacher_t_d_s0_ab", "rbf", 3, 3)
    assert parse_cka_key("cka_time_s") is None and parse_cka_key("conflict/cosine") is None


# What building or parsing a run name looks like: joining teacher and student ('_to_{'), a name ending in a hash
# ('_{cfg.run_hash()}'), a run-name prefix as a string of its own ("teacher_"), a regex of the seed and hash ('_s\d')
# and the no-teacher part of the names before (none_to).
NAME_HANDLING = [re.compile(p) for p in (r"_to_\{", r"_\{[^{}]*run_hash\(\)\}", r"_s\\d", r"none_to",
                                         r"[\"'](teacher|student|overhead|none)_[\"']")]
STORE = REPO / "benchmark" / "core" / "store.py"
NAMES = REPO / "benchmark" / "core" / "names.py"  # the naming rule the store re-exports


def _name_handling(text):
    return [line.strip() for line in text.splitlines() if any(p.search(line) for p in NAME_HANDLING)]


def test_the_check_for_run_names_catches_how_they_were_built_and_parsed():
    before = ['return f"teacher_{self.student.name}_{self.data.dataset}_{seed}_{self.run_hash()}"',
              'return f"{self.method}_{teacher}_to_{self.student.name}_{self.data.dataset}_{seed}_{self.run_hash()}"',
              'hit = re.fullmatch(rf"teacher_(.+)_{re.escape(str(dataset))}_s\\d+_[0-9a-f]+", probe_run)',
              'bad = [t for t in self.probe_teachers if not t.startswith("teacher_")]']
    assert _name_handling("\n".join(before)) == before
    assert _name_handling(NAMES.read_text())  # the store's naming rule itself does


def test_no_module_outside_the_store_builds_or_parses_a_run_name():
    sources = [p for folder in ("benchmark", "methods", "analysis") for p in (REPO / folder).rglob("*.py")
               if p not in (STORE, NAMES)]
    found = {str(p.relative_to(REPO)): lines for p in sources if (lines := _name_handling(p.read_text()))}
    assert not found, f"run names built or parsed outside the store (core/store.py, core/names.py): {found}"
