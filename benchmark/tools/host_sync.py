"""How many times a training step, or the drawing of a batch, makes the host wait for the device.

On CUDA the count is the device's own: ``torch.cuda.set_sync_debug_mode('warn')`` makes every synchronising call
(``.item()``, a device-to-host copy, ``torch.nonzero``, boolean-mask indexing, ...) warn, and the warnings are
counted. On the CPU nothing synchronises, so the reads that would on a GPU are counted instead: the Python entry
points through which a tensor's value reaches the host (``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()``,
``float()``/``int()``/``bool()`` of a tensor, functions whose output size depends on the values such as
``torch.nonzero``, indexing with a boolean mask), patched for the duration of the call. Reads made inside torch's
C++ code are not seen there; the CUDA count sees them.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from hkdbench.benchmark.data.randaugment import BatchRandAugment

# Tensor methods that hand a tensor's value to Python
_TENSOR_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__complex__",
                 "__array__", "nonzero", "masked_select", "unique", "unique_consecutive", "bincount", "argwhere")
# torch functions whose output shape (or Python result) depends on tensor values
_TORCH_READS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal",
                "allclose", "is_nonzero")


def _is_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)


def _to_host(args, kwargs) -> bool:
    """``.to('cpu')``: the target spelled as a string (a ``torch.device`` may be the tensor's own device, on a GPU
    too, as torch's own code passes it)."""
    targets = [*args, kwargs.get("device")]
    return any(isinstance(a, str) and torch.device(a).type == "cpu" for a in targets)


def _single_argument_where(args, kwargs) -> bool:
    return len(args) + len(kwargs) == 1


@contextlib.contextmanager
def _counting_host_reads(ignore: Callable[[torch.Tensor], bool]) -> Iterator[List[str]]:
    """Patches torch so that each read of a tensor's value by Python appends its name to the yielded list (a read
    nested inside another, e.g. ``Tensor.unique`` calling ``torch.unique``, counts once)."""
    reads: List[str] = []
    depth = [0]

    def counted(name: str, original: Callable, when: Optional[Callable] = None) -> Callable:
        def wrapper(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if depth[0] == 0 and (when is None or when(args[1:], kwargs)) and not (tensor is not None
                                                                                  and ignore(tensor)):
                reads.append(name)
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    patches: List[Tuple[Any, str, Callable]] = []
    for name in _TENSOR_READS:
        patches.append((torch.Tensor, name, counted(f"Tensor.{name}", getattr(torch.Tensor, name))))
    for name in _TORCH_READS:
        patches.append((torch, name, counted(f"torch.{name}", getattr(torch, name))))
    patches += [
        (torch.Tensor, "to", counted("Tensor.to(cpu)", torch.Tensor.to, _to_host)),
        (torch, "where", counted("torch.where(condition)", torch.where, _single_argument_where)),
        (torch.Tensor, "__getitem__", counted("boolean-mask indexing", torch.Tensor.__getitem__,
                                              lambda args, kwargs: _is_mask(args[0]))),
        (torch.Tensor, "__setitem__", counted("boolean-mask assignment", torch.Tensor.__setitem__,
                                              lambda args, kwargs: _is_mask(args[0]))),
    ]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    try:
        for owner, name, wrapper in patches:
            setattr(owner, name, wrapper)
        yield reads
    finally:
        for owner, name, original in saved:
            if original is None:  # inherited from torch's C base class: drop the override
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def count_host_syncs(fn: Callable[[], Any], device: torch.device,
                     ignore: Callable[[torch.Tensor], bool] = lambda t: False) -> Tuple[Any, List[str]]:
    """Runs ``fn()``; returns its result and the host synchronisations it made on ``device``: on CUDA the
    messages of the synchronising calls torch reports, elsewhere the names of the host reads counted by patching
    (``ignore(tensor)`` True leaves a read of that tensor out: one that is host-side on a GPU too)."""
    device = torch.device(device)
    if device.type != "cuda":
        with _counting_host_reads(ignore) as reads:
            result = fn()
        return result, list(reads)
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return result, [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def count_step_syncs(train_step, batch, epoch: int = 0, step: int = 0, shared_teacher=None
                     ) -> Tuple[Tuple[dict, int], List[str]]:
    """The host synchronisations of one ``TrainStep.step`` (see :func:`count_host_syncs`) and the step's result.
    Reads of the optimiser's ``step`` counters are left out: a non-fused torch optimiser keeps them on the host on
    a GPU too."""
    optimizer = train_step.optimizer

    def is_step_counter(tensor: torch.Tensor) -> bool:
        return any(state.get("step") is tensor for state in optimizer.state.values())

    return count_host_syncs(lambda: train_step.step(batch, epoch, step, shared_teacher), train_step.device,
                            ignore=is_step_counter)


def count_stream_syncs(stream, epoch: int = 0, step: int = 0):
    """The host synchronisations of drawing batch ``step`` of ``epoch`` from a ``data.stream.DataStream`` (see
    :func:`count_host_syncs`) and the ``(step, [Batch of each rank])`` drawn. Reads of RandAugment's draws are left
    out: they are made on the host (torch's CPU generator) on a GPU too, and planned there
    (``BatchRandAugment.apply``); they are told apart by being what ``BatchRandAugment.draw`` returned during the
    call."""
    host_draws: List[torch.Tensor] = []
    draw = BatchRandAugment.draw

    def recording_draw(self, *args, **kwargs):
        draws = draw(self, *args, **kwargs)
        host_draws.extend(t for t in draws if t.device.type == "cpu")
        return draws

    BatchRandAugment.draw = recording_draw
    try:
        return count_host_syncs(lambda: next(stream.batches(epoch, step)), stream.device,
                                ignore=lambda tensor: any(tensor is t for t in host_draws))
    finally:
        BatchRandAugment.draw = draw
