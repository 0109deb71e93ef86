import pytest
import torch

from hkdbench.benchmark.models.zoo import create_model

MINI = ("resnet_mini", "vit_mini", "swin_mini", "convnext_mini", "mixer_mini")


@pytest.fixture(scope="module")
def zoo():
    """One mini model per family (10 classes, 16 px, 1 channel), shared by a test module."""
    torch.manual_seed(0)
    return {n: create_model(n, 10, in_chans=1, img_size=16) for n in MINI}


@pytest.fixture
def minis(zoo):
    """The shared mini models, all trainable again (a method freezes its teacher, which may be another test's
    student)."""
    for model in zoo.values():
        model.requires_grad_(True).zero_grad(set_to_none=True)
    return zoo
