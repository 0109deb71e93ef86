"""Teacher checkpoints from a path, including the timm-0.6.5 layout of the OFA-KD CIFAR-100 teachers."""
import re

import pytest
import torch

from hkdbench.benchmark.engine.records import CheckpointError
from hkdbench.benchmark.engine.state_dicts import load_state_dict_into
from hkdbench.benchmark.models.zoo import create_model


def _to_timm_065_swin_layout(state):
    """Writes a timm>=0.9 Swin state dict the way timm 0.6.5 saved it: the patch merging at the end of stage i
    (not the start of stage i+1), the classifier as head.*, and the persistent relative_position_index."""
    old = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = k.replace("head.fc.", "head.")
        old[k] = v
        if k.endswith("relative_position_bias_table"):
            old[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(1)
    return old


def test_old_timm_swin_checkpoint_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    source = create_model("swin_mini", 10, in_chans=1).eval()
    old = _to_timm_065_swin_layout(source.model.state_dict())
    assert "layers.0.downsample.reduction.weight" in old and "head.weight" in old
    path = tmp_path / "swin_cifar100.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in old.items()}}, path)

    torch.manual_seed(1)
    target = create_model("swin_mini", 10, in_chans=1).eval()
    load_state_dict_into(target.model, str(path))
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(target(x).logits, source(x).logits)


def test_ema_weights_are_taken_when_asked(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet_mini", 10, in_chans=1)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.model.state_dict(), "state_dict_ema": ema}, path)
    target = create_model("resnet_mini", 10, in_chans=1)
    load_state_dict_into(target.model, str(path), use_ema=True)
    assert torch.equal(target.model.fc.weight, ema["fc.weight"])


def test_wrong_checkpoint_fails_clearly(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(create_model("resnet_mini", 10, in_chans=1).model.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit .*missing keys"):
        load_state_dict_into(create_model("vit_mini", 10, in_chans=1).model, str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_into(create_model("vit_mini", 10, in_chans=1).model, str(tmp_path / "nope.pth"))


def test_a_checkpoints_rng_state_holds_the_runs_device_only_and_restores_on_fewer_gpus(monkeypatch):
    """The RNG state a checkpoint keeps: the run's CUDA device's generator only (not every visible GPU's), put back
    on the resuming run's device whatever GPUs the saving process saw; on a CPU the CUDA part is left unused. The
    CUDA generator calls are recorded here (no GPU on this machine)."""
    import torch.cuda

    from hkdbench.benchmark.engine.seeding import rng_state, set_rng_state

    cpu = torch.device("cpu")
    assert "cuda" not in rng_state(cpu) and "cuda" not in rng_state()
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or
                        torch.full((16,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state)))
    torch.manual_seed(3)
    state = rng_state(torch.device("cuda", 1))
    expected = torch.rand(3)
    assert calls == [("get", torch.device("cuda", 1))] and len(state["cuda"]) == 1
    # a checkpoint of older code saved 8 GPUs' states; the resuming process sees one GPU, or none
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    calls.clear()
    set_rng_state(state, cpu)
    assert calls == [] and torch.equal(torch.rand(3), expected)  # resumed on a CPU: the CPU draws come back
    set_rng_state(state, torch.device("cuda", 0))
    ((what, device, cuda_state),) = calls
    assert (what, device) == ("set", torch.device("cuda", 0)) and torch.equal(cuda_state, state["cuda"][0])
    assert torch.equal(torch.rand(3), expected)
