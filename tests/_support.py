"""Shared helpers of the tests: the mini-model matrix, a user's method plugin."""
import functools
import itertools
import textwrap
from pathlib import Path

import torch

from hkdbench.benchmark.models.zoo import create_model

# One small model per family: the teacher x student matrix of the contract tests.
FAMILY_MODELS = {"cnn": "resnet_mini", "vit": "vit_mini", "swin": "swin_mini", "convnext": "convnext_mini",
                 "mlp": "mixer_mini"}
PAIRS = list(itertools.product(FAMILY_MODELS.values(), FAMILY_MODELS.values()))
TEST_IMG = 16
TEST_CLASSES = 10

# A user's own method in its own file (docs/how-to/add-a-method.md), for the plugin tests.
LOGIT_MSE_PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    import torch.nn.functional as F
    from hkdbench.methods import Distiller, register_method

    @register_method
    class LogitMSE(Distiller):
        """Matches the student's logits to the teacher's with MSE."""
        name = "logit_mse"
        paper = "a test method"

        @dataclass(frozen=True)
        class Config:
            weight: float = 0.5

        def losses(self, student, teacher, targets, epoch=0):
            return {"ce": self.task_loss(student.logits, targets),
                    "mse": self.cfg.weight * F.mse_loss(student.logits, teacher.logits)}
''')


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


def hub_cache(root: Path, repo: str, state: dict, revision: str = "0" * 40) -> Path:
    """A Hugging Face hub cache with one weights file, laid out by hand as the hub client lays it out."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def imagenet_preset_weights(root, monkeypatch) -> None:
    """Files for the imagenet-ofa preset's timm teachers in a temporary hub cache, offline (expansion only
    hashes them; nothing loads them)."""
    import torch
    from huggingface_hub import constants

    for repo in ("timm/swin_tiny_patch4_window7_224.ms_in1k", "timm/convnext_tiny.fb_in1k"):
        hub_cache(root, repo, {"w": torch.zeros(1)})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
