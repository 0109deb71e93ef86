"""The training harness: run store files, divergence, stop/resume bit for bit, teacher reuse."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.engine.optim import param_groups
from hkdbench.benchmark.engine.trainer import DivergedError, RunExistsError, train

TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.img_size=16"]
TINY_TEACHER = ["train.epochs=1", "data.train_subset=256", "data.eval_subset=128", "data.batch_size=64"]


def tiny_cfg(method="kd", student="vit_mini", teacher="resnet_mini", epochs=2, extra=()):
    return resolve_run_config(kind="student", student=student, teacher=teacher, method=method, recipe="demo",
                              overrides=TINY + [f"train.epochs={epochs}", *extra], teacher_overrides=TINY_TEACHER)


def test_each_step_draws_the_next_batch_before_its_host_read(fmnist_available, runs_dir, monkeypatch):
    """The loop's lookahead: batch n + 1 is drawn inside step n, after its work is queued and before its one host
    read (on a GPU the device still runs step n while the host augments), and the epoch's last step draws none."""
    from hkdbench.benchmark.data import stream as stream_module
    from hkdbench.benchmark.engine.step import TrainStep

    events = []
    draw, read = stream_module.prepare_batch, TrainStep._read_values
    monkeypatch.setattr(stream_module, "prepare_batch", lambda *a, **k: events.append("draw") or draw(*a, **k))
    monkeypatch.setattr(TrainStep, "_read_values", lambda self, *a: events.append("read") or read(self, *a))
    cfg = tiny_cfg(method="none", teacher=None, epochs=2)
    assert train(cfg, runs_dir=runs_dir, progress=False).status == "done"
    steps = 256 // 64
    assert events == (["draw"] + ["draw", "read"] * (steps - 1) + ["read"]) * 2


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    no_decay, decay = param_groups([model], 0.05)  # timm's order (schedule/optimiser: test_optim_schedule.py)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_a_run_writes_the_run_store(fmnist_available, runs_dir):
    cfg = tiny_cfg()
    result = train(cfg, runs_dir=runs_dir, progress=False)
    rd = result.run_dir
    assert result.status == "done" and rd.is_done
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.json", "DONE", "best.pt", "final.pt"):
        assert (rd.path / name).exists(), name
    assert not rd.checkpoint_file.exists()  # a finished run keeps its weights, not its resume state
    assert rd.path.name.endswith(cfg.run_hash())
    metrics = rd.metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"loss/ce", "loss/kd", "top1", "top5", "lr", "epoch_time_s", "images_per_s"} <= set(metrics[0])
    summary = rd.summary()
    assert summary["best_top1"] == max(m["top1"] for m in metrics)
    assert summary["last_top1"] == metrics[-1]["top1"]
    assert summary["teacher_top1"] is not None and summary["method"] == "kd"
    env = json.loads(rd.env_file.read_text())
    assert {"python", "torch", "timm", "git_sha", "device"} <= set(env)
    # how the step ran (not in the hash): on the CPU no fused optimiser, no cuDNN autotuner, eager
    assert (env["fused_optimizer"], env["cudnn_benchmark"], env["compile"]) == (False, False, False)
    # the teacher was trained once, as its own run, and is reused by the next student of that teacher
    teacher_runs = [r for r in RunStore(runs_dir).runs() if r.config().kind == "teacher"]
    assert len(teacher_runs) == 1 and teacher_runs[0].is_done
    stamp = teacher_runs[0].summary_file.stat().st_mtime_ns
    train(tiny_cfg(method="fitnet", epochs=1), runs_dir=runs_dir, progress=False)
    assert teacher_runs[0].summary_file.stat().st_mtime_ns == stamp
    # a finished run is not trained again
    again = train(cfg, runs_dir=runs_dir, progress=False)
    assert again.summary == summary


def test_divergence_marks_the_run_failed_without_a_summary(fmnist_available, runs_dir):
    cfg = tiny_cfg(method="none", extra=["optim.lr=1e30", "optim.warmup_epochs=0", "optim.clip_grad=0"])
    with pytest.raises(DivergedError, match="non-finite loss"):
        train(cfg, runs_dir=runs_dir, progress=False)
    rd = RunStore(runs_dir).run_dir(cfg)
    assert rd.is_failed and not rd.summary_file.exists() and not rd.done_file.exists()
    assert "non-finite loss at epoch" in rd.failure()["reason"]


def _weights(run_dir, name="final.pt"):
    return torch.load(run_dir.path / name, weights_only=True)


def _assert_same_kept_files(a, b):
    """Both runs kept the same best and last weights, and their summaries agree on everything but time."""
    for name in ("best.pt", "final.pt"):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    timing = ("train_time_s", "images_per_s", "finished")
    assert ({k: v for k, v in a.summary().items() if k not in timing}
            == {k: v for k, v in b.summary().items() if k not in timing})


def _strip_times(metrics):
    return [{k: v for k, v in m.items() if k not in ("epoch_time_s", "images_per_s")} for m in metrics]


@pytest.mark.parametrize("method", ["fitnet"])
def test_stop_mid_epoch_then_resume_is_bit_for_bit(fmnist_available, tmp_path, method):
    reference = train(tiny_cfg(method, epochs=2), runs_dir=str(tmp_path / "a"), progress=False)

    steps = {"n": 0}

    def stop_after_five():
        steps["n"] += 1
        return steps["n"] == 5  # mid-epoch 2 (4 steps per epoch)

    cfg = tiny_cfg(method, epochs=2)
    train(teacher_run_config(cfg), runs_dir=str(tmp_path / "b"), progress=False)  # so only student steps count
    first = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, should_stop=stop_after_five)
    assert first.status == "interrupted" and not first.run_dir.is_done
    state = torch.load(first.run_dir.checkpoint_file, weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 1)
    with pytest.raises(RunExistsError, match="--resume"):
        train(cfg, runs_dir=str(tmp_path / "b"), progress=False)
    resumed = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, resume=True)
    assert resumed.status == "done"
    _assert_same_kept_files(reference.run_dir, resumed.run_dir)
    assert _strip_times(resumed.run_dir.metrics()) == _strip_times(reference.run_dir.metrics())


def test_killed_process_resumes_from_its_checkpoint(fmnist_available, tmp_path):
    """SIGKILL in the middle of epoch 2 (after the epoch-1 checkpoint), then `hkdbench train --resume`."""
    args = ["--teacher", "resnet_mini", "--student", "mixer_mini", "--method", "kd", "--recipe", "demo",
            *TINY, "train.epochs=6", *[f"teacher.{o}" for o in TINY_TEACHER]]
    reference = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", "train", "--runs-dir",
                                str(tmp_path / "a"), *args], capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    runs_b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "hkdbench.benchmark.cli.main", "train", "--runs-dir", str(runs_b),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in runs_b.glob("kd_*/metrics.jsonl")]
        if found:
            checkpoint = found[0].parent / "checkpoint.pt"
            break
        time.sleep(0.05)
    assert checkpoint is not None, "the run never finished an epoch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunStore(str(runs_b)).runs()
    student_dir = next(r for r in run if r.path.name.startswith("kd_"))
    assert not student_dir.is_done and student_dir.has_checkpoint
    done = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", "train", "--runs-dir", str(runs_b),
                           "--resume", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming at epoch" in done.stdout
    ref_dir = next(r for r in RunStore(str(tmp_path / "a")).runs() if r.path.name.startswith("kd_"))
    _assert_same_kept_files(ref_dir, student_dir)


def test_a_compiled_step_trains_as_the_eager_step(monkeypatch):
    """train.compile: the student and the method's modules under torch.compile give the eager step's losses and
    weights up to float rounding, under the same parameter names. Backend aot_eager here (dynamo's tracing of the
    taps and modules, AOT autograd; inductor's C++ build takes minutes on this CPU; a GPU check runs inductor)."""
    from hkdbench.benchmark.core.config import OptimConfig
    from hkdbench.benchmark.data.stream import prepare_batch
    from hkdbench.benchmark.engine.step import TrainStep, setup_training
    from hkdbench.benchmark.models.zoo import create_model

    monkeypatch.setenv("HKDBENCH_COMPILE_BACKEND", "aot_eager")
    optim = OptimConfig(name="adamw", lr=1e-3, warmup_epochs=0, clip_grad=1.0)
    images = torch.randn(3, 4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]])
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        teacher = create_model("resnet_mini", 10, in_chans=1, img_size=16)
        student = create_model("vit_mini", 10, in_chans=1, img_size=16)
        setup = setup_training("fitnet", None, student, teacher, 10, nn.CrossEntropyLoss(), None, optim, "fp32",
                               False, torch.device("cpu"), compile=compile)
        assert setup.environment()["compile"] is compile
        compiled = [m for m in setup.module.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert (student in compiled and len(compiled) > 1) if compile else not compiled  # the student, a regressor
        step = TrainStep(optim, 1, 3, setup.module, setup.module, setup.method, setup.optimizer, setup.scaler,
                         torch.device("cpu"))
        values = [step.step(prepare_batch(images[i], labels[i]), 0, i)[0] for i in range(3)]
        runs.append((values, setup.module.state_dict()))
    (eager_values, eager_state), (compiled_values, compiled_state) = runs
    assert compiled_state.keys() == eager_state.keys()
    for eager, compiled in zip(eager_values, compiled_values):
        assert compiled.keys() == eager.keys() and compiled == pytest.approx(eager, rel=1e-5, abs=1e-7)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert eager_values[0]["loss/ce"] != eager_values[-1]["loss/ce"]  # the steps did train


@pytest.mark.slow
def test_a_compiled_run_with_the_conflict_probe_trains_fresh_and_resumed(fmnist_available, tmp_path, monkeypatch):
    """train.compile with train.conflict_every (the probe's autograd.grad(..., retain_graph=True) before the step's
    backward), CRD: its memory module recompiles at step 1, and after a resume at step 2 the first backward of every
    graph is a plain step's, then step 3 is measured. Both used to fail (AOTAutograd's donated buffers); now the
    compiled run, stopped and resumed, logs the eager run's losses and conflict values up to float rounding."""
    monkeypatch.setenv("HKDBENCH_COMPILE_BACKEND", "aot_eager")
    conflict = ["train.conflict_every=3"]  # 4 steps per epoch: global steps 0 and 3, then 6
    eager = train(tiny_cfg("crd", extra=conflict), runs_dir=str(tmp_path / "eager"), progress=False, echo=False)
    cfg = tiny_cfg("crd", extra=conflict + ["train.compile=true"])
    train(teacher_run_config(cfg), runs_dir=str(tmp_path / "compiled"), progress=False, echo=False)
    calls = iter(range(100))
    first = train(cfg, runs_dir=str(tmp_path / "compiled"), progress=False, echo=False,
                  should_stop=lambda: next(calls) == 1)  # after step 1
    assert first.status == "interrupted"
    state = torch.load(first.run_dir.checkpoint_file, weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 2)
    resumed = train(cfg, runs_dir=str(tmp_path / "compiled"), resume=True, progress=False, echo=False)
    assert resumed.status == "done" and json.loads(resumed.run_dir.env_file.read_text())["compile"] is True
    want, got = eager.run_dir.metrics(), resumed.run_dir.metrics()
    assert [r["conflict/steps"] for r in got] == [1, 1]  # step 3 since the resume, then step 6
    for key in ("loss/ce", "loss/crd", "eval_loss"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], rel=1e-4), key
    assert got[1]["conflict/cosine"] == pytest.approx(want[1]["conflict/cosine"], rel=1e-3, abs=1e-5)
    assert got[1]["conflict/norm_ratio"] == pytest.approx(want[1]["conflict/norm_ratio"], rel=1e-3)


def test_setup_training_places_the_pieces():
    """The setup the trainer and the overhead benchmark share: the method built on the pair, module and teacher
    on the device in the asked memory format, the optimiser over the trainable parameters only (not the
    teacher's), the GradScaler on exactly under fp16."""
    from hkdbench.benchmark.core.config import OptimConfig
    from hkdbench.benchmark.engine.step import setup_training
    from hkdbench.benchmark.models.zoo import create_model

    teacher = create_model("resnet_mini", 10, in_chans=3, img_size=16)
    student = create_model("vit_mini", 10, in_chans=3, img_size=16)
    device = torch.device("cpu")
    setup = setup_training("fitnet", None, student, teacher, 10, nn.CrossEntropyLoss(), None,
                           OptimConfig(name="adamw", lr=1e-3), "fp16", True, device)
    assert setup.dtype == torch.float16 and setup.scaler.is_enabled() and setup.channels_last
    assert setup.module.student is student and setup.module.method is setup.method
    convs = [m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    optimised = {id(p) for g in setup.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in setup.module.parameters() if p.requires_grad}
    assert optimised == trainable and not optimised & {id(p) for p in teacher.parameters()}
    fp32 = setup_training("kd", None, student, teacher, 10, nn.CrossEntropyLoss(), None,
                          OptimConfig(name="sgd", lr=0.1), "fp32", False, device)
    assert fp32.dtype is None and not fp32.scaler.is_enabled() and isinstance(fp32.optimizer, torch.optim.SGD)
