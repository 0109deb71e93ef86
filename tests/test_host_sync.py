"""At most one host synchronisation per training step, for every registered method (issue #10, item 4), and none
per batch of the data stream (issue #27, item 3).

On the CPU the reads that would synchronise on a GPU are counted by patching torch
(``benchmark/tools/host_sync.py``; on CUDA the same function counts torch's own sync warnings). The one read
allowed in a step is its packed transfer of its losses, statistics and correct count."""
import itertools
import json

import pytest
import torch
import torch.nn as nn

from hkdbench.benchmark.core.config import OptimConfig
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.data.stream import DataStream
from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.engine.step import TrainStep, _make_ema, setup_training
from hkdbench.benchmark.data.stream import prepare_batch
from hkdbench.benchmark.tools.host_sync import count_host_syncs, count_step_syncs, count_stream_syncs
from hkdbench.methods import Targets, TrainingSet, get_method, list_methods, load_plugins
from _support import TEST_CLASSES, TEST_IMG, small_model

load_plugins()
METHODS = list(list_methods())
CPU = torch.device("cpu")
TRAIN_LABELS = torch.arange(8 * TEST_CLASSES) % TEST_CLASSES


def _train_step(method: str, teacher_name: str, student_name: str, optimizer: str = "adamw") -> TrainStep:
    """The trainer's pieces for a mini pair: setup_training, clipping and a student EMA on (their code runs too)."""
    cls = get_method(method)
    student, teacher = small_model(student_name), small_model(teacher_name) if cls.uses_teacher else None
    optim = OptimConfig(name=optimizer, lr=1e-3, clip_grad=1.0, warmup_epochs=0)
    torch.manual_seed(0)
    try:
        setup = setup_training(method, None, student, teacher, TEST_CLASSES, nn.CrossEntropyLoss(),
                               TrainingSet(TRAIN_LABELS) if cls.needs_sample_indices else None, optim, "fp32",
                               False, CPU)
    except NotImplementedError as err:
        pytest.skip(f"{method} does not support {teacher_name} -> {student_name}: {err}")
    return TrainStep(optim, 2, 4, setup.module, setup.module, setup.method, setup.optimizer, setup.scaler, CPU,
                     ema=_make_ema(student, 0.9))


def _batch(seed: int, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(TRAIN_LABELS), generator=g)[:n]
    return torch.randn(n, 1, TEST_IMG, TEST_IMG, generator=g), TRAIN_LABELS[index], index


def _index(train_step: TrainStep, index):
    return index if train_step.method.needs_sample_indices else None


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("teacher_name,student_name", [("swin_mini", "resnet_mini"), ("resnet_mini", "vit_mini")])
def test_a_step_reads_the_device_at_most_once(method, teacher_name, student_name):
    train_step = _train_step(method, teacher_name, student_name)
    for step in range(3):  # the first step (optimiser state, first-batch estimates) and later ones
        images, labels, index = _batch(step)
        batch = prepare_batch(images, labels, _index(train_step, index))
        (values, correct), reads = count_step_syncs(train_step, batch, 0, step)
        assert len(reads) <= 1, f"{method} step {step}: {len(reads)} host reads: {reads}"
        assert 0 <= correct <= len(labels) and all(k.startswith(("loss/", "stat/")) or k == "lr" for k in values)


@pytest.mark.parametrize("method", METHODS)
def test_the_packed_values_are_the_terms_and_statistics_of_the_step(method):
    """The values of one step against the same forward on a twin, read term by term: the same keys and floats."""
    train_step = _train_step(method, "swin_mini", "resnet_mini", optimizer="sgd")
    twin = _train_step(method, "swin_mini", "resnet_mini", optimizer="sgd").module.train()
    images, labels, index = _batch(1)
    index = _index(train_step, index)
    torch.manual_seed(3)
    s_out, losses = twin(images, Targets(hard=labels, index=index), 0)
    expected = {f"loss/{k}": v.item() for k, v in losses.items()}
    torch.manual_seed(3)
    values, correct = train_step.step(prepare_batch(images, labels, index), 0, 0)
    # the statistics as the step leaves them (PAT's beta after the update), read one by one
    expected.update({f"stat/{k}": float(v) for k, v in train_step.method.statistics().items()})
    assert values.pop("lr") == pytest.approx(1e-3)
    assert values == expected
    assert correct == int((s_out.logits.argmax(-1) == labels).sum())


def test_statistics_are_detached_scalar_tensors():
    """The contract the packed read relies on, for the methods that log statistics."""
    for method, pair in (("spofa", ("swin_mini", "resnet_mini")), ("pat", ("swin_mini", "resnet_mini"))):
        train_step = _train_step(method, *pair)
        images, labels, _ = _batch(0)
        train_step.step(prepare_batch(images, labels), 0, 0)
        stats = train_step.method.statistics()
        assert stats, method
        for name, value in stats.items():
            assert isinstance(value, torch.Tensor) and value.ndim == 0 and not value.requires_grad, (method, name)


def test_the_cpu_count_sees_each_kind_of_host_read():
    """The counting itself: every read below is one a GPU would wait for; ignored tensors are left out."""
    x, mask, kept = torch.arange(6.0), torch.tensor([True, False] * 3), torch.tensor(2.0)

    def reads():
        x.sum().item()
        float(x[0])
        if x.max() > 0:  # Tensor.__bool__
            pass
        x[mask] += 1  # a boolean-mask read and a boolean-mask write
        torch.nonzero(x)
        x.unique()  # Tensor.unique calls torch.unique: one read
        x.to("cpu")
        x.tolist()
        kept.item()
        return x.to(torch.float64) * 2 + x[1:3].sum()  # no reads: on the device all the way

    result, seen = count_host_syncs(reads, CPU, ignore=lambda t: t is kept)
    assert seen == ["Tensor.item", "Tensor.__float__", "Tensor.__bool__", "boolean-mask indexing",
                    "boolean-mask assignment", "torch.nonzero", "Tensor.unique", "Tensor.to(cpu)", "Tensor.tolist"]
    assert result.shape == (6,)
    assert float(torch.arange(3.0).sum()) == 3.0 and torch.Tensor.__dict__.get("item") is None  # patches undone


def test_evaluation_reads_the_device_once_and_scores_as_by_hand():
    """evaluate() sums on the device and reads once: the same top-1/top-5/loss as computed over the whole set."""
    from hkdbench.benchmark.engine.evaluation import evaluate

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 6, generator=g), torch.randint(0, 7, (n,), generator=g)) for n in (5, 5, 3)]
    loader = type("Loader", (), {"batches": lambda self: iter(batches)})()
    model = nn.Linear(6, 7)
    scores, reads = count_host_syncs(lambda: evaluate(model, loader, CPU, None, False), CPU)
    assert reads == ["Tensor.tolist"]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    top5 = (logits.topk(5, dim=1).indices == y[:, None]).any(1).double().mean().item()
    assert scores["top1"] == pytest.approx(100 * (logits.argmax(1) == y).double().mean().item())
    assert scores["top5"] == pytest.approx(100 * top5)
    assert scores["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def _cifar_vit_stream(device: torch.device) -> DataStream:
    """The ``cifar-vit`` recipe's training stream (RandomResizedCrop with per-image resampling, flip, RandAugment
    rand-m9-mstd0.5-inc1, mixup/cutmix, random erasing), with CRD's sample indices, at a size a CPU affords."""
    cfg = resolve_run_config(kind="student", student="vit_mini", method="none", recipe="cifar-vit",
                             overrides=["data.img_size=32", "data.batch_size=32", "data.train_subset=128",
                                        "data.eval_subset=32"])
    assert cfg.data.auto_augment and cfg.data.mixup and cfg.data.cutmix and cfg.data.reprob
    train_loader, _, info = loaders.build_loaders(cfg.data, device, 1.0)
    mixup = loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
    return DataStream([train_loader], cfg.train.seed, device, mixup, with_index=True)


def test_a_batch_of_the_cifar_vit_stream_makes_no_host_sync(fmnist_available):
    stream = _cifar_vit_stream(CPU)
    for step in (0, 2):  # an epoch's first batch (its order goes to the device too) and a later one
        (drawn, (batch,)), reads = count_stream_syncs(stream, epoch=1, step=step)
        assert reads == [], f"batch {step}: {len(reads)} host reads: {reads}"
        assert drawn == step and batch.images.shape == (32, 1, 32, 32) and batch.targets.soft is not None
    # what was left out: the three reads of RandAugment's draws, made and planned on the host
    _, every_read = count_host_syncs(lambda: next(stream.batches(1, 2)), CPU)
    assert every_read == ["Tensor.tolist"] * 3


def test_the_cifar_vit_stream_draws_batches_on_a_device_whose_values_cannot_be_read(fmnist_available):
    """A meta tensor has no values: reading one (``.tolist()``, a data-dependent size such as bincount's) raises.
    The stream's batches come through, so none of its steps reads a value from the data's device."""
    stream = _cifar_vit_stream(torch.device("meta"))
    for _, (batch,) in itertools.islice(stream.batches(epoch=0), 3):
        assert batch.images.device.type == "meta" and batch.targets.soft.shape == (32, 10)


def test_the_stream_speed_tool_times_each_contender_and_counts_the_streams_syncs(fmnist_available, tmp_path):
    """benchmark/tools/stream_speed.py end to end at a tiny size (what it measures is not asserted: no timing in
    tests), its JSON and its report."""
    from hkdbench.benchmark.tools import stream_speed

    out = tmp_path / "speed.json"
    stream_speed.main(["--device", "cpu", "--img-size", "16", "--batch-size", "8", "--steps", "2", "--repeats", "2",
                       "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["images_per_s"]) == set(stream_speed.CONTENDERS)
    assert all(len(rates) == 2 and min(rates) > 0 for rates in result["images_per_s"].values())
    assert result["stream_host_syncs_per_batch"] == 0 and result["precision"] == "float32"
    assert result["overlap_over_serial"] > 0 and result["serial_over_parts"] > 0
