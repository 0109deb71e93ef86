"""The model zoo and the feature taps."""
import pytest
import torch

from hkdbench.benchmark.models.zoo import UnknownModelError, create_model, zoo, zoo_entry
from hkdbench.benchmark.models.families import block_stack_stage_ends, family_groups
from _support import FAMILY_MODELS, small_model


def test_zoo_covers_every_family_at_224_and_small():
    entries = zoo().values()
    assert family_groups() == ("cnn", "vit", "swin", "convnext", "mlp")
    assert {e.family for e in entries if e.paper} == set(family_groups())
    assert {e.family for e in entries if not e.paper} == set(family_groups())
    for name in ("resnet18", "mobilenetv2_100", "deit_tiny", "vit_small", "swin_tiny", "swin_pico", "swin_nano",
                 "convnext_tiny", "mixer_b16", "resmlp_12"):
        assert zoo_entry(name).img_size == 224


def test_unknown_model_names_the_known_ones():
    with pytest.raises(UnknownModelError, match="known models: .*resnet18"):
        create_model("resnet19", 10)


@pytest.mark.parametrize("name", list(FAMILY_MODELS.values()) + ["resmlp_mini"])
def test_taps_match_dry_run_and_plain_forward(name):
    model = small_model(name).eval()
    x = torch.randn(3, 1, 16, 16)
    out = model(x, stages=(1, 2, 3, 4))
    with torch.no_grad():
        plain = model.model(x)
    assert torch.allclose(out.logits, plain, atol=1e-6), "tapped logits equal timm's own forward"
    assert out.pre_logits.shape == (3, model.num_features)
    for s, info in model.stage_info.items():
        feat = out.stages[s]
        assert tuple(feat.shape[1:]) == info.shape
        if info.layout == "tokens":
            assert info.shape[0] == info.grid[0] * info.grid[1]
        else:
            assert info.shape[1:] == info.grid
    if name == "vit_mini":
        assert model.num_prefix == 1 and out.prefix[1].shape == (3, 1, 64)
    else:
        assert out.prefix == {}
    # only the requested stages are returned
    assert set(model(x, stages=(2,)).stages) == {2}


def test_vit_stage_split_follows_the_papers():
    assert block_stack_stage_ends(12) == [1, 3, 9, 11]  # OFA's ViT/Mixer taps
    assert block_stack_stage_ends(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        block_stack_stage_ends(3)


# Stage shapes of the papers' 224 px models (OFA-KD stage_info tables), found by the dry run.
PAPER_SHAPES = {
    "resnet18": [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
    "mobilenetv2_100": [(24, 56, 56), (32, 28, 28), (96, 14, 14), (1280, 7, 7)],
    "deit_tiny": [(196, 192)] * 4,
    "swin_tiny": [(3136, 96), (784, 192), (196, 384), (49, 768)],
    "swin_pico": [(3136, 48), (784, 96), (196, 192), (49, 384)],
    "convnext_tiny": [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)],
    "resmlp_12": [(196, 384)] * 4,
}


@pytest.mark.parametrize("name", list(PAPER_SHAPES))
def test_paper_model_stage_shapes_at_224(name):
    model = create_model(name, 100)
    assert [model.stage_info[s].shape for s in (1, 2, 3, 4)] == PAPER_SHAPES[name]
    assert model.num_prefix == (1 if name == "deit_tiny" else 0)


def test_stage_entry_pre_hook_alters_what_enters_a_stage():
    model = small_model("resnet_mini").eval()
    x = torch.randn(2, 1, 16, 16)
    base = model(x, stages=(2,)).stages[2]
    handle = model.stage_entry_module(2).register_forward_pre_hook(lambda m, args: (args[0] * 0,))
    zeroed = model(x, stages=(2,)).stages[2]
    handle.remove()
    assert not torch.allclose(base, zeroed)
    assert torch.allclose(model(x, stages=(2,)).stages[2], base)
