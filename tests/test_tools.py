"""Issue 14: trackers (TensorBoard, W&B offline), progress lines, timm pretrained teachers from a hub cache,
eval and export of a run's student (loaded back by plain timm, ONNX Runtime)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.engine.progress import EpochProgress, format_duration
from hkdbench.benchmark.recipes.resolve import resolve_run_config

from _support import hub_cache as _hub_cache

TINY = ["train.epochs=2", "data.train_subset=256", "data.eval_subset=128", "data.batch_size=64",
        "train.log_interval=2"]


def hkdbench(*args, env=None, cwd=None):
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}.items() if v is not None}
    run = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", *map(str, args)], capture_output=True,
                         text=True, env=env, cwd=cwd, timeout=900)
    return run.returncode, run.stdout, run.stderr


def only_run(runs_dir, prefix=""):
    runs = [p for p in Path(runs_dir).iterdir() if p.name.startswith(prefix) and not p.name.startswith("_")]
    assert len(runs) == 1, runs
    return runs[0]


# -- progress -------------------------------------------------------------------------------------------------------

def test_progress_line_every_interval_with_rate_and_eta():
    lines, now = [], [0.0]
    progress = EpochProgress(epoch=1, epochs=4, steps=10, start_step=4, interval=3, bar=False, say=lines.append,
                             clock=lambda: now[0])
    for _ in range(6):  # steps 5..10, 0.5 s each, 64 images each
        now[0] += 0.5
        progress.update(1.23456, 1e-3, 64)
    # lines at steps 6 and 9 (multiples of 3) and at the last step, 10
    assert [line.split(" loss")[0] for line in lines] == ["epoch 2/4 step  6/10", "epoch 2/4 step  9/10",
                                                          "epoch 2/4 step 10/10"]
    # at step 6: 2 steps in 1 s -> 128 img/s; 4 steps left in the epoch (2 s) + 2 epochs x 10 steps (10 s)
    assert lines[0] == "epoch 2/4 step  6/10 loss 1.2346 lr 1.00e-03 128 img/s eta epoch 0:02 run 0:12"
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


def test_progress_on_a_terminal_draws_a_bar_and_prints_no_lines():
    lines = []
    progress = EpochProgress(epoch=0, epochs=1, steps=4, start_step=0, interval=1, bar=True, say=lines.append)
    for _ in range(4):
        progress.update(1.0, 0.1, 8)
    assert progress.bar.n == 4 and lines == []
    progress.close()


# -- config: what enters the hash -------------------------------------------------------------------------------------

def test_tracker_settings_leave_the_run_hash_alone():
    base = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd")
    watched = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd",
                                 overrides=["train.log=tensorboard", "train.log_interval=7"])
    assert watched.train.log == "tensorboard" and watched.run_name() == base.run_name()
    assert resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd",
                              overrides=["train.epochs=3"]).run_hash() != base.run_hash()
    with pytest.raises(ConfigError, match="train.log must be one of none, tensorboard, wandb"):
        resolve_run_config(kind="teacher", student="resnet_mini", overrides=["train.log=mlflow"])


def test_missing_tracker_package_fails_before_anything_is_written(tmp_path, monkeypatch):
    from hkdbench.benchmark.engine import tracking
    from hkdbench.benchmark.engine.trainer import train

    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    cfg = resolve_run_config(kind="teacher", student="resnet_mini", overrides=TINY + ["train.log=wandb"])
    with pytest.raises(tracking.TrackerUnavailableError, match=r"pip install 'hkdbench\[wandb\]'"):
        train(cfg, runs_dir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


# -- trackers -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tensorboard_events_hold_every_metric_of_metrics_jsonl(fmnist_available, runs_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code, out, err = hkdbench("teacher", "--model", "resnet_mini", "--runs-dir", runs_dir, *TINY,
                              "train.log=tensorboard")
    assert code == 0, err
    run = only_run(runs_dir)
    # not a terminal: a progress line every 2 steps (4 steps per epoch)
    assert "epoch 1/2 step 2/4 loss " in out and "epoch 2/2 step 4/4 loss " in out and " img/s eta epoch " in out
    events = EventAccumulator(str(run / "tracking" / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss/ce", "top1", "top5", "lr", "train_loss", "images_per_s", "epoch_time_s"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert run.name in events.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()


def _wandb_records(path: Path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log framing (32 KiB blocks,
    7-byte chunk headers: CRC32C, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_name_and_config(fmnist_available, runs_dir):
    pytest.importorskip("wandb")
    code, _, err = hkdbench("teacher", "--model", "resnet_mini", "--runs-dir", runs_dir, *TINY, "train.log=wandb",
                            env={"WANDB_MODE": None, "SLURM_JOB_ID": "12345"})  # offline by default on Slurm
    assert code == 0, err
    run = only_run(runs_dir)
    files = list((run / "tracking" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(_wandb_records(files[0]))
    history = [{item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
                for item in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    expected = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    # one W&B step: the optimiser steps done; a record every 2 steps, each epoch's beside its last step's
    assert [h["_step"] for h in history] == [s["step"] for s in steps] == [2, 4, 6, 8]
    epochs = [h for h in history if "epoch" in h]
    assert [(h["_step"], h["epoch"]) for h in epochs] == [(4, 1), (8, 2)]
    for got, want in zip(epochs, expected):
        for key in ("loss/ce", "top1", "lr", "train_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-9)
    for got, want in zip(history, steps):
        assert got["step/step"] == want["step"]
        for key in ("loss/ce", "lr", "train_loss", "images_per_s"):
            assert got[f"step/{key}"] == pytest.approx(want[key], rel=1e-9)
    # W&B's charts: the step/ keys against step/step, the epoch keys against epoch
    axes = {m.glob_name or m.name: m.step_metric for m in (r.metric for r in records
                                                          if r.WhichOneof("record_type") == "metric")}
    assert axes["step/*"] == "step/step" and axes["top1"] == axes["loss/ce"] == "epoch"
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].display_name == run.name and runs[0].run_id == f"hkdbench-{run.name.rsplit('_', 1)[1]}"
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["run_hash"] == run.name.rsplit("_", 1)[1] and config["train"]["epochs"] == 2


# -- pretrained teachers from a hub cache -------------------------------------------------------------------------

@pytest.fixture
def resnet18_cache(tmp_path, monkeypatch):
    """resnet18.a1_in1k 'pretrained' weights (a seeded random init) in a temporary hub cache, offline."""
    import timm
    from huggingface_hub import constants

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False).eval()
    cache = tmp_path / "hub"
    file = _hub_cache(cache, "timm/resnet18.a1_in1k", reference.state_dict())
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return reference, file, cache


def test_pretrained_weights_resolve_from_the_cache_and_load(resnet18_cache):
    import hashlib

    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.models.pretrained import resolve_pretrained

    reference, file, _ = resnet18_cache
    weights = resolve_pretrained("resnet18")  # timm's default tag
    assert weights.name == "resnet18.a1_in1k" and weights.file == file and weights.num_classes == 1000
    assert weights.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    as_is = create_model("resnet18", 1000, in_chans=3, pretrained="resnet18.a1_in1k").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(as_is.model(x), reference(x))
    tuned = create_model("resnet18", 10, in_chans=3, pretrained="resnet18.a1_in1k")  # a 10-class head: fresh
    assert torch.equal(tuned.model.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    assert tuned.model.fc.weight.shape == (10, 512)
    with pytest.raises(ValueError, match="the cached file changed"):
        create_model("resnet18", 10, pretrained="resnet18.a1_in1k", pretrained_sha256="0" * 64)


def test_pretrained_identity_enters_the_teacher_runs_hash(resnet18_cache):
    from hkdbench.benchmark.models.pretrained import _HASHES
    from hkdbench.benchmark.recipes.resolve import teacher_run_config

    _, file, _ = resnet18_cache
    args = dict(kind="student", student="vit_mini", teacher="resnet18", method="kd")
    scratch = resolve_run_config(**args)
    tuned = resolve_run_config(**args, teacher_pretrained="resnet18.a1_in1k")
    t_cfg = teacher_run_config(tuned)  # Fashion-MNIST: the teacher run fine-tunes the ImageNet weights
    assert t_cfg.student.pretrained == "resnet18.a1_in1k" and len(t_cfg.student.pretrained_sha256) == 64
    assert t_cfg.run_hash() != teacher_run_config(scratch).run_hash() and tuned.run_hash() != scratch.run_hash()
    file.write_bytes(file.read_bytes() + b" ")  # other weights under the same name: another run
    _HASHES.clear()
    assert teacher_run_config(resolve_run_config(**args, teacher_pretrained="resnet18")).run_hash() != t_cfg.run_hash()
    with pytest.raises(ConfigError, match="vit_mini is one of the suite's own configurations"):
        resolve_run_config(kind="student", student="resnet_mini", teacher="vit_mini", method="kd",
                           teacher_pretrained="vit_tiny_patch16_224")
    with pytest.raises(ConfigError, match="are for resnet18; swin_tiny is swin_tiny_patch4_window7_224"):
        resolve_run_config(kind="student", student="resnet_mini", teacher="swin_tiny", method="kd",
                           teacher_pretrained="resnet18.a1_in1k")


def test_weights_missing_offline_fail_before_anything_is_written(tmp_path):
    runs = tmp_path / "runs"
    code, _, err = hkdbench("train", "--teacher", "resnet18", "--teacher-pretrained", "resnet18.tv_in1k",
                            "--student", "resnet_mini", "--runs-dir", runs,
                            env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert code == 2 and "resnet18.tv_in1k" in err and "not in the hub cache" in err and "HF_HUB_OFFLINE" in err
    assert not runs.exists()


def test_imagenet_preset_uses_pretrained_teachers_and_scratch_teachers_warn(tmp_path, monkeypatch):
    from _support import imagenet_preset_weights

    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset

    imagenet_preset_weights(tmp_path, monkeypatch)
    plan = expand(load_preset("imagenet-ofa"))
    assert plan.teachers == []  # ImageNet weights on ImageNet: used as they are, no teacher run
    teachers = {r.cfg.teacher.pretrained for r in plan.students if r.cfg.teacher is not None}
    assert teachers == {"swin_tiny_patch4_window7_224.ms_in1k", "convnext_tiny.fb_in1k"}
    with pytest.warns(UserWarning, match="TRAINED FROM SCRATCH on ImageNet"):
        scratch = expand(load_preset("imagenet-ofa", ["teacher_pretrained.swin_tiny=null",
                                                       "teacher_pretrained.convnext_tiny=null"]))
    assert len(scratch.teachers) == 2


# -- eval and export ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory):
    """A finished student run of a timm architecture (resnet18 at 32 px), trained for one short epoch."""
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    runs = tmp_path_factory.mktemp("runs")
    code, _, err = hkdbench("teacher", "--model", "resnet18", "--runs-dir", runs, "train.epochs=1",
                            "data.train_subset=256", "data.eval_subset=200", "data.batch_size=64")
    assert code == 0, err
    return only_run(runs)


@pytest.mark.slow
def test_eval_reproduces_the_runs_own_accuracy(resnet18_run):
    from hkdbench.benchmark.engine.eval_run import evaluate_run

    summary = json.loads((resnet18_run / "summary.json").read_text())
    result = evaluate_run(resnet18_run)["student"]
    assert result["top1"] == pytest.approx(summary["best_top1"]) and result["weights"] == "best.pt"
    assert result["top5"] == pytest.approx(summary["best_top5"])
    code, out, _ = hkdbench("eval", resnet18_run, "--weights", "last", "data.eval_subset=100")
    assert code == 0 and out.startswith("student: top-1 ") and "(final.pt)" in out
    code, _, err = hkdbench("eval", resnet18_run, "--teacher")
    assert code == 2 and "has no teacher to evaluate" in err
    code, _, err = hkdbench("eval", resnet18_run, "data.img_size=64")
    assert code == 2 and "data.img_size cannot change" in err


@pytest.mark.slow
def test_timm_export_loads_in_plain_timm_with_the_same_logits(resnet18_run, tmp_path):
    import timm

    from hkdbench.benchmark.engine.eval_run import load_student
    from hkdbench.benchmark.core.store import RunDir

    student = load_student(RunDir(resnet18_run)).model
    code, out, err = hkdbench("export", resnet18_run, "--format", "timm", "--out", tmp_path / "timm")
    assert code == 0, err
    folder = tmp_path / "timm"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and config["pretrained_cfg"]["mean"] == [0.286]
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = student(x)
        by_folder = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        by_file = timm.create_model("resnet18", pretrained=True, num_classes=10, in_chans=1,
                                    pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                                num_classes=10)).eval()
        assert torch.allclose(by_folder(x), expected, atol=1e-6) and torch.allclose(by_file(x), expected, atol=1e-6)
    assert sum(p.numel() for p in by_folder.parameters()) == sum(p.numel() for p in student.parameters())

    code, out, err = hkdbench("export", resnet18_run, "--format", "safetensors", "--out", tmp_path / "st")
    assert code == 0, err
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = next((tmp_path / "st").glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        assert json.loads(f.metadata()["timm_config"])["architecture"] == "resnet18"
    plain = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    plain.load_state_dict(load_file(str(file)))
    with torch.no_grad():
        assert torch.allclose(plain(x), expected, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_matches_the_student_in_onnx_runtime(resnet18_run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from hkdbench.benchmark.engine.eval_run import load_student
    from hkdbench.benchmark.core.store import RunDir

    code, out, err = hkdbench("export", resnet18_run, "--format", "onnx", "--out", tmp_path)
    assert code == 0, err
    file = next(tmp_path.glob("*.onnx"))
    x = torch.randn(5, 1, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    got = ort.InferenceSession(str(file)).run(["logits"], {"images": x.numpy()})[0]
    with torch.no_grad():
        expected = load_student(RunDir(resnet18_run)).model(x)
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-4)


def test_export_refuses_a_model_timm_cannot_build_before_writing(tmp_path):
    from hkdbench.benchmark.engine.export import check_format

    with pytest.raises(ConfigError, match="resnet_mini is one of hkdbench's own small configurations"):
        check_format("timm", None, "resnet_mini")
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        check_format("tflite", "resnet18", "resnet18")


@pytest.mark.slow
def test_eval_scores_the_teacher_the_run_distilled_from(fmnist_available, runs_dir):
    from hkdbench.benchmark.engine.eval_run import evaluate_run

    code, _, err = hkdbench("train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "kd",
                            "--runs-dir", runs_dir, "teacher.train.epochs=1", "teacher.data.eval_subset=128",
                            "teacher.data.train_subset=256", "train.epochs=1",
                            "data.train_subset=256", "data.eval_subset=128", "data.batch_size=64")
    assert code == 0, err
    run = only_run(runs_dir, "kd_")
    summary = json.loads((run / "summary.json").read_text())
    scores = evaluate_run(run, teacher=True)  # the same 128 test images the teacher run evaluated on
    assert scores["teacher"]["top1"] == pytest.approx(summary["teacher_top1"])
    assert scores["teacher"]["weights"] == f"best weights of {summary['teacher_run']}"
    assert scores["student"]["top1"] == pytest.approx(summary["best_top1"])


def test_the_teacher_run_is_watched_like_the_student_run():
    from hkdbench.benchmark.recipes.resolve import teacher_run_config

    args = dict(kind="student", student="vit_mini", teacher="resnet_mini", method="kd")
    watched = resolve_run_config(**args, overrides=["train.log=tensorboard", "train.log_interval=5"])
    t_cfg = teacher_run_config(watched)
    assert (t_cfg.train.log, t_cfg.train.log_interval) == ("tensorboard", 5)
    assert t_cfg.run_name() == teacher_run_config(resolve_run_config(**args)).run_name()
    quiet = resolve_run_config(**args, overrides=["train.log=wandb"], teacher_overrides=["train.log=none"])
    assert teacher_run_config(quiet).train.log == "none"
