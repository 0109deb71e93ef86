"""Runs keep the weights of the epochs they report (best.pt, final.pt and the EMA's), and students load the teacher
weights whose accuracy they record. Every accuracy is checked by evaluating the kept file again."""
import pytest
import torch

from hkdbench.analysis.collect import collect_runs
from hkdbench.benchmark.core.config import ConfigError, ModelConfig
from hkdbench.benchmark.data.loaders import build_loaders
from hkdbench.benchmark.models.zoo import create_model, zoo_entry
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config
from hkdbench.benchmark.engine.records import MissingWeightsError, best_record, load_weights
from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.engine.trainer import CohortTrainer, train
from hkdbench.benchmark.engine.evaluation import evaluate

TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.img_size=16"]
# A teacher whose best epoch is well above its last, so best.pt and final.pt hold different weights with different
# accuracies: the warm-up raises the lr from 3e-3 to 0.3 over the whole run, which spoils the later epochs
# (best epoch 2 at 33.6 % top-1, last 28.9 % at the time of writing).
TEACHER = ["train.epochs=4", "optim.lr=0.3", "optim.warmup_lr=0.003", "optim.warmup_epochs=4",
           "data.train_subset=256", "data.eval_subset=128", "data.batch_size=64"]


def student_cfg(weights="best", method="kd", epochs=1, extra=()):
    return resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=method,
                              recipe="demo", overrides=TINY + [f"train.epochs={epochs}", *extra],
                              teacher_overrides=TEACHER, teacher_weights=weights)


def evaluate_state(cfg, state):
    """Top-1/top-5 of a state dict of ``cfg``'s model on ``cfg``'s own evaluation set."""
    device = torch.device("cpu")
    crop_pct = cfg.data.crop_pct or zoo_entry(cfg.student.name).crop_pct
    _, test_loader, info = build_loaders(cfg.data, device, crop_pct)
    model = create_model(cfg.student.name, info.num_classes, in_chans=info.in_chans, img_size=cfg.data.img_size)
    model.model.load_state_dict(state)
    return evaluate(model, test_loader, device, None, False)


def spy_on_teachers(monkeypatch):
    """The state dict of every teacher the trainer hands to a student run, in order."""
    used, prepare = [], CohortTrainer.prepare_teacher

    def recording(self, *args):
        teacher, top1 = prepare(self, *args)
        if teacher is not None:  # None in the teacher's own run
            used.append({k: v.clone() for k, v in teacher.model.state_dict().items()})
        return teacher, top1

    monkeypatch.setattr(CohortTrainer, "prepare_teacher", recording)
    return used


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_kept_weights_reproduce_the_summary(rd):
    summary, cfg = rd.summary(), rd.config()
    assert (summary["best_weights"], summary["last_weights"]) == ("best.pt", "final.pt")
    best, last = evaluate_state(cfg, load_weights(rd, "best")), evaluate_state(cfg, load_weights(rd, "last"))
    assert (best["top1"], best["top5"]) == (summary["best_top1"], summary["best_top5"])
    assert (last["top1"], last["top5"]) == (summary["last_top1"], summary["last_top5"])
    record = {m["epoch"]: m for m in rd.metrics()}
    assert record[summary["best_epoch"]]["top1"] == summary["best_top1"]
    assert summary["last_epoch"] == cfg.train.epochs


def test_best_record_keeps_the_first_of_equal_epochs_and_skips_unevaluated_ones():
    history = [{"epoch": 1, "top1": 5.0}, {"epoch": 2}, {"epoch": 3, "top1": 7.0}, {"epoch": 4, "top1": 7.0}]
    assert best_record(history)["epoch"] == 3  # timm's CheckpointSaver: model_best only on a strictly greater metric
    assert best_record(history, "ema_top1") is None and best_record([]) is None


def test_teacher_weights_field_is_validated():
    with pytest.raises(ValueError, match="weights must be one of best, last.*'worst'"):
        ModelConfig("resnet_mini", weights="worst")
    with pytest.raises(ConfigError, match="teacher: weights='last' .*checkpoint is loaded as it is"):
        resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd", recipe="demo",
                           teacher_checkpoint="/some/teacher.pth", teacher_weights="last")
    best, last = student_cfg("best"), student_cfg("last")
    assert best.teacher.weights == "best" and last.teacher.weights == "last"
    assert best.run_hash() != last.run_hash()  # two students, one teacher run
    assert teacher_run_config(best) == teacher_run_config(last)


@pytest.mark.slow
def test_students_load_the_teacher_weights_whose_accuracy_they_record(fmnist_available, runs_dir, monkeypatch):
    store = RunStore(runs_dir)
    used = spy_on_teachers(monkeypatch)
    with_best = train(student_cfg("best", epochs=2), runs_dir=runs_dir, progress=False, echo=False).run_dir
    t_dir = store.run_dir(teacher_run_config(student_cfg()))
    teacher = t_dir.summary()
    assert teacher["best_epoch"] < teacher["last_epoch"] and teacher["best_top1"] != teacher["last_top1"], (
        "the tiny teacher must peak before its last epoch for this test to tell best from last; adjust TEACHER")
    assert not torch.equal(load_weights(t_dir, "best")["fc.weight"], load_weights(t_dir, "last")["fc.weight"])
    assert_kept_weights_reproduce_the_summary(t_dir)
    assert_kept_weights_reproduce_the_summary(with_best)

    summary = with_best.summary()
    assert (summary["teacher_weights"], summary["teacher_run"]) == ("best", t_dir.path.name)
    assert summary["teacher_top1"] == teacher["best_top1"]
    assert same_weights(used[-1], load_weights(t_dir, "best"))
    assert summary["teacher_top1"] == evaluate_state(t_dir.config(), used[-1])["top1"]
    assert f"the best weights of {t_dir.path.name} (epoch {teacher['best_epoch']}" in with_best.log_file.read_text()

    with_last = train(student_cfg("last"), runs_dir=runs_dir, progress=False, echo=False).run_dir
    summary = with_last.summary()
    assert (summary["teacher_weights"], summary["teacher_run"]) == ("last", t_dir.path.name)
    assert summary["teacher_top1"] == teacher["last_top1"]
    assert same_weights(used[-1], load_weights(t_dir, "last"))
    assert summary["teacher_top1"] == evaluate_state(t_dir.config(), used[-1])["top1"]
    assert len([r for r in store.runs() if r.config().kind == "teacher"]) == 1

    rows = collect_runs(runs_dir).set_index("run")
    assert rows.loc[with_last.path.name, "teacher_weights"] == "last"
    assert rows.loc[t_dir.path.name, "best_weights"] == "best.pt"
    assert rows.loc[t_dir.path.name, "last_epoch"] == 4

    # a teacher run from before best.pt was kept: a clear error for 'best', never its final.pt in its place
    t_dir.weights_file("best").unlink()
    with pytest.raises(MissingWeightsError, match=r"has no best.pt .*--restart.*--teacher-weights last"):
        train(student_cfg("best", extra=["train.seed=1"]), runs_dir=runs_dir, progress=False, echo=False)
    assert train(student_cfg("last", extra=["train.seed=1"]), runs_dir=runs_dir, progress=False,
                 echo=False).status == "done"


@pytest.mark.slow
def test_ema_best_and_last_weights_are_kept_and_reproduce_their_accuracy(fmnist_available, runs_dir):
    cfg = resolve_run_config(kind="student", student="resnet_mini", method="none", recipe="demo",
                             overrides=TINY + ["train.epochs=3", "train.ema_decay=0.5"])
    rd = train(cfg, runs_dir=runs_dir, progress=False, echo=False).run_dir
    summary = rd.summary()
    assert (summary["ema_best_weights"], summary["ema_last_weights"]) == ("best_ema.pt", "final_ema.pt")
    assert summary["teacher_weights"] is None and summary["teacher_run"] is None
    best = evaluate_state(cfg, load_weights(rd, "best", ema=True))["top1"]
    last = evaluate_state(cfg, load_weights(rd, "last", ema=True))["top1"]
    assert (best, last) == (summary["ema_best_top1"], summary["ema_last_top1"])
    assert summary["ema_best_top1"] == max(m["ema_top1"] for m in rd.metrics())
    assert_kept_weights_reproduce_the_summary(rd)


@pytest.mark.slow
def test_resume_without_the_best_weights_its_checkpoint_records_fails_clearly(fmnist_available, runs_dir):
    cfg = resolve_run_config(kind="student", student="resnet_mini", method="none", recipe="demo",
                             overrides=TINY + ["train.epochs=2"])
    calls = {"n": 0}

    def stop_in_epoch_two():
        calls["n"] += 1
        return calls["n"] == 5  # 4 steps per epoch

    first = train(cfg, runs_dir=runs_dir, progress=False, echo=False, should_stop=stop_in_epoch_two)
    assert first.status == "interrupted" and first.run_dir.weights_file("best").exists()
    first.run_dir.weights_file("best").unlink()
    with pytest.raises(RuntimeError, match="records a best epoch 1 but best.pt is missing.*--restart"):
        train(cfg, runs_dir=runs_dir, progress=False, echo=False, resume=True)
    restarted = train(cfg, runs_dir=runs_dir, progress=False, echo=False, restart=True)
    assert restarted.status == "done" and restarted.run_dir.weights_file("best").exists()


def test_an_imagenet_teacher_checkpoint_on_fashion_mnist_names_the_file_and_the_keys(fmnist_available, tmp_path,
                                                                                     capsys, monkeypatch):
    """The issue's case: a 3-channel, 1000-class resnet18 state dict given as the teacher of a 1-channel, 10-class
    dataset is refused with the file and the keys that differ, before any run directory is written."""
    import timm

    from hkdbench.benchmark.cli.main import main

    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "in1k.pth")
    code = main(["train", "--teacher", "resnet18", "--student", "vit_mini", "--method", "kd", "--teacher-checkpoint",
                 "in1k.pth", "--runs-dir", str(tmp_path / "runs"), *TINY, "train.epochs=1"])
    err = capsys.readouterr().err
    assert code == 2 and "in1k.pth does not fit ResNet with 10 classes" in err, err
    assert "conv1.weight (64, 3, 7, 7) (the model: (64, 1, 7, 7))" in err and "fc.weight (1000, 512)" in err
    assert "Traceback" not in err and not any((tmp_path / "runs").glob("kd_*"))


def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_an_unreachable_hub_fails_at_once_instead_of_the_clients_retries(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, weights missing from the cache and no hub to reach: one connection attempt, then
    the error (the hub client retried 5 times per file with back-off: about 60 s), never a download call."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    from hkdbench.benchmark.models.pretrained import PretrainedUnavailableError, resolve_pretrained

    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was tried"))
    with pytest.raises(PretrainedUnavailableError, match=rf"the hub http://127.0.0.1:{port} cannot be reached: "
                                                         r"Connection refused; .*set HF_HUB_OFFLINE=1"):
        resolve_pretrained("resnet18.a1_in1k")


def test_the_hub_probe_says_nothing_of_a_reachable_hub_or_behind_a_proxy(monkeypatch):
    import socket

    from hkdbench.benchmark.models.pretrained import hub_unreachable

    _no_proxy(monkeypatch)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert hub_unreachable(f"http://127.0.0.1:{listening.getsockname()[1]}") is None
        port = listening.getsockname()[1]
    assert "cannot be reached" in hub_unreachable(f"http://127.0.0.1:{port}")
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")  # only the proxy knows: the client decides
    assert hub_unreachable(f"http://127.0.0.1:{port}") is None


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """ImageNet-shaped resnet18 and resnet34 state dicts (3 channels, 1000 classes) as local files; a damaged one."""
    import timm

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18").state_dict(), root / "r18.pth")
    torch.save(timm.create_model("resnet34").state_dict(), root / "r34.pth")
    (root / "broken.pth").write_bytes(b"\x80\x04garbage")
    return root


def test_a_teacher_fine_tuned_from_a_local_weight_file(resnet18_files, tmp_path):
    """--teacher-pretrained FILE: the teacher run starts from the file (its SHA-256 in the hash, as hub weights'),
    the channels and the classifier adapted by timm's loader as for hub weights."""
    import shutil

    from hkdbench.benchmark.models.pretrained import file_sha256

    path = resnet18_files / "r18.pth"
    cfg = resolve_run_config(kind="student", student="vit_mini", teacher="resnet18", method="kd", recipe="demo",
                             overrides=TINY, teacher_pretrained=str(path))
    assert (cfg.teacher.pretrained, cfg.teacher.pretrained_sha256) == (str(path), file_sha256(path))
    t_cfg = teacher_run_config(cfg)
    assert t_cfg.student.pretrained == str(path) and cfg.teacher_run == t_cfg.run_name()
    # other bytes in the same file: another teacher run, hence another student run
    changed = tmp_path / "r18.pth"
    shutil.copy(path, changed)
    state = torch.load(path)
    state["layer1.0.conv1.weight"] += 1
    torch.save(state, changed)
    other = resolve_run_config(kind="student", student="vit_mini", teacher="resnet18", method="kd", recipe="demo",
                               overrides=TINY, teacher_pretrained=str(changed))
    assert other.teacher_run != cfg.teacher_run and other.run_hash() != cfg.run_hash()
    # the same bytes elsewhere: the same runs (a file stands in the identity by its SHA-256, not where it lies)
    moved = tmp_path / "copy" / "weights.pth"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    same = resolve_run_config(kind="student", student="vit_mini", teacher="resnet18", method="kd", recipe="demo",
                              overrides=TINY, teacher_pretrained=str(moved))
    assert same.teacher.pretrained == str(moved)
    assert (same.teacher_run, same.run_hash()) == (cfg.teacher_run, cfg.run_hash())
    # loaded into the 1-channel, 10-class teacher: the body is the file's, the head a fresh one
    teacher = create_model("resnet18", 10, in_chans=1, pretrained=str(path), pretrained_sha256=file_sha256(path))
    own, saved = teacher.model.state_dict(), torch.load(path)
    assert torch.equal(own["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    assert torch.allclose(own["conv1.weight"], saved["conv1.weight"].sum(1, keepdim=True))  # timm's 3 -> 1 channel
    assert own["fc.weight"].shape == (10, 512)
    with pytest.raises(ConfigError, match="has SHA-256 .* the run recorded"):
        create_model("resnet18", 10, in_chans=1, pretrained=str(path), pretrained_sha256="0" * 64)


def test_an_inline_grid_starts_its_teacher_from_a_local_weight_file(resnet18_files):
    from hkdbench.benchmark.sweep.plan import expand
    from hkdbench.benchmark.sweep.preset import load_preset

    path = resnet18_files / "r18.pth"
    plan = expand(load_preset(None, [f"teacher_pretrained.resnet18={path}", *TINY],
                              grid={"teachers": ["resnet18"], "students": ["vit_mini"], "methods": ["kd"]}))
    (teacher,) = plan.teachers
    assert teacher.cfg.student.pretrained == str(path) and teacher.cfg.student.pretrained_sha256


@pytest.mark.parametrize("file, message", [
    ("missing.pth", "pretrained weights file {root}/missing.pth: no such file"),
    ("r34.pth", "pretrained weights file {root}/r34.pth does not fit resnet18: unexpected keys layer1.2.conv1.weight"),
    ("broken.pth", "pretrained weights file {root}/broken.pth cannot be read as a state dict"),
])
def test_a_local_weight_file_that_cannot_be_the_teacher_is_named(resnet18_files, file, message):
    with pytest.raises(ConfigError, match="--teacher-pretrained") as err:
        resolve_run_config(kind="student", student="vit_mini", teacher="resnet18", method="kd", recipe="demo",
                           overrides=TINY, teacher_pretrained=str(resnet18_files / file))
    assert message.format(root=resnet18_files) in str(err.value)
