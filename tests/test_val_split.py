"""data.val_split: a fixed, stratified part of the training set held out, evaluated every evaluated epoch and used to
pick the kept best weights; 0 changes nothing."""
import json

import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.data import datasets, loaders
from hkdbench.benchmark.data.datasets import (Dataset, DatasetInfo, held_out_mask, register_dataset,
                                             train_val_indices, unregister_dataset)
from hkdbench.benchmark.engine.eval_run import evaluate_run
from hkdbench.benchmark.engine.trainer import train, train_cohort
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config

TINY = ["data.train_subset=320", "data.eval_subset=64", "data.batch_size=64", "data.img_size=16", "train.epochs=3",
        "optim.lr=0.2"]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s", "finished", "cohort_size"}


def cfg_of(method="none", extra=(), teacher=None):
    return resolve_run_config(kind="student", student="vit_mini", teacher=teacher, method=method, recipe="demo",
                              overrides=TINY + list(extra), teacher_overrides=TINY)


def test_the_held_out_images_are_stratified_fixed_and_nested():
    labels = torch.arange(1000) % 7  # classes of 143 or 142 images
    mask = held_out_mask(labels, 0.1)
    counts = torch.bincount(labels[mask], minlength=7)
    assert counts.tolist() == [14] * 7  # round(0.1 x 143) = round(0.1 x 142) = 14 per class
    assert torch.equal(mask, held_out_mask(labels, 0.1))  # a fixed seed: the same for every run
    assert (held_out_mask(labels, 0.05) <= mask).all()  # a smaller fraction holds out a part of a larger one's
    tiny = torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.bincount(tiny[held_out_mask(tiny, 0.9)], minlength=3).tolist() == [1, 0, 2]  # never a whole class


def test_a_subset_validates_on_its_share_of_the_whole_splits_held_out_images(fmnist_available):
    cfg = cfg_of(extra=["data.val_split=0.1"]).data
    train_idx, val_idx = train_val_indices(cfg)
    whole = held_out_mask(datasets.training_labels(cfg), 0.1)
    assert len(train_idx) + len(val_idx) == 320 and 15 <= len(val_idx) <= 50
    assert whole[val_idx].all() and not whole[train_idx].any()
    assert datasets.training_images(cfg) == len(train_idx)
    assert loaders.train_steps_per_epoch(cfg) == len(train_idx) // 64
    plain = cfg_of().data
    assert torch.equal(train_val_indices(plain)[0], datasets.train_subset_indices(60000, 320))


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan"])
def test_bad_fractions_are_refused(value):
    with pytest.raises(ConfigError, match="data.val_split"):
        cfg_of(extra=[f"data.val_split={value}"])


def test_zero_keeps_the_run_and_its_teacher_run_a_fraction_names_new_ones():
    plain, zero, split = cfg_of(teacher="resnet_mini", method="kd"), cfg_of(
        teacher="resnet_mini", method="kd", extra=["data.val_split=0"]), cfg_of(
        teacher="resnet_mini", method="kd", extra=["data.val_split=0.1"])
    assert plain.run_name() == zero.run_name() and plain.teacher_run == zero.teacher_run
    assert split.run_name() != plain.run_name() and split.teacher_run != plain.teacher_run
    assert teacher_run_config(split).data.val_split == 0.1  # the teacher holds out the students' images
    own = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method="kd", recipe="demo",
                             overrides=TINY + ["data.val_split=0.1"], teacher_overrides=TINY + ["data.val_split=0"])
    assert teacher_run_config(own).data.val_split == 0.0 and own.teacher_run == plain.teacher_run


@pytest.fixture
def toy_dataset():
    """40 images of 4 classes (labels 0-3, 10 each) under the name 'toy-val'."""
    labels = torch.arange(40) % 4
    images = (torch.arange(40 * 16) % 251).to(torch.uint8).view(40, 1, 4, 4)
    entry = register_dataset(Dataset(DatasetInfo("toy-val", 4, 1, 4, (0.5,), (0.25,), in_memory=True),
                                     check=lambda cfg: None, read_tensors=lambda cfg, train: (images, labels)))
    yield entry
    unregister_dataset("toy-val")


def toy_data(**fields):
    from hkdbench.benchmark.core.config import DataConfig

    return DataConfig(dataset="toy-val", img_size=4, crop_padding=0, batch_size=1, **fields)


def test_a_split_that_empties_a_class_or_holds_out_nothing_is_refused(toy_dataset):
    datasets.check_data_available(toy_data(val_split=0.5))  # 5 of 10 per class: fine
    with pytest.raises(ConfigError, match="holds out none of the 40 training images"):
        datasets.check_data_available(toy_data(val_split=0.01))
    emptying = []
    for subset in range(2, 40):  # a subset whose only images of some class are all held out
        train_idx, val_idx = train_val_indices(toy_data(val_split=0.5, train_subset=subset))
        labels = toy_dataset.read_tensors(None, True)[1]
        if set(labels[val_idx].tolist()) - set(labels[train_idx].tolist()):
            emptying.append(subset)
    assert emptying, "the toy set should have such a subset"
    with pytest.raises(ConfigError, match="holds out every training image of class"):
        datasets.check_data_available(toy_data(val_split=0.5, train_subset=emptying[0]))


def test_the_in_memory_and_per_image_paths_validate_on_the_same_images(fmnist_available):
    memory = loaders.build_val_loader(cfg_of(extra=["data.val_split=0.1"]).data, torch.device("cpu"), 1.0)
    per_image = loaders.build_val_loader(cfg_of(extra=["data.val_split=0.1", "data.in_memory=no", "data.workers=0"]
                                                ).data, torch.device("cpu"), 1.0)
    assert isinstance(memory, loaders.TensorLoader) and isinstance(per_image, loaders.ImageLoader)
    assert torch.equal(memory.all_labels(), per_image.all_labels())
    (a, _), (b, _) = next(iter(memory.batches())), next(iter(per_image.batches()))
    assert torch.allclose(a, b, atol=1e-5)  # the evaluation transform on the held-out training images
    assert loaders.build_val_loader(cfg_of().data, torch.device("cpu"), 1.0) is None


def test_the_kept_best_weights_are_the_validation_selected_epochs(fmnist_available, tmp_path):
    result = train(cfg_of(extra=["data.val_split=0.1", "train.ema_decay=0.5"]), runs_dir=str(tmp_path),
                   progress=False, echo=False)
    rd = result.run_dir
    history, summary = rd.metrics(), rd.summary()
    assert all({"val_top1", "val_loss", "top1"} <= set(r) for r in history)
    chosen = max(history, key=lambda r: (r["val_top1"], -r["epoch"]))  # the first epoch of highest val top-1
    best = max(history, key=lambda r: (r["top1"], -r["epoch"]))
    assert summary["selected_epoch"] != summary["best_epoch"]  # this tiny run's validation and test disagree
    assert (summary["selected_epoch"], summary["selected_top1"]) == (chosen["epoch"], chosen["top1"])
    assert summary["selected_val_top1"] == chosen["val_top1"] and summary["selected_weights"] == "best.pt"
    assert (summary["best_epoch"], summary["best_top1"]) == (best["epoch"], best["top1"])
    assert "best_weights" not in summary and summary["last_top1"] == history[-1]["top1"]
    ema_chosen = max(history, key=lambda r: (r["ema_val_top1"], -r["epoch"]))
    assert summary["ema_selected_epoch"] == ema_chosen["epoch"]
    assert summary["ema_selected_top1"] == ema_chosen["ema_top1"]
    assert summary["ema_selected_weights"] == "best_ema.pt" and "ema_best_weights" not in summary
    assert evaluate_run(rd.path, weights="best")["student"]["top1"] == pytest.approx(summary["selected_top1"])
    assert evaluate_run(rd.path, weights="best", ema=True)["student"]["top1"] == pytest.approx(
        summary["ema_selected_top1"])
    assert evaluate_run(rd.path, weights="last")["student"]["top1"] == pytest.approx(summary["last_top1"])


def test_emulated_ranks_cohorts_and_resume_keep_the_split(fmnist_available, tmp_path):
    """A cohort with the split equals its runs trained alone; one stopped mid-epoch resumes bit for bit; two
    emulated ranks validate on the same held-out images."""
    from test_cohort import assert_same_run

    cfgs = [cfg_of(m, extra=["data.val_split=0.1", "train.world=2", "data.batch_size=32"], teacher="resnet_mini")
            for m in ("none", "kd")]
    whole = train_cohort(cfgs, runs_dir=str(tmp_path / "whole"), progress=False, echo=False)
    assert [r.status for r in whole] == ["done", "done"]
    alone = train(cfgs[0], runs_dir=str(tmp_path / "alone"), progress=False, echo=False)
    assert_same_run(alone.run_dir, whole[0].run_dir)
    calls = []
    runs = str(tmp_path / "cut")
    cut = train_cohort(cfgs, runs_dir=runs, progress=False, echo=False,
                       should_stop=lambda: calls.append(1) or len(calls) >= 12)
    assert [r.status for r in cut] == ["interrupted"] * 2
    resumed = train_cohort(cfgs, runs_dir=runs, resume=True, progress=False, echo=False)
    for a, b in zip(whole, resumed):
        assert_same_run(a.run_dir, b.run_dir)
    teacher_dir = tmp_path / "whole" / cfgs[1].teacher_run
    assert json.loads((teacher_dir / "config.json").read_text())["data"]["val_split"] == 0.1
    teacher_summary = json.loads((teacher_dir / "summary.json").read_text())
    assert whole[1].summary["teacher_top1"] == teacher_summary["selected_top1"]  # the score of the best.pt it loads


def test_the_command_line_refuses_a_bad_split_before_writing(fmnist_available, tmp_path, capsys):
    from hkdbench.benchmark.cli.main import main

    runs = tmp_path / "runs"
    for bad in (["data.train_subset=200", "data.batch_size=16", "data.val_split=0.001"], ["data.val_split=1"]):
        assert main(["train", "--student", "vit_mini", "--method", "none", "--runs-dir", str(runs), *bad]) == 2
        assert "data.val_split" in capsys.readouterr().err and not runs.exists()
