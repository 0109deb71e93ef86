"""Shared helpers of the tests: the mini-model matrix."""
import functools
import itertools

import torch

from hkdbench.benchmark.models.zoo import create_model

# One small model per family: the teacher x student matrix of the contract tests.
FAMILY_MODELS = {"cnn": "resnet_mini", "vit": "vit_mini", "swin": "swin_mini", "convnext": "convnext_mini",
                 "mlp": "mixer_mini"}
PAIRS = list(itertools.product(FAMILY_MODELS.values(), FAMILY_MODELS.values()))
TEST_IMG = 16
TEST_CLASSES = 10


@functools.lru_cache(maxsize=None)
def _cached_model_state(name: str):
    torch.manual_seed(0)
    model = create_model(name, TEST_CLASSES, in_chans=1, img_size=TEST_IMG)
    return {k: v.clone() for k, v in model.state_dict().items()}


def small_model(name: str):
    """A fresh mini model with fixed weights (the same on every call)."""
    model = create_model(name, TEST_CLASSES, in_chans=1, img_size=TEST_IMG)
    model.load_state_dict(_cached_model_state(name))
    return model


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical distribution functions."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, grid, right=True).double() / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def ks_critical(n: int, m: int) -> float:
    """The KS statistic that two samples of one distribution exceed with probability about 1e-4."""
    return 2.15 * ((n + m) / (n * m)) ** 0.5
