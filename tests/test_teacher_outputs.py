"""Stored teacher outputs (train.teacher_outputs=stored): the same runs as with the live teacher, bit for bit on the
CPU; no teacher built once they are stored; damaged, missing, cut-off or unlisted shards computed again; outputs of
other weights or another stream never taken."""
import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from test_cohort import TINY_TEACHER, assert_same_run, cfg_of

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.engine import teacher as teacher_module
from hkdbench.benchmark.engine.cohort import group_cohorts, reads_stored
from hkdbench.benchmark.engine.teacher_outputs import TeacherOutputsError, estimated_bytes
from hkdbench.benchmark.engine.trainer import compute_teacher_outputs, train, train_cohort
from hkdbench.methods import STAGES, Distiller, get_method, list_methods, register_method
from hkdbench.methods.kd import KD

pytestmark = pytest.mark.usefixtures("fmnist_available")

STORABLE = ["kd", "dkd", "dist", "ofa", "spofa", "crd", "hcd"]
STORED = ["train.teacher_outputs=stored"]


def stored_cfg(method, epochs=2, extra=()):
    return cfg_of(method, epochs, extra=[*STORED, *extra])


def train_all(cfgs, runs_dir):
    """Every run of ``cfgs``, its cohorts trained one after another; run name -> result."""
    results = [r for group in group_cohorts(cfgs) for r in train_cohort(group, runs_dir=str(runs_dir),
                                                                        progress=False, echo=False)]
    return {r.run_dir.path.name: r for r in results}


def outputs_folders(runs_dir):
    return RunStore(runs_dir).teacher_outputs()


def count_teacher_builds(monkeypatch):
    """[how many times the teacher's model was built from here on]."""
    count, build = [0], teacher_module.TeacherSource.build

    def counted(*args, **kwargs):
        count[0] += 1
        return build(*args, **kwargs)
    monkeypatch.setattr(teacher_module.TeacherSource, "build", counted)
    return count


def no_teacher_built(monkeypatch):
    """Any build of the teacher's model from here on fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was built")
    monkeypatch.setattr(teacher_module.TeacherSource, "build", refuse)


def test_methods_say_what_they_read_of_the_teacher():
    reads = {name: get_method(name).teacher_reads for name in list_methods() if get_method(name).uses_teacher}
    assert reads == {"kd": "logits", "dkd": "logits", "dist": "logits", "ofa": "logits", "spofa": "logits",
                     "crd": "pre_logits", "hcd": "pre_logits", "fitnet": "stages", "pat": "own_pass"}
    assert [m for m in STORABLE if not reads_stored(stored_cfg(m))] == []
    assert not reads_stored(stored_cfg("fitnet")) and not reads_stored(stored_cfg("pat"))
    assert not reads_stored(cfg_of("kd")) and not reads_stored(stored_cfg("kd", extra=["train.probe_every=1"]))


def test_a_plugin_declares_what_it_reads_or_keeps_the_live_teacher():
    assert Distiller.teacher_reads == STAGES  # undeclared: read live, whatever it reads

    class Wrong(KD):
        name = "wrong_reader"
        teacher_reads = "everything"
    with pytest.raises(TypeError, match="teacher_reads must be one of logits, pre_logits, stages, own_pass"):
        register_method(Wrong)
    assert "wrong_reader" not in list_methods()


def test_the_setting_is_how_not_what_the_run_computes():
    assert stored_cfg("kd").run_name() == cfg_of("kd").run_name()
    with pytest.raises(ValueError, match="train.teacher_outputs must be live or stored"):
        cfg_of("kd", extra=["train.teacher_outputs=cached"])


@pytest.mark.slow
def test_every_method_that_can_reads_stored_outputs_with_the_live_runs_numbers(tmp_path, monkeypatch):
    live = train_all([cfg_of(m) for m in STORABLE], tmp_path / "live")
    stored = train_all([stored_cfg(m) for m in STORABLE], tmp_path / "stored")
    assert sorted(live) == sorted(stored) and all(r.status == "done" for r in stored.values())
    for name in live:
        assert_same_run(live[name].run_dir, stored[name].run_dir)
    (folder,) = outputs_folders(tmp_path / "stored")
    manifest = folder.manifest()
    assert manifest["made_by"]["contents"] == ["logits", "pre_logits"] and sorted(manifest["shards"]) == ["0", "1"]
    shard = torch.load(folder.shard_file(0))
    assert shard["logits"].shape == (3, 1, 64, 10) and shard["pre_logits"].shape[:3] == (3, 1, 64)
    # each method alone (a cohort of one), the outputs stored: no teacher built, the same numbers again
    no_teacher_built(monkeypatch)
    for method in ("kd", "crd"):
        again = train(stored_cfg(method), runs_dir=str(tmp_path / "stored"), restart=True, progress=False,
                      echo=False)
        assert_same_run(live[again.run_dir.path.name].run_dir, again.run_dir)


@pytest.mark.slow
def test_emulated_ranks_read_each_ranks_stored_outputs(tmp_path):
    extra = ["train.world=2", "data.batch_size=32"]
    (live,) = train_all([cfg_of("dist", 1, extra)], tmp_path / "live").values()
    (stored,) = train_all([stored_cfg("dist", 1, extra)], tmp_path / "stored").values()
    assert_same_run(live.run_dir, stored.run_dir)
    (folder,) = outputs_folders(tmp_path / "stored")
    assert torch.load(folder.shard_file(0))["logits"].shape == (3, 2, 32, 10)


def test_a_cohort_with_a_method_that_needs_the_live_teacher_runs_it_live(tmp_path):
    results = train_cohort([stored_cfg("kd", 1), stored_cfg("fitnet", 1)], runs_dir=str(tmp_path), progress=False,
                           echo=False)
    assert [r.status for r in results] == ["done", "done"]
    assert outputs_folders(tmp_path) == []
    assert "fitnet needs the live teacher" in results[0].run_dir.log_file.read_text()
    # kept together: split, the teacher would run once for the readers' outputs and again for fitnet
    assert [len(g) for g in group_cohorts([stored_cfg("kd"), stored_cfg("fitnet"), stored_cfg("none")])] == [3]


def _damage(folder, how):
    path = folder.shard_file(1)
    if how == "flipped byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "cut off":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "missing":
        path.unlink()
    elif how == "not listed":  # killed after the shard's rename, before the manifest named it
        manifest = folder.manifest()
        del manifest["shards"]["1"]
        folder.write_manifest(manifest)
    elif how == "temp file left":  # killed while writing the shard: only its temp file, not listed
        (folder.path / f".{path.name}.0badf00d").write_bytes(path.read_bytes()[:500])
        path.unlink()
        manifest = folder.manifest()
        del manifest["shards"]["1"]
        folder.write_manifest(manifest)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped byte", "cut off", "missing", "not listed", "temp file left"])
def test_a_damaged_or_partial_shard_is_computed_again_before_use(tmp_path, how):
    (live,) = train_all([cfg_of("kd")], tmp_path / "live").values()
    outputs = compute_teacher_outputs([stored_cfg("kd")], str(tmp_path / "stored"), echo=False)
    good = outputs.folder.shard_file(1).read_bytes()
    _damage(outputs.folder, how)
    assert outputs.missing_epochs(2) == [1]
    (stored,) = train_all([stored_cfg("kd")], tmp_path / "stored").values()
    assert_same_run(live.run_dir, stored.run_dir)
    assert outputs.folder.shard_file(1).read_bytes() == good  # the same bytes, computed again
    assert outputs.missing_epochs(2) == [] and not list(outputs.folder.path.glob(".epoch_*"))
    assert "computing its outputs on the data stream for epoch(s) 2 into" in stored.run_dir.log_file.read_text()


@pytest.mark.slow
def test_a_shard_damaged_during_training_is_a_clear_error_and_the_resume_computes_it(tmp_path):
    store = tmp_path / "stored"
    outputs = compute_teacher_outputs([stored_cfg("kd")], str(store), echo=False)
    real_load = outputs.__class__._load

    def damage_then_load(self, epoch):
        if epoch == 1:
            _damage(self.folder, "flipped byte")
        return real_load(self, epoch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outputs.__class__, "_load", damage_then_load)
        with pytest.raises(TeacherOutputsError, match="epoch_1.pt is missing or damaged"):
            train(stored_cfg("kd"), runs_dir=str(store), progress=False, echo=False)
    (live,) = train_all([cfg_of("kd")], tmp_path / "live").values()
    resumed = train(stored_cfg("kd"), runs_dir=str(store), resume=True, progress=False, echo=False)
    assert_same_run(live.run_dir, resumed.run_dir)


def test_a_checkpoint_teacher_is_keyed_by_its_file_and_measured_once(tmp_path):
    from test_cohort import TINY

    from hkdbench.benchmark.models.zoo import create_model
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    torch.manual_seed(0)
    torch.save(create_model("resnet_mini", 10, in_chans=1, img_size=16).model.state_dict(), tmp_path / "t.pt")

    def cfg(extra):
        return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="dkd",
                                  recipe="demo", teacher_checkpoint=str(tmp_path / "t.pt"),
                                  overrides=[*TINY, "train.epochs=1", *extra])
    live = train(cfg([]), runs_dir=str(tmp_path / "live"), progress=False, echo=False)
    stored = train(cfg(STORED), runs_dir=str(tmp_path / "stored"), progress=False, echo=False)
    assert_same_run(live.run_dir, stored.run_dir)  # teacher_top1 included: the writer measured it as the loop does
    (folder,) = outputs_folders(tmp_path / "stored")
    assert folder.manifest()["made_by"]["teacher"]["checkpoint_sha256"] == hashlib.sha256(
        (tmp_path / "t.pt").read_bytes()).hexdigest()


def test_outputs_made_by_other_weights_are_refused_before_anything_is_written(tmp_path):
    store = tmp_path / "runs"
    outputs = compute_teacher_outputs([stored_cfg("kd", 1)], str(store), echo=False)
    manifest = outputs.folder.manifest()
    manifest["made_by"]["teacher"]["sha256"] = "0" * 64  # a folder of another teacher under this name
    outputs.folder.write_manifest(manifest)
    cfg = stored_cfg("kd", 1)
    with pytest.raises(TeacherOutputsError, match="made by other weights or another data stream"):
        train(cfg, runs_dir=str(store), progress=False, echo=False)
    assert not RunStore(store).run_dir(cfg).path.exists()


def test_under_ddp_the_outputs_must_be_computed_first(tmp_path):
    from hkdbench.benchmark.engine.teacher_outputs import check_can_store

    store, cpu = RunStore(tmp_path), torch.device("cpu")
    compute_teacher_outputs([stored_cfg("kd", 1)], str(tmp_path), echo=False)
    check_can_store([stored_cfg("kd", 1)], True, store, cpu, 1)  # all there: read under DDP
    with pytest.raises(ConfigError, match="run `hkdbench teacher-outputs` with the same settings on one process"):
        check_can_store([stored_cfg("kd", 2)], True, store, cpu, 2)  # epoch 2 missing
    check_can_store([stored_cfg("kd", 2)], False, store, cpu, 2)  # one process: it computes them itself


def test_settings_that_json_reads_back_otherwise_still_match_their_manifest(tmp_path):
    cfg = stored_cfg("kd", 1, ["data.rrc_scale=[0.35, 1.0]"])  # a tuple in the config, a list in the manifest
    first = compute_teacher_outputs([cfg], str(tmp_path), echo=False)
    again = compute_teacher_outputs([cfg], str(tmp_path), echo=False)
    assert first.folder.path == again.folder.path and again.missing_epochs(1) == []


def test_new_weights_or_another_stream_get_outputs_of_their_own(tmp_path):
    store = tmp_path / "runs"
    first = compute_teacher_outputs([stored_cfg("kd", 1)], str(store), echo=False)
    other_seed = compute_teacher_outputs([stored_cfg("kd", 1, ["train.seed=1"])], str(store), echo=False)
    t_dir = RunStore(store).runs()[0]
    assert t_dir.path.name.startswith("teacher_resnet_mini")
    weights = torch.load(t_dir.weights_file("best"))
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, t_dir.weights_file("best"))
    retrained = compute_teacher_outputs([stored_cfg("kd", 1)], str(store), echo=False)
    folders = {first.folder.path, other_seed.folder.path, retrained.folder.path}
    assert len(folders) == 3 and len(outputs_folders(store)) == 3
    assert not torch.equal(torch.load(first.folder.shard_file(0))["logits"],
                           torch.load(retrained.folder.shard_file(0))["logits"])


def test_the_size_estimate_counts_every_step_rank_and_epoch():
    cfg = stored_cfg("kd", 3)
    # 192 images (3 steps of 64) x 10 classes x 3 epochs x 4 bytes (fp32)
    assert estimated_bytes([cfg], torch.device("cpu")) == 3 * 192 * 10 * 4
    # CIFAR-100 at 300 epochs in bf16: the 3 GB per teacher and seed
    cifar = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset="cifar100", train_subset=0),
                                train=dataclasses.replace(cfg.train, epochs=300, precision="bf16"))
    assert abs(estimated_bytes([cifar], torch.device("cpu")) - 3.0e9) < 0.01e9


@pytest.mark.slow
def test_the_cli_dry_run_prints_the_size_and_writes_nothing(tmp_path):
    args = [sys.executable, "-m", "hkdbench.benchmark.cli.main", "teacher-outputs", "--teacher", "resnet_mini",
            "--student", "vit_mini", "--method", "kd,crd", "--recipe", "demo", "--runs-dir", str(tmp_path),
            "train.epochs=2", "data.train_subset=192", "data.batch_size=64", "data.img_size=16",
            *[f"teacher.{item}" for item in TINY_TEACHER]]
    dry = subprocess.run(args + ["--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    # 192 images x (10 logits + 128 pre-logits) x 2 epochs x 4 bytes
    assert "teacher outputs of resnet_mini logits + pre_logits: about 212 kB for 2 epochs" in dry.stdout
    assert list(tmp_path.iterdir()) == []
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "(2 epochs stored)" in done.stdout
    dry = subprocess.run(args + ["--dry-run"], capture_output=True, text=True)
    assert "2 of 2 epochs stored" in dry.stdout
    refused = subprocess.run([*args[:9], "fitnet", *args[10:]], capture_output=True, text=True)
    assert refused.returncode == 2 and "none of these runs reads stored teacher outputs" in refused.stderr
    assert json.loads(next((tmp_path / "_teacher_outputs").glob("*/manifest.json")).read_text())["shards"]
    with pytest.raises(ConfigError, match="none of these runs reads stored teacher outputs"):
        compute_teacher_outputs([cfg_of("kd")], str(tmp_path), echo=False)


@pytest.mark.slow
def test_a_sweep_computes_each_teachers_outputs_once_and_a_method_added_later_runs_no_teacher(tmp_path,
                                                                                               monkeypatch):
    from test_sweep import TINY as TINY_DATA, hkdbench, tiny_preset

    grid = {"students": ["vit_mini", "mixer_mini"], "methods": ["kd", "crd"]}
    stored_train = {"epochs": 2, "teacher_outputs": "stored"}
    live = tiny_preset(tmp_path, "live", **grid)
    stored = tiny_preset(tmp_path, "stored", **grid, overrides={"data": TINY_DATA, "train": stored_train})
    assert hkdbench("sweep", live, "--runs-dir", tmp_path / "live")[0] == 0
    code, out, _ = hkdbench("sweep", stored, "--runs-dir", tmp_path / "stored", "--dry-run")
    assert code == 0 and "also compute the stored teacher outputs that 4 student run(s) read" in out
    builds = count_teacher_builds(monkeypatch)
    code, out, _ = hkdbench("sweep", stored, "--runs-dir", tmp_path / "stored")
    assert code == 0 and "5 runs; 5 to run" in out
    live_runs, stored_runs = RunStore(tmp_path / "live").runs(), RunStore(tmp_path / "stored").runs()
    assert [r.path.name for r in live_runs] == [r.path.name for r in stored_runs]  # the same hashes
    for a, b in zip(live_runs, stored_runs):
        if not a.path.name.startswith("teacher_"):
            assert_same_run(a, b)
    # the teacher run's job computed the outputs once for both students (the same crop): one teacher pass per step
    # for the sweep's four runs, the students' jobs built no teacher
    (folder,) = outputs_folders(tmp_path / "stored")
    assert builds == [1] and "teacher outputs resnet_mini_" in out
    code, out, _ = hkdbench("status", stored, "--runs-dir", tmp_path / "stored")
    assert code == 0 and f"teacher outputs {folder.path.name}: resnet_mini (teacher_resnet_mini_" in out
    assert "logits + pre_logits, seed 0, 2 epoch(s) stored, idle" in out
    # a method added to the finished cells: its runs train, no teacher is built
    no_teacher_built(monkeypatch)
    more = tiny_preset(tmp_path, "stored", students=grid["students"], methods=["kd", "crd", "dkd"],
                       overrides={"data": TINY_DATA, "train": stored_train})
    code, out, _ = hkdbench("sweep", more, "--runs-dir", tmp_path / "stored")
    assert code == 0 and "2 to run, 5 skipped (5 done)" in out
    assert len(RunStore(tmp_path / "stored").runs()) == 7
    assert [o.path for o in outputs_folders(tmp_path / "stored")] == [folder.path]


KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_teacher_outputs import stored_cfg
from hkdbench.benchmark.core.store import open_temp
from hkdbench.benchmark.engine import teacher_outputs
from hkdbench.benchmark.engine.trainer import compute_teacher_outputs

write_epoch = teacher_outputs.StoredOutputs.write_epoch

def write_then_hang(self, epoch, tensors, extra):
    if epoch == 0:
        return write_epoch(self, epoch, tensors, extra)
    fd, _ = open_temp(self.folder.shard_file(epoch))  # half a shard in its temp file, then the kill
    os.write(fd, b"half a shard")
    print("WRITING", flush=True)
    time.sleep(600)

teacher_outputs.StoredOutputs.write_epoch = write_then_hang
compute_teacher_outputs([stored_cfg("kd")], {runs!r}, echo=False)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_way_leaves_nothing_a_reader_takes(tmp_path):
    import os
    import signal
    from pathlib import Path

    store = tmp_path / "stored"
    script = KILLED_WRITER.format(tests=str(Path(__file__).parent), runs=str(store))
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "WRITING"
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    (folder,) = outputs_folders(store)
    assert sorted(folder.manifest()["shards"]) == ["0"] and list(folder.path.glob(".epoch_1.pt.*"))
    assert not folder.is_locked()  # the kill let go of the lock
    (live,) = train_all([cfg_of("kd")], tmp_path / "live").values()
    (stored,) = train_all([stored_cfg("kd")], store).values()
    assert_same_run(live.run_dir, stored.run_dir)
    assert "for epoch(s) 2 into" in stored.run_dir.log_file.read_text()
    assert not list(folder.path.glob(".epoch_*")) and sorted(folder.manifest()["shards"]) == ["0", "1"]


def test_the_speed_tools_floor_is_the_cohorts_less_each_students_teacher_cost():
    from hkdbench.benchmark.tools.teacher_outputs_speed import summary, teacher_cost_s

    run_s = {"r18/none": 10.0, "r18/kd": 13.0, "r18/fitnet": 15.0, "deit/none": 20.0, "deit/kd": 21.0,
             "deit/fitnet": 24.0}
    assert teacher_cost_s(run_s) == pytest.approx(3.0 + 1.0)  # kd less none, per student
    # a kd run that happened to be faster than none costs nothing (clipped at 0, not negative)
    assert teacher_cost_s({"r18/none": 10.0, "r18/kd": 9.0, "deit/none": 20.0, "deit/kd": 22.0}) == pytest.approx(2.0)
    assert teacher_cost_s({"r18/kd": 13.0, "r18/fitnet": 15.0}) is None  # no none run: no floor
    times = {"separate": [103.0, 200.0], "cohorts": [50.0, 100.0], "stored": [40.0, 100.0], "outputs_s": [1.0, 1.0],
             "run_s": [run_s, {k: 2 * v for k, v in run_s.items()}]}
    out = summary(times)
    assert out["no_teacher_floor_s"] == pytest.approx([50.0 - 4.0, 100.0 - 8.0])
    assert out["floor_over_separate"] == pytest.approx((46 / 103 + 92 / 200) / 2)
    assert "floor_over_separate" not in summary({**times, "run_s": []})  # no separate run timed alone


def test_the_speed_tool_counts_the_teacher_passes_of_each_way(tmp_path):
    from hkdbench.benchmark.tools.teacher_outputs_speed import STORED as TOOL_STORED, plan_configs, teacher_passes

    def plans(methods):
        args = ("resnet_mini", ["vit_mini", "mixer_mini"], methods, 1, tmp_path, None)
        return {"live": plan_configs(*args), "stored": plan_configs(*args, TOOL_STORED)}
    # FitNet keeps each cohort live: stored outputs save no pass over cohorts
    assert teacher_passes(plans(["none", "kd", "dkd", "fitnet", "ofa"])) == {"separate": 8, "cohorts": 2, "stored": 2}
    # logit readers only: one pass for both students (the same crop), whatever the methods
    assert teacher_passes(plans(["kd", "dkd", "crd"])) == {"separate": 6, "cohorts": 2, "stored": 1}
