"""Issue 20: the exported student's pretrained config is the run's own evaluation transform. Plain timm
(``resolve_data_config`` + ``create_transform`` on the dataset's PIL images) must give the inputs the run was
scored on, and so its accuracy. The export's other checks (logits, safetensors, ONNX) are in test_tools.py."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError, DataConfig
from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def hkdbench(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "hkdbench.benchmark.cli.main", *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=900)
    return run.returncode, run.stdout, run.stderr


@pytest.fixture(scope="module")
def fmnist_test(tmp_path_factory):
    """Fashion-MNIST's test split as a user reads it: torchvision's FashionMNIST (PIL images in mode L) over the
    IDX files, decompressed where torchvision looks for them."""
    from torchvision.datasets import FashionMNIST

    root = tmp_path_factory.mktemp("torchvision")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(gzip.decompress((FASHION_MNIST_DEBIAN_DIR / f"{stem}.gz").read_bytes()))
    return FashionMNIST(str(root), train=False)


def timm_inputs(transform, dataset, n: int) -> torch.Tensor:
    return torch.stack([transform(dataset[i][0]) for i in range(n)])


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def run_eval_inputs(data: DataConfig, crop_pct: float) -> torch.Tensor:
    """The images the run's evaluation feeds the model (its eval loader, on the CPU)."""
    from hkdbench.benchmark.data.loaders import build_loaders

    _, test, _ = build_loaders(data, torch.device("cpu"), crop_pct)
    return torch.cat([images for images, _ in test.batches()])


def plain_timm_transform(data: DataConfig, crop_pct: float):
    """timm's eval transform for the pretrained-config fields the export writes for this evaluation."""
    from timm.data import create_transform, resolve_data_config

    from hkdbench.benchmark.engine.export import eval_preprocessing

    return create_transform(**resolve_data_config({}, pretrained_cfg=eval_preprocessing(data, crop_pct)))


# -- the transform, for many settings (no training) ---------------------------------------------------------------

@pytest.mark.parametrize("img_size", [28, 32, 33, 36, 48])
def test_small_pipeline_padding_is_what_timm_computes(fmnist_test, img_size):
    """28 px images zero-padded to img_size (33: one more row below than above; 36: 36 / (36 / 28) rounds to
    27.999..., so the obvious crop_pct would resize to 27 px)."""
    data = DataConfig(pipeline="small", img_size=img_size, eval_subset=6)
    transform = plain_timm_transform(data, 0.875)
    got, expected = timm_inputs(transform, fmnist_test, 6), run_eval_inputs(data, 0.875)
    assert got.shape == (6, 1, img_size, img_size)
    difference = max_difference(got, expected)
    assert difference <= 1e-5


@pytest.mark.parametrize("img_size,crop_pct,interpolation", [(64, 0.875, "bilinear"), (224, 0.9, "bicubic"),
                                                               (57, 0.95, "bicubic"), (40, 1.0, "bilinear")])
def test_paper224_resize_and_crop_is_what_timm_computes(fmnist_test, img_size, crop_pct, interpolation):
    data = DataConfig(pipeline="paper224", img_size=img_size, eval_subset=6, crop_pct=crop_pct,
                      eval_interpolation=interpolation)
    transform = plain_timm_transform(data, crop_pct)
    got, expected = timm_inputs(transform, fmnist_test, 6), run_eval_inputs(data, crop_pct)
    assert got.shape == (6, 1, img_size, img_size)
    difference = max_difference(got, expected)
    assert difference <= 1e-5


def test_an_evaluation_timm_cannot_express_is_refused():
    from hkdbench.benchmark.engine.export import eval_preprocessing

    with pytest.raises(ConfigError, match=r"data.img_size=24 is below fashion-mnist's native 28 px.*exportable"):
        eval_preprocessing(DataConfig(pipeline="small", img_size=24), crop_pct=1.0)
    with pytest.raises(ConfigError, match=r"'small' pipeline on imagenet pads or squashes each image"):
        eval_preprocessing(DataConfig(dataset="imagenet", pipeline="small", img_size=224), crop_pct=0.875)
    with pytest.raises(ConfigError, match=r"crop_pct 1.2 resizes below data.img_size=64.*with crop_pct <= 1, or"):
        eval_preprocessing(DataConfig(pipeline="paper224", img_size=64), crop_pct=1.2)
    # the per-image path runs timm's own transform, which pads: that one is expressible
    per_image = eval_preprocessing(DataConfig(pipeline="paper224", img_size=64, in_memory="no"), crop_pct=1.2)
    assert per_image["crop_pct"] == 1.2 and per_image["crop_mode"] == "center"


# -- a trained run, exported, scored by plain timm ----------------------------------------------------------------

def _train(runs: Path, *args) -> Path:
    code, _, err = hkdbench("teacher", "--runs-dir", runs, *args)
    assert code == 0, err
    (run,) = [p for p in runs.iterdir() if not p.name.startswith("_")]
    return run


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe (28 px Fashion-MNIST padded to 32) on deit_tiny, a timm architecture whose LayerNorms
    (unlike a few steps' BatchNorm statistics) tell the test images apart after one short epoch."""
    return _train(tmp_path_factory.mktemp("demo"), "--model", "deit_tiny", "--recipe", "demo", "train.epochs=1",
                  "data.train_subset=256", "data.eval_subset=200", "data.batch_size=32")


@pytest.fixture(scope="module")
def paper224_run(tmp_path_factory):
    """A papers' CIFAR-at-224 recipe (cifar-cnn: resize to 224 / 0.9 = 248 and center crop) on Fashion-MNIST:
    deit_tiny, two steps at the full lr (no warm-up), evaluated bicubic (its timm 0.6.5 default)."""
    return _train(tmp_path_factory.mktemp("paper224"), "--model", "deit_tiny", "--recipe", "cifar-cnn",
                  "train.epochs=1", "data.train_subset=32", "data.eval_subset=64", "data.batch_size=16",
                  "data.eval_interpolation=model", "optim.warmup_epochs=0")


@pytest.mark.slow
@pytest.mark.parametrize("run_fixture", ["demo_run", "paper224_run"])
def test_plain_timm_on_the_export_scores_the_runs_own_accuracy(run_fixture, request, fmnist_test, tmp_path):
    import timm
    from timm.data import create_transform, resolve_data_config

    from hkdbench.benchmark.engine.export import export_run
    from hkdbench.benchmark.models.zoo import zoo_entry
    from hkdbench.benchmark.core.store import RunDir

    run = request.getfixturevalue(run_fixture)
    export_run(run, "timm", out=tmp_path, weights="last")  # the last epoch's weights: summary's last_top1
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    cfg = RunDir(run).config()
    n = cfg.data.eval_subset
    images = timm_inputs(transform, fmnist_test, n)
    labels = torch.tensor([fmnist_test[i][1] for i in range(n)])
    crop_pct = cfg.data.crop_pct or zoo_entry(cfg.student.name).crop_pct  # as the trainer gave its loaders
    difference = max_difference(images, run_eval_inputs(cfg.data, crop_pct))
    assert difference <= 1e-5
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(1) for batch in images.split(32)])
    assert len(predictions.unique()) > 1  # a model that answers one class whatever it sees would prove nothing
    recorded = json.loads((run / "summary.json").read_text())["last_top1"]
    assert 100.0 * (predictions == labels).sum().item() / n == pytest.approx(recorded, rel=0, abs=1e-9)
