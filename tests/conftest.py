import pytest


@pytest.fixture
def fmnist_available():
    from hkdbench.benchmark.data.datasets import FASHION_MNIST_DEBIAN_DIR

    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def runs_dir(tmp_path):
    return str(tmp_path / "runs")


def pytest_configure(config):
    # Tiny models on a 2-core machine: one intra-op thread avoids OpenMP spin contention between processes.
    import torch

    torch.set_num_threads(1)
