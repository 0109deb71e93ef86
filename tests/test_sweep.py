"""Sweep presets, their expansion, and dispatch inline / on local processes; the status table."""
import contextlib
import io
import itertools
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.models.zoo import zoo_entry
from hkdbench.benchmark.sweep.plan import expand
from hkdbench.benchmark.sweep.preset import load_preset, missing_requirements, preset_names

OFA_CIFAR_PAIRS = [  # spec section 8.1, in the table's order
    ("swin_tiny", "resnet18"), ("vit_small", "resnet18"), ("mixer_b16", "resnet18"),
    ("swin_tiny", "mobilenetv2_100"), ("vit_small", "mobilenetv2_100"), ("mixer_b16", "mobilenetv2_100"),
    ("convnext_tiny", "deit_tiny"), ("mixer_b16", "deit_tiny"), ("convnext_tiny", "swin_pico"),
    ("mixer_b16", "swin_pico"), ("convnext_tiny", "resmlp_12"), ("swin_tiny", "resmlp_12")]
TINY = {"train_subset": 256, "eval_subset": 256, "batch_size": 64, "img_size": 16}


def hkdbench(*args):
    from hkdbench.benchmark.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def tiny_preset(tmp_path, name="tiny", **fields):
    body = {"name": name, "dataset": "fashion-mnist", "recipe": "demo", "teachers": ["resnet_mini"],
            "students": ["vit_mini"], "methods": ["none", "kd"], "seeds": [0],
            "overrides": {"data": TINY, "train": {"epochs": 2}},
            "teacher_overrides": {"data": TINY, "train": {"epochs": 1}}, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


# ---------------------------------------------------------------------------------------------- presets

def test_shipped_presets():
    assert {"demo", "cifar100-ofa", "cifar100-pat", "imagenet-ofa"} <= set(preset_names())


def test_cifar100_ofa_is_the_ofa_table():
    preset = load_preset("cifar100-ofa")
    plan = expand(preset)
    assert preset.pair_list() == OFA_CIFAR_PAIRS
    assert plan.cells == [(t, s, m, seed) for (t, s), m, seed in
                          itertools.product(OFA_CIFAR_PAIRS, ["none", "kd", "fitnet", "dkd", "ofa"], [0, 1, 2])]
    assert len(plan.cells) == 180
    # the student-alone baseline is one run per student and seed, shared by its teachers
    assert len(plan.students) == 12 * 4 * 3 + 5 * 3
    assert sorted(r.cfg.student.name for r in plan.teachers) == ["convnext_tiny", "mixer_b16", "swin_tiny",
                                                                 "vit_small"]
    for spec in plan.students:
        cnn = zoo_entry(spec.cfg.student.name).family == "cnn"
        assert spec.cfg.recipe == ("cifar-cnn" if cnn else "cifar-vit")
        assert spec.cfg.data.dataset == "cifar100" and spec.cfg.data.img_size == 224
        assert spec.cfg.data.pipeline == "paper224"
        if spec.cfg.method != "none":
            assert spec.cfg.teacher_recipe == "cifar-teacher" and spec.teacher_run in {t.name for t in plan.teachers}
    assert missing_requirements(preset) == ["data.root"]
    with_root = load_preset("cifar100-ofa", ["data.root=/data/cifar"])
    assert missing_requirements(with_root) == []
    plan = expand(with_root)
    assert {r.cfg.data.root for r in plan.runs} == {"/data/cifar"}  # teachers inherit the data location


def test_other_presets_expand(tmp_path, monkeypatch):
    from _support import imagenet_preset_weights

    imagenet_preset_weights(tmp_path, monkeypatch)  # the ImageNet preset's timm teachers, from a hub cache
    pat = expand(load_preset("cifar100-pat"))
    assert ("convnext_tiny", "deit_tiny") in pat.preset.pair_list() and "pat" in pat.preset.methods
    assert len(pat.cells) == 4 * 5 * 3
    # PAT's runs: the released YAMLs with command_cifar.sh's --amp --model-ema on one rank
    assert {r.cfg.recipe for r in pat.students} == {"cifar-cnn-pat-runs", "cifar-vit-pat-runs"}
    assert {(r.cfg.train.ema_decay, r.cfg.train.precision, r.cfg.train.world) for r in pat.students} == {
        (0.9998, "fp16", 1)}
    imagenet = expand(load_preset("imagenet-ofa"))
    assert {r.cfg.recipe for r in imagenet.students} == {"imagenet-cnn-ofa-runs", "imagenet-vit-ofa-runs"}
    # 8 GPUs, one per rank of OFA-KD's 8
    assert imagenet.preset.slurm.gpus_per_node == 8 == {r.cfg.train.world for r in imagenet.students}.pop()
    demo = expand(load_preset("demo"))
    # every cross-family pair of resnet/vit/mixer; `none` runs once per student, not once per pair
    assert len(demo.preset.pair_list()) == 6 and all(t != s for t, s in demo.preset.pair_list())
    assert len(demo.teachers) == 3 and len(demo.students) == 6 * 8 * 2 + 3 * 2
    assert {r.cfg.data.img_size for r in demo.runs} == {32}


def test_typo_in_a_preset_names_the_field_and_the_allowed_ones(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("teachers: [resnet_mini]\nstudnets: [vit_mini]\nmethods: [kd]\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) 'studnets'.*allowed: .*students"):
        load_preset(str(path))
    code, _, err = hkdbench("sweep", str(path), "--dry-run")
    assert code == 2 and "'studnets'" in err and "students" in err
    with pytest.raises(ConfigError, match=r"'partiton'.*allowed: .*partition"):
        load_preset("demo", ["slurm.partiton=gpu"])
    with pytest.raises(ConfigError, match=r"unknown student model 'vit_mni'.*known models"):
        load_preset("demo", ["students=[vit_mni]"])
    with pytest.raises(ConfigError, match=r"unknown method 'ofx'.*known methods"):
        load_preset("demo", ["methods=[kd,ofx]"])
    with pytest.raises(ConfigError, match=r"method\.<name>\.<field>"):
        load_preset("demo", ["method.eps=[1.5]"])
    with pytest.raises(ConfigError, match=r"train\.epochs must be >= 1"):  # resolved at expansion
        expand(load_preset("demo", ["train.epochs=0"]))


def test_overrides_reach_every_field():
    p = load_preset("demo", ["seeds=[0]", "train.epochs=1", "slurm.partition=gpu", "slurm.time=90",
                             "teacher.train.epochs=3", "method.ofa.eps=[1.5]", "methods=[kd,ofa]"])
    assert p.seeds == (0,) and p.slurm.partition == "gpu" and p.slurm.time == 90 and p.methods == ("kd", "ofa")
    plan = expand(p)
    assert {r.cfg.train.epochs for r in plan.students} == {1}
    assert {r.cfg.train.epochs for r in plan.teachers} == {3}
    assert {tuple(r.cfg.method_cfg["eps"]) for r in plan.students if r.cfg.method == "ofa"} == {(1.5,)}


def test_inline_grid():
    p = load_preset(None, grid={"teachers": ["resnet_mini", "convnext_mini"], "students": ["vit_mini"],
                                "methods": ["kd", "ofa"], "seeds": [0, 1]})
    plan = expand(p)
    assert len(plan.cells) == 2 * 1 * 2 * 2 and len(plan.teachers) == 2
    # on top of a preset: keeps the preset's teachers, replaces the students
    p = load_preset("demo", grid={"students": ["swin_mini"]})
    assert p.pair_list() == [(t, "swin_mini") for t in ("mixer_mini", "resnet_mini", "vit_mini")]
    # the same as key=value overrides: they replace the preset's explicit pairs too, not silently nothing
    assert load_preset("demo", ["students=[swin_mini]"]).pair_list() == p.pair_list()
    assert load_preset("demo", ["students=swin_mini", "teachers=[vit_mini]"]).pair_list() == [("vit_mini",
                                                                                                "swin_mini")]
    code, out, _ = hkdbench("sweep", "--teachers", "resnet_mini", "--students", "vit_mini,mixer_mini",
                            "--methods", "kd", "--seeds", "0,1", "--dry-run", "train.epochs=1")
    assert code == 0 and "4 cells = 2 pairs x 1 methods x 2 seeds -> 4 student runs + 1 teacher runs" in out


def test_dry_run_of_cifar100_ofa_lists_the_pairs(tmp_path):
    code, out, _ = hkdbench("sweep", "cifar100-ofa", "--dry-run", "--executor", "slurm", "--runs-dir", tmp_path)
    assert code == 0
    assert "180 cells = 12 pairs x 5 methods x 3 seeds -> 159 student runs + 4 teacher runs" in out
    for i, (t, s) in enumerate(OFA_CIFAR_PAIRS, 1):
        assert f"{i:2d}. {t} (" in out and f"-> {s} (" in out
    assert "data.root must be given" in out and "as job arrays, each after its own teacher's task (afterok)" in out
    code, _, err = hkdbench("sweep", "cifar100-ofa", "--executor", "slurm", "--runs-dir", tmp_path)
    assert code == 2 and "needs data.root" in err


# ---------------------------------------------------------------------------------------------- dispatch

@pytest.mark.usefixtures("fmnist_available")
def test_inline_sweep_then_rerun_runs_nothing(tmp_path):
    preset, runs = tiny_preset(tmp_path), tmp_path / "runs"
    code, out, _ = hkdbench("sweep", preset, "--runs-dir", runs)
    assert code == 0 and "3 runs: 3 done" in out
    dirs = [p for p in runs.iterdir() if (p / "config.json").exists()]
    assert len(dirs) == 3
    stamps = {p.name: (p / "final.pt").stat().st_mtime_ns for p in dirs}
    logs = {p.name: (p / "log.txt").read_text() for p in dirs}
    code, out, _ = hkdbench("sweep", preset, "--runs-dir", runs)
    assert code == 0 and "0 to run, 3 skipped (3 done)" in out
    assert {p.name: (p / "final.pt").stat().st_mtime_ns for p in dirs} == stamps
    assert {p.name: (p / "log.txt").read_text() for p in dirs} == logs  # not even opened for training
    # the teacher was trained by its own run, once; the kd run reused it
    kd = next(p for p in dirs if p.name.startswith("kd_"))
    assert "training it first" not in (kd / "log.txt").read_text()
    # provenance: both command lines in the manifest; the report gives them and the wall time of the sweep
    manifest = json.loads(next(runs.glob("_sweeps/*/sweep.json")).read_text())
    command = f"hkdbench sweep {preset} --runs-dir {runs}"
    assert [i["command"] for i in manifest["invocations"]] == [command, command]
    assert {i["executor"] for i in manifest["invocations"]} == {"inline"}
    for p in dirs:
        env, summary = json.loads((p / "env.json").read_text()), json.loads((p / "summary.json").read_text())
        assert env["cpu"] and env["cpu_count"] >= 1 and summary["finished"] >= env["time"][:19]
    from hkdbench.analysis.report import make_report

    index = make_report(runs, tmp_path / "report").read_text()
    assert f"`{command}` (inline, " in index and "It trained 3 runs from " in index and "wall time " in index
    assert "(some finish times estimated" not in index


@pytest.mark.usefixtures("fmnist_available")
def test_local_executor_sweep(tmp_path):
    preset, runs = tiny_preset(tmp_path, methods=["none"], seeds=[0, 1]), tmp_path / "runs"
    code, out, err = hkdbench("sweep", preset, "--executor", "local", "--runs-dir", runs, "--parallel", "2")
    assert code == 0, out + err
    assert "2 runs: 2 done" in out and "as local job" in out
    assert (runs / "_submitit").is_dir()
    for p in runs.iterdir():
        if (p / "config.json").exists():
            assert (p / "DONE").exists() and (p / "jobs.jsonl").exists()


@pytest.mark.usefixtures("fmnist_available")
def test_status_reports_done_failed_partial_and_pending(tmp_path):
    from hkdbench.benchmark.core.store import RunStore

    preset, runs = tiny_preset(tmp_path, methods=["none"], seeds=[0, 1, 2, 3]), tmp_path / "runs"
    hkdbench("sweep", preset, "--runs-dir", runs, "seeds=[0]")
    plan = expand(load_preset(preset))
    store = RunStore(runs)
    failed = store.run_dir(plan.students[1].cfg)
    failed.claim(plan.students[1].cfg)
    failed.mark_failed("non-finite loss at epoch 1, step 3: ce=nan", log="/some/log.err")
    partial = store.run_dir(plan.students[2].cfg)
    partial.claim(plan.students[2].cfg)
    partial.checkpoint_file.write_bytes(b"x")
    code, out, _ = hkdbench("status", preset, "--runs-dir", runs)
    assert code == 0
    assert "4 runs: 1 done, 1 partial, 1 pending, 1 failed" in out
    assert "failed: non-finite loss at epoch 1, step 3: ce=nan" in out and "log: /some/log.err" in out
    sweep_dir = next((runs / "_sweeps").iterdir())
    code, out2, _ = hkdbench("status", sweep_dir)
    assert code == 0 and "1 done" in out2
    # failed runs are not re-submitted unless asked
    code, out, _ = hkdbench("sweep", preset, "--runs-dir", runs, "--dry-run")
    assert "then 2 student run(s)" in out
    code, out, _ = hkdbench("sweep", preset, "--runs-dir", runs, "--dry-run", "--retry-failed")
    assert "then 3 student run(s)" in out


@pytest.mark.usefixtures("fmnist_available")
def test_checkpoint_stops_the_trainer_saves_and_the_requeued_job_resumes(tmp_path):
    """What submitit's USR2 handler does, without Slurm: checkpoint() while __call__ runs."""
    from hkdbench.benchmark.sweep.job import RunJob
    from hkdbench.benchmark.engine.trainer import train

    preset = tiny_preset(tmp_path, methods=["none"], overrides={"data": {**TINY, "train_subset": 2048},
                                                                 "train": {"epochs": 2}})
    (spec,) = expand(load_preset(preset)).students
    runs = tmp_path / "runs"
    job = RunJob(spec.cfg.to_dict(), str(runs), "cpu", 1, stop_wait_s=60)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(job()))
    worker.start()
    log = runs / spec.name / "log.txt"
    deadline = time.time() + 60
    while not (log.exists() and "steps/epoch" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    delayed = job.checkpoint()
    worker.join(30)
    assert outcome["status"] == "interrupted"
    assert (runs / spec.name / "checkpoint.pt").exists() and not (runs / spec.name / "DONE").exists()
    assert "stop requested; checkpoint saved" in log.read_text()
    assert isinstance(delayed.function, RunJob) and delayed.function is not job
    assert delayed.result()["status"] == "done"  # the requeued job resumes from the run dir
    assert "resuming at epoch" in log.read_text()
    reference = train(spec.cfg, runs_dir=str(tmp_path / "reference"), progress=False)
    ours = torch.load(runs / spec.name / "final.pt", weights_only=True)
    theirs = torch.load(reference.run_dir.path / "final.pt", weights_only=True)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert Path(runs / spec.name / "summary.json").exists()


def test_status_and_cancel_take_an_inline_grid_with_overrides_as_the_sweep_does(tmp_path):
    grid = ["--teachers", "resnet_mini", "--students", "vit_mini", "--methods", "kd", "--seeds", "0"]
    code, out, err = hkdbench("sweep", *grid, "train.epochs=1", "--dry-run", "--runs-dir", tmp_path)
    assert code == 0, err
    sweep_id = out.split()[1].rstrip(":")
    code, out, err = hkdbench("status", *grid, "train.epochs=1", "--runs-dir", tmp_path)
    assert code == 0, err
    assert f"(sweep {sweep_id})" in out and "2 runs: 2 pending" in out  # the runs the sweep would train
    code, out, err = hkdbench("cancel", *grid, "train.epochs=1", "--runs-dir", tmp_path)
    assert code == 0 and "no queued or running job to cancel" in out, err
    code, _, err = hkdbench("status", "--runs-dir", tmp_path)
    assert code == 2 and "inline grid" in err
    code, _, err = hkdbench("status", "demo", "oops", "--runs-dir", tmp_path)
    assert code == 2 and "expected key=value overrides after the preset or sweep, got oops" in err
