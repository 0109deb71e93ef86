"""The overhead benchmark on a tiny pair on CPU."""
import json
from pathlib import Path

import pytest

from hkdbench.analysis.collect import collect_runs
from hkdbench.benchmark.cli.main import main
from hkdbench.benchmark.core.store import RunDir, RunStore, run_name
from hkdbench.benchmark.tools.overhead import run_overhead

PAIR = dict(teacher="resnet_mini", student="vit_mini", batch_size=8, img_size=16, warmup=1, repeats=2,
            num_classes=10)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    runs = tmp_path_factory.mktemp("overhead") / "runs"
    results = run_overhead(methods=["fitnet"], runs_dir=str(runs), device="cpu", echo=lambda *_: None, **PAIR)
    return runs, results


def test_ratios_params_and_flops(measured):
    _, results = measured
    assert set(results) == {"none", "kd", "fitnet"}  # the baselines are always measured, for the ratios
    none, kd, fitnet = results["none"], results["kd"], results["fitnet"]
    for key in ("step_time_ms", "images_per_s", "train_gflops_per_image", "peak_memory_mb"):
        if none[key] is not None:
            assert none[f"{key}_vs_none"] == pytest.approx(1.0)
            assert kd[f"{key}_vs_kd"] == pytest.approx(1.0)
    assert none["train_params_vs_none"] == 1.0
    assert none["extra_params"] == 0 and kd["extra_params"] == 0 and fitnet["extra_params"] > 0
    assert fitnet["train_params_vs_none"] > 1.0
    assert kd["train_gflops_per_image"] >= none["train_gflops_per_image"] > 0
    assert fitnet["train_gflops_per_image"] >= none["train_gflops_per_image"]
    assert kd["train_gflops_per_image_vs_none"] >= 1.0
    for r in results.values():
        assert r["step_time_ms"] > 0 and r["images_per_s"] == pytest.approx(8000 / r["step_time_ms"])
        assert r["peak_memory_mb"] is None or r["peak_memory_mb"] >= 0


def test_stored_as_runs_and_collected(measured):
    runs, results = measured
    dirs = sorted(p for p in Path(runs).iterdir() if p.is_dir())
    assert len(dirs) == 3
    store = RunStore(runs)
    for d in dirs:
        assert (d / "DONE").exists() and (d / "env.json").exists()
        assert json.loads((d / "config.json").read_text())["kind"] == "overhead"
        assert json.loads((d / "summary.json").read_text())["kind"] == "overhead"
        cfg = RunDir(d).overhead_config()  # read back through the store, named by its rule
        assert store.run_dir(cfg).path == d and d.name == run_name(cfg) and cfg.method_code
    table = collect_runs(runs)
    assert set(table["kind"]) == {"overhead"} and set(table["method"]) == {"none", "kd", "fitnet"}
    fit = table[table["method"] == "fitnet"].iloc[0]
    assert fit["extra_params"] == results["fitnet"]["extra_params"]
    assert fit["step_time_ms_vs_none"] == pytest.approx(results["fitnet"]["step_time_ms_vs_none"])


def test_cli(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["overhead", "--teacher", "resnet_mini", "--student", "vit_mini", "--methods", "kd", "--batch-size", "4",
            "--img-size", "16", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--num-classes", "10",
            "--runs-dir", str(runs)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ms/step" in out and "GFLOP/img" in out
    assert len(list(runs.iterdir())) == 2  # kd, and the student alone (always measured, for the ratios)
    assert main(argv) == 0
    assert "already done" in capsys.readouterr().out
    assert main(argv[:-2] + ["--methods", "nope", "--runs-dir", str(runs)]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_times_the_trainers_own_step(monkeypatch):
    """The benchmark must measure the step training runs (step.TrainStep), not a copy of it."""
    from hkdbench.benchmark.engine import step
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.tools.overhead import measure_method

    calls = []
    real_step = step.TrainStep.step

    def counting_step(self, batch, epoch, step):
        calls.append(step)
        return real_step(self, batch, epoch, step)

    monkeypatch.setattr(step.TrainStep, "step", counting_step)
    measure_method(OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", batch_size=4,
                                  img_size=16, num_classes=10, warmup=2, repeats=3))
    assert calls == [0, 1, 2, 3, 4, 5]  # warm-up, timed repeats, then the FLOP-counted step


def test_builds_its_step_with_the_trainers_setup(monkeypatch):
    """The benchmark and the trainer share engine.step.setup_training: the method, module, optimiser and scaler
    the benchmark times are built as a training run builds them."""
    from hkdbench.benchmark.engine import step
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.tools.overhead import measure_method

    built = []
    real_setup = step.setup_training

    def recording_setup(method, *args, **kwargs):
        setup = real_setup(method, *args, **kwargs)
        built.append((method, setup))
        return setup

    monkeypatch.setattr(step, "setup_training", recording_setup)
    result = measure_method(OverheadConfig(teacher="resnet_mini", student="vit_mini", method="fitnet", batch_size=4,
                                           img_size=16, num_classes=10, warmup=0, repeats=1))
    [(method, setup)] = built
    assert method == "fitnet" and not setup.scaler.is_enabled() and setup.dtype is None
    assert result["extra_params"] == setup.method.extra_parameter_count() > 0


def test_method_costs_per_method():
    """The static costs of ``hkdbench methods --pair``: extra parameters counted on an independently built
    method, 16 bytes of training memory per extra parameter, a memory bank's buffers sized by the stand-in."""
    from hkdbench.methods import TrainingSet, get_method, list_methods, method_config

    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.tools.overhead import method_costs

    costs = method_costs("resnet_mini", "vit_mini", 10)
    assert costs["train_set_size"] == 5000 and set(costs["methods"]) == set(list_methods())
    assert costs["methods"]["kd"] == {"extra_params": 0, "extra_train_mb": 0.0, "buffers_mb": 0.0}
    size = costs["img_size"]
    teacher = create_model("resnet_mini", 10, in_chans=3, img_size=size)
    student = create_model("vit_mini", 10, in_chans=3, img_size=size)
    assert costs["student_params"] == student.deploy_parameter_count()
    fitnet = get_method("fitnet").build(method_config("fitnet"), student, teacher, 10)
    own = {id(p) for p in student.parameters()} | {id(p) for p in teacher.parameters()}
    params = sum(p.numel() for p in fitnet.parameters() if p.requires_grad and id(p) not in own)
    assert costs["methods"]["fitnet"]["extra_params"] == params > 0
    assert costs["methods"]["fitnet"]["extra_train_mb"] == pytest.approx(params * 16 / 2 ** 20)
    # CRD's two memory banks: one fp32 feat_dim vector per stand-in sample each (plus its sampler's indices)
    banks_mb = 2 * TrainingSet.stand_in(10).size * method_config("crd").feat_dim * 4 / 2 ** 20
    assert banks_mb < costs["methods"]["crd"]["buffers_mb"] < 1.1 * banks_mb


def test_compile_is_measured_under_its_own_name(monkeypatch):
    """--compile times the compiled step (as train.compile=true) and names the measurement apart; without it the
    name is the one a measurement had before the option."""
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.engine import step
    from hkdbench.benchmark.tools.overhead import measure_method

    monkeypatch.setenv("HKDBENCH_COMPILE_BACKEND", "aot_eager")  # inductor's C++ build is minutes on this machine
    seen = []
    real = step.setup_training

    def recording(*args, **kwargs):
        seen.append(kwargs.get("compile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "setup_training", recording)
    cfg = OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", batch_size=4, img_size=16,
                         num_classes=10, warmup=1, repeats=1, compile=True, method_code="v1")
    result = measure_method(cfg)
    assert seen == [True] and result["step_time_ms"] > 0
    plain = OverheadConfig(teacher="resnet_mini", student="vit_mini", method="kd", method_code="v1")
    assert cfg.run_hash() != OverheadConfig(**{**cfg.__dict__, "compile": False}).run_hash()
    assert plain.run_hash() == OverheadConfig(**{**plain.__dict__, "compile": False}).run_hash()


def test_the_default_precision_is_the_one_training_runs_on_the_device(monkeypatch, tmp_path):
    """Without --precision the step is timed in train.precision=auto as training resolves it on the device: fp32 on
    this CPU (the name a measurement had before), bf16 where autocast_dtype resolves 'auto' to it (a GPU); the
    stored run names the resolved precision. Only the configs are looked at (the measurement is stubbed)."""
    import torch

    from hkdbench.benchmark.engine import evaluation
    from hkdbench.benchmark.tools import overhead

    timed = []
    monkeypatch.setattr(overhead, "measure_method", lambda cfg: timed.append(cfg.precision) or 1 / 0)
    for resolved, name in ((None, "fp32"), (torch.bfloat16, "bf16")):
        timed.clear()
        if resolved is not None:
            monkeypatch.setattr(evaluation, "autocast_dtype", lambda precision, device, dtype=resolved: dtype)
        with pytest.raises(ZeroDivisionError):
            run_overhead("resnet_mini", "vit_mini", methods=["kd"], runs_dir=str(tmp_path), echo=lambda *a: None)
        assert timed == [name]
