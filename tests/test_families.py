"""The family registry: a model class outside timm's zoo is tapped, hooked and distilled once its family is
registered, and nothing else."""
import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.models import families, zoo
from hkdbench.benchmark.models.families import StageModules, family_of, register_family
from hkdbench.benchmark.models.taps import TappedModel
from hkdbench.methods import TASK_LOSS, Targets, get_method, method_config
from hkdbench.methods.pat import probe_entry_layouts
from _support import TEST_CLASSES, TEST_IMG, small_model


class ToyTokenNet(nn.Module):
    """A model of no registered family: patch tokens (B, H*W, D) through four linear blocks, timm's head API."""

    def __init__(self, dims=(8, 12, 16, 20), patch=4, in_chans=1, num_classes=TEST_CLASSES):
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dims[0], patch, stride=patch)
        self.blocks = nn.Sequential(*[nn.Linear(d_in, d_out) for d_in, d_out in zip((dims[0],) + dims[:-1], dims)])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward_features(self, x):
        return self.blocks(self.embed(x).flatten(2).transpose(1, 2))

    def forward_head(self, x, pre_logits=False):
        x = x.mean(1)
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(families, "_FAMILIES", dict(families._FAMILIES))
    monkeypatch.setattr(zoo, "_ZOO", dict(zoo._ZOO))


def _register_toy():
    @register_family("toy", "toy", [ToyTokenNet], "tokens", takes_img_size=False)
    def _toy(model):
        names = [f"blocks.{i}" for i in range(4)]
        return StageModules(names, names)


def test_an_unregistered_model_is_refused_with_the_supported_classes(registry):
    with pytest.raises(NotImplementedError, match="no feature taps for ToyTokenNet; supported: ResNet, "):
        TappedModel(ToyTokenNet(), "toy", "toy", TEST_IMG, 1)


def test_a_model_takes_the_family_of_its_nearest_registered_class(registry):
    class ToySub(ToyTokenNet):
        pass

    _register_toy()
    assert family_of(ToySub()).name == "toy"
    toy_stages = families.families()["toy"].stage_modules
    register_family("toy_sub", "toy", [ToySub], "tokens", takes_img_size=False)(toy_stages)
    assert family_of(ToySub()).name == "toy_sub" and family_of(ToyTokenNet()).name == "toy"


def test_a_zoo_entry_names_a_registered_family_and_builds_it(registry):
    with pytest.raises(ValueError, match="unknown family 'toy'; families are .'cnn', 'vit'"):
        zoo._register("toy_mini", "toy", TEST_IMG, 1.0, "a toy")(lambda **kw: ToyTokenNet())
    zoo._register("resnet_labelled_vit", "vit", TEST_IMG, 1.0, "mislabelled")(zoo.zoo_entry("resnet_mini").build)
    with pytest.raises(ValueError, match="registered as family 'vit' but builds a 'cnn' model .ResNet."):
        zoo.create_model("resnet_labelled_vit", TEST_CLASSES, in_chans=1)


def test_registering_a_family_is_all_it_takes(registry):
    _register_toy()
    assert family_of(ToyTokenNet()).name == "toy"
    zoo._register("toy_mini", "toy", TEST_IMG, 1.0, "a toy")(
        lambda num_classes, in_chans, img_size: ToyTokenNet(in_chans=in_chans, num_classes=num_classes))
    torch.manual_seed(0)
    model = zoo.create_model("toy_mini", TEST_CLASSES, in_chans=1).eval()
    assert isinstance(model, TappedModel) and model.family == "toy"
    # 16 px / patch 4 = a 4x4 grid of 16 tokens, the widths of the four blocks
    assert [model.stage_info[s].shape for s in (1, 2, 3, 4)] == [(16, 8), (16, 12), (16, 16), (16, 20)]
    assert all(model.stage_info[s].layout == "tokens" and model.stage_info[s].grid == (4, 4) for s in (1, 2, 3, 4))
    x = torch.randn(2, 1, TEST_IMG, TEST_IMG)
    out = model(x, stages=(1, 3))
    tokens = model.model.embed(x).flatten(2).transpose(1, 2)
    assert torch.allclose(out.stages[1], model.model.blocks[0](tokens))
    assert torch.allclose(out.logits, model.model.head(model.model.forward_features(x).mean(1)))
    assert model.stage_entry_module(3) is model.model.blocks[2]
    # PAT reads what enters each stage from the same entry
    entries = probe_entry_layouts(model, (1, 2, 3, 4), quirks=False)
    assert [(e.kind, e.channels, e.grid) for e in entries.values()] == [("tokens", c, (4, 4)) for c in (8, 8, 12, 16)]


def test_a_registered_family_distils_with_feature_methods(registry):
    _register_toy()
    torch.manual_seed(0)
    toy = TappedModel(ToyTokenNet(), "toy", "toy", TEST_IMG, 1)
    for method, student, teacher in [("fitnet", toy, small_model("resnet_mini")),
                                     ("pat", small_model("resnet_mini"), toy)]:
        distiller = get_method(method).build(method_config(method), student, teacher, TEST_CLASSES)
        distiller.train()
        images, labels = torch.randn(4, 1, TEST_IMG, TEST_IMG), torch.arange(4)
        _, losses = distiller.training_step(images, Targets(labels, index=torch.arange(4)), 0)
        assert set(losses) - {TASK_LOSS}, f"{method}: a distillation term besides the task loss"
        total = sum(losses.values())
        assert torch.isfinite(total), method
        total.backward()
        assert all(p.grad is not None for p in student.model.parameters() if p.requires_grad), method


def test_pat_refuses_a_stage_input_that_is_not_in_the_registered_layout(registry):
    register_family("toy", "toy", [ToyTokenNet], "nchw", takes_img_size=False)(  # tokens registered as maps
        lambda model: StageModules([f"blocks.{i}" for i in range(4)], [f"blocks.{i}" for i in range(4)]))
    model = TappedModel(ToyTokenNet(), "toy", "toy", TEST_IMG, 1)
    with pytest.raises(ValueError, match=r"toy: stage 1 input has shape \(1, 16, 8\), not the 'nchw' layout its "
                                         "family 'toy' registers"):
        probe_entry_layouts(model, (1, 2, 3, 4), quirks=False)


def test_a_family_is_registered_once_with_a_known_raw_layout(registry):
    with pytest.raises(ValueError, match="family 'toy': unknown raw layout 'nlc'; layouts are .'nchw', 'nhwc'"):
        register_family("toy", "toy", [ToyTokenNet], "nlc", takes_img_size=False)
    with pytest.raises(ValueError, match="family 'vit' registered twice"):
        register_family("vit", "vit", [ToyTokenNet], "tokens", takes_img_size=True)(lambda model: None)
