import pytest


@pytest.fixture
def fmnist_available():
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def runs_dir(tmp_path):
    return str(tmp_path / "runs")


TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=1"]


@pytest.fixture(scope="session")
def _trained_teacher_store(tmp_path_factory):
    from hkdbench.benchmark.cli.main import main
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    runs = tmp_path_factory.mktemp("teacher_store") / "runs"
    assert main(["teacher", "--model", "resnet_mini", "--recipe", "demo", *TINY, "--runs-dir", str(runs)]) == 0
    return runs


@pytest.fixture
def done_teacher_store(_trained_teacher_store):
    """``copy(folder)`` -> (a run store in ``folder`` holding one finished tiny resnet_mini teacher run, that run's
    RunDir, the ``train`` arguments of a kd student of it). The teacher run is trained once per session."""
    import shutil

    from hkdbench.benchmark.core.store import RunStore

    def copy(folder):
        runs = folder / "runs"
        shutil.copytree(_trained_teacher_store, runs)
        (t_dir,) = RunStore(runs).runs()
        student = ["train", "--teacher", "resnet_mini", "--student", "vit_mini", "--method", "kd", "--recipe", "demo",
                   *TINY, *[f"teacher.{item}" for item in TINY]]
        return str(runs), t_dir, student

    return copy


def pytest_configure(config):
    # Tiny models on a 2-core machine: one intra-op thread avoids OpenMP spin contention between processes.
    import torch

    torch.set_num_threads(1)
