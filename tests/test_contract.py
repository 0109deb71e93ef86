"""The contract every registered method passes, for every teacher x student family pair.

A method registered later (even from a user's own module) is picked up by these tests automatically: the plugins
named in $HKDBENCH_METHODS are imported before the methods are listed, so
``HKDBENCH_METHODS=my_method.py pytest tests/test_contract.py`` tests a user's method too. A method that raises
NotImplementedError from its constructor for a pair does not support that pair: the test is skipped with its reason
(and ``hkdbench methods --pair`` says so); any other error fails."""
import copy

import pytest
import torch

from hkdbench.methods import TASK_LOSS, Targets, TrainingSet, get_method, list_methods, load_plugins, method_config
from _support import PAIRS, TEST_CLASSES, TEST_IMG, small_model

load_plugins()
METHODS = list(list_methods())
# the training set of methods with per-sample state: 8 samples per class; batches index into it
TRAIN_LABELS = torch.arange(8 * TEST_CLASSES) % TEST_CLASSES


def _batch(seed=0, n=4):
    """Images, labels and training-set indices of a batch (the labels are those of the indexed samples)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(TRAIN_LABELS), generator=g)[:n]
    return torch.randn(n, 1, TEST_IMG, TEST_IMG, generator=g), TRAIN_LABELS[index], index


def _build(method, teacher_name, student_name, seed=0):
    cls = get_method(method)
    student, teacher = small_model(student_name), small_model(teacher_name)
    torch.manual_seed(seed)
    try:
        distiller = cls.build(method_config(method), student, teacher if cls.uses_teacher else None, TEST_CLASSES,
                              train_set=TrainingSet(TRAIN_LABELS))
    except NotImplementedError as err:
        pytest.skip(f"{method} does not support {teacher_name} -> {student_name}: {err}")
    distiller.train()
    student.train()
    return distiller, student, teacher


def _step(distiller, seed=0, epoch=0):
    images, labels, index = _batch(seed)
    s_out, losses = distiller.training_step(images, Targets(labels, index=index), epoch)
    return s_out, losses


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_one_step_on_every_pair(method, teacher_name, student_name):
    distiller, student, teacher = _build(method, teacher_name, student_name)
    teacher_before = copy.deepcopy(teacher.state_dict())
    s_out, losses = _step(distiller)

    assert losses, "a method returns at least one loss term"
    assert s_out.logits.shape == (4, TEST_CLASSES)
    for name, value in losses.items():
        assert value.ndim == 0, name
        assert torch.isfinite(value), f"{method} {teacher_name}->{student_name}: {name}={value}"
    sum(losses.values()).backward()

    # gradients reach the student ...
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # ... and the method's own modules (every trainable one gets a gradient tensor)
    own = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
    reached = [n for n, p in own if p.grad is not None]
    assert not own or reached, f"{method}: no gradient reached any of its modules"
    # ... every trainable one of them unless the method declares unused parameters (DDP runs without detection)
    if not get_method(method).find_unused_parameters:
        trainable = [*student.named_parameters(), *distiller.named_parameters()]
        unused = [n for n, p in trainable if p.requires_grad and p.grad is None]
        assert not unused, f"{method}: no gradient for {unused[:5]}; set find_unused_parameters = True"
    # ... and never the teacher's weights
    assert all(p.grad is None for p in teacher.parameters())
    if get_method(method).uses_teacher:
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not teacher.training, "the teacher must stay in eval mode"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"the teacher's {k} changed"


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_and_determinism(method):
    teacher_name, student_name = "swin_mini", "resnet_mini"
    first, student_a, _ = _build(method, teacher_name, student_name, seed=1)
    for step in range(2):  # methods with state (feedback, EMA baselines) have it after a step or two
        _, losses_a = _step(first, seed=step)
        sum(losses_a.values()).backward()

    second, student_b, _ = _build(method, teacher_name, student_name, seed=2)
    second.load_state_dict(first.state_dict())
    student_b.load_state_dict(student_a.state_dict())
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value), key

    torch.manual_seed(5)
    _, next_a = _step(first, seed=7)
    torch.manual_seed(5)
    _, next_b = _step(second, seed=7)
    assert next_a.keys() == next_b.keys()
    for key in next_a:
        assert torch.equal(next_a[key], next_b[key]), f"{method}: {key} differs after a state-dict round trip"


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_losses(method):
    runs = []
    for _ in range(2):
        distiller, _, _ = _build(method, "vit_mini", "mixer_mini", seed=3)
        torch.manual_seed(11)
        _, losses = _step(distiller, seed=4)
        runs.append({k: v.item() for k, v in losses.items()})
    assert runs[0] == runs[1]


@pytest.mark.parametrize("method", METHODS)
def test_deployed_student_is_unchanged_in_size(method):
    alone = small_model("vit_mini").deploy_parameter_count()
    distiller, student, _ = _build(method, "resnet_mini", "vit_mini")
    assert student.deploy_parameter_count() == alone
    # the method's modules are its own, never registered inside the student
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in distiller.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_the_task_term_is_named_task_loss(method):
    """Every built-in method trains on the labels, under the one task-term key the harness and probes read."""
    distiller, _, _ = _build(method, "resnet_mini", "vit_mini")
    _, losses = _step(distiller)
    assert TASK_LOSS == "ce" and TASK_LOSS in losses


def test_a_method_that_needs_sample_indices_requires_the_training_set():
    cls = get_method("crd")
    student, teacher = small_model("vit_mini"), small_model("resnet_mini")
    with pytest.raises(ValueError, match="needs the training set"):
        cls(method_config("crd"), student, teacher, TEST_CLASSES)
    distiller = cls.build(method_config("crd"), student, teacher, TEST_CLASSES, train_set=TrainingSet(TRAIN_LABELS))
    images, labels, _ = _batch()
    with pytest.raises(ValueError, match="needs Targets.index"):
        distiller.training_step(images, Targets(labels))


def test_build_passes_the_training_set_only_to_methods_that_need_it():
    # kd's constructor takes no train_set: build must not hand it one
    distiller = get_method("kd").build(method_config("kd"), small_model("vit_mini"), small_model("resnet_mini"),
                                       TEST_CLASSES, train_set=TrainingSet(TRAIN_LABELS))
    assert not get_method("kd").needs_sample_indices and get_method("crd").needs_sample_indices
    assert distiller.optimizer_groups() == []


def test_an_unsupported_pair_is_skipped_with_its_reason():
    from dataclasses import dataclass

    from hkdbench.methods import Distiller, register_method, unregister_method

    @register_method
    class CnnTeachersOnly(Distiller):
        name = "cnn_teachers_only"

        @dataclass(frozen=True)
        class Config:
            pass

        def __init__(self, cfg, student, teacher, num_classes, criterion=None):
            super().__init__(cfg, student, teacher, num_classes, criterion)
            if teacher.stage_info[1].layout != "nchw":
                raise NotImplementedError("needs a CNN teacher")

    try:
        with pytest.raises(pytest.skip.Exception, match="does not support vit_mini -> resnet_mini: needs a CNN"):
            _build("cnn_teachers_only", "vit_mini", "resnet_mini")
        assert _build("cnn_teachers_only", "resnet_mini", "vit_mini")[0].name == "cnn_teachers_only"
    finally:
        unregister_method("cnn_teachers_only")


def test_registering_a_duplicate_name_fails():
    from dataclasses import dataclass

    from hkdbench.methods import Distiller, register_method

    with pytest.raises(ValueError, match="already registered"):
        @register_method
        class AnotherKD(Distiller):
            name = "kd"

            @dataclass(frozen=True)
            class Config:
                pass


def test_unknown_method_lists_known_ones():
    with pytest.raises(KeyError, match="known methods: .*kd"):
        get_method("does-not-exist")
