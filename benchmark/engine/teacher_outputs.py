"""Stored teacher outputs: a teacher's logits (and, when asked, its pre-logit embedding) on every step and rank of a
data stream, computed once and read by every run that distils from that teacher on that stream
(``train.teacher_outputs=stored``).

Every batch is a pure function of (seed, epoch, step, rank) (``data/stream.py``) and the teacher runs in eval mode
without gradients, so its outputs are a pure function of what :func:`made_by` records: the teacher's weights (the
SHA-256 of the file they are loaded from), the data stream (``cohort.stream_key``, the student by its crop: the
students of one teacher share them), the dtype and memory format of the pass, and what is stored. They are kept
under a name hashed from that (``<runs>/_teacher_outputs/``, named by ``core/store.py``), one shard per epoch in the
dtype the pass ran in; a manifest lists each finished shard with its SHA-256, written after the shard is renamed into
place. A shard not listed, missing, or whose bytes differ from the listed SHA-256 is computed again; a manifest made
by other weights or another stream is refused.

A reading run builds no teacher: methods get a :class:`RecordedTeacher` (the widths their projectors need, from the
manifest) and every step's outputs from the shard. Only logits and pre-logits are stored: stage features are hundreds
of times larger (a Swin-T stage-4 map is 49x768 values a sample against 100 logits), and PAT's prompted pass is not
a plain pass at all.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from hkdbench.methods import PRE_LOGITS, get_method

from hkdbench.benchmark.core.config import ConfigError, RunConfig, identity
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.store import RunStore, TeacherOutputsDir, atomic_replace
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.data.stream import DataStream
from hkdbench.benchmark.engine.cohort import reads_stored, stream_key
from hkdbench.benchmark.engine.evaluation import _autocast, autocast_dtype, evaluate, use_channels_last
from hkdbench.benchmark.engine.teacher import CHECKPOINT, PRETRAINED, TeacherSource, teacher_source
from hkdbench.benchmark.models.taps import Features, TappedModel
from hkdbench.benchmark.models.zoo import zoo_entry

FORMAT = 1  # the layout of the shards and manifest; a new layout is a new name


class TeacherOutputsError(HkdbenchError, RuntimeError):
    """Stored teacher outputs that cannot be used: made by other weights or another stream, or damaged while read."""


# -- what the outputs are a function of -----------------------------------------------------------------------------

def stored_contents(cfgs: Sequence[RunConfig]) -> Tuple[str, ...]:
    """What the readers among ``cfgs`` need stored: the logits, and the pre-logits when one of them reads those."""
    reads = {get_method(c.method).teacher_reads for c in cfgs if reads_stored(c)}
    return ("logits", "pre_logits") if PRE_LOGITS in reads else ("logits",)


def teacher_weights_identity(source: TeacherSource, store: RunStore) -> Dict[str, Any]:
    """The teacher's weights, by the SHA-256 of the file they are loaded from (a teacher run must have finished)."""
    from hkdbench.benchmark.models.pretrained import file_sha256, resolve_pretrained

    t = source.cfg.teacher
    if source.kind == CHECKPOINT:
        return {"model": t.name, "checkpoint_sha256": file_sha256(Path(t.checkpoint)), "ema": t.checkpoint_ema}
    if source.kind == PRETRAINED:
        return {"model": t.name, "pretrained": t.pretrained,
                "sha256": t.pretrained_sha256 or resolve_pretrained(t.pretrained, t.name).sha256}
    t_dir = source.run_dir(store)
    return {"model": t.name, "run": t_dir.path.name, "weights": t.weights,
            "sha256": file_sha256(t_dir.weights_file(t.weights))}


def stream_identity(cfg: RunConfig) -> Dict[str, Any]:
    """What decides the batches the teacher sees: ``cohort.stream_key`` less the pass's precision and memory format
    (:func:`made_by` records them as the device resolves them), with the student by its crop."""
    stream = json.loads(stream_key(cfg))
    for setting in ("precision", "channels_last"):
        stream.pop(setting)
    stream["data"] = identity(cfg.data)  # the data settings that decide the batches (not data.workers)
    # the student gives the batches only its crop (the rest of its settings are resolved into the data settings): the
    # students of one teacher at one crop read one set of outputs
    stream["crop_pct"] = cfg.data.crop_pct or zoo_entry(stream.pop("student")).crop_pct
    return stream


def made_by(cfg: RunConfig, store: RunStore, device: torch.device, contents: Sequence[str]) -> Dict[str, Any]:
    """Everything the stored outputs are a function of, as the manifest records it (and its hash names them)."""
    dtype = autocast_dtype(cfg.train.precision, device)
    body = {"format": FORMAT, "teacher": teacher_weights_identity(teacher_source(cfg), store),
            "stream": stream_identity(cfg), "dtype": str(dtype or torch.float32),
            "channels_last": use_channels_last(cfg.train.channels_last, device), "contents": list(contents)}
    return json.loads(json.dumps(body, default=str))  # as the manifest reads back (tuples as lists), to compare


def outputs_name(body: Dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{body['teacher']['model']}_{digest}"


# -- the stored artefact --------------------------------------------------------------------------------------------

class StoredOutputs:
    """The outputs of one teacher on one stream in the store: which epochs are there, writing one, reading a step."""

    def __init__(self, folder: TeacherOutputsDir, body: Dict[str, Any], device: torch.device):
        self.folder, self.body, self.device = folder, body, device
        self._epoch: Optional[Tuple[int, Dict[str, torch.Tensor]]] = None  # the shard in memory

    def manifest(self) -> Dict[str, Any]:
        """The manifest (a fresh one when none is written yet); refused when it was made by anything else."""
        found = self.folder.manifest()
        if found is None:
            return {"made_by": self.body, "shards": {}}
        if found.get("made_by") != self.body:
            raise TeacherOutputsError(
                f"{self.folder.path} holds teacher outputs made by other weights or another data stream "
                f"({json.dumps(found.get('made_by'), sort_keys=True)[:300]}); this run's are "
                f"{json.dumps(self.body, sort_keys=True)[:300]}. Nothing was written: remove that folder if it is "
                "stale (a hash collision or a hand edit)")
        return found

    @property
    def teacher_top1(self) -> Optional[float]:
        return self.manifest().get("teacher_top1")

    def shapes(self) -> Dict[str, int]:
        return self.manifest()["shapes"]

    def missing_epochs(self, epochs: int) -> List[int]:
        """The epochs below ``epochs`` whose shard is not listed, missing, or not the bytes listed (damaged, cut)."""
        shards = self.manifest()["shards"]
        return [e for e in range(epochs) if shards.get(str(e)) is None or shards[str(e)] != self._sha256_of(e)]

    def _sha256_of(self, epoch: int) -> Optional[str]:
        path = self.folder.shard_file(epoch)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None

    def write_epoch(self, epoch: int, tensors: Dict[str, torch.Tensor], extra: Dict[str, Any]) -> None:
        """Writes one epoch's shard (atomic), then lists it in the manifest with ``extra`` (shapes, top-1). Call it
        under the folder's lock."""
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in tensors.items()}, buffer)
        data = buffer.getvalue()
        with atomic_replace(self.folder.shard_file(epoch)) as tmp, open(tmp, "wb") as f:
            f.write(data)
        manifest = self.manifest()
        manifest.update(extra)
        manifest["shards"][str(epoch)] = hashlib.sha256(data).hexdigest()
        self.folder.write_manifest(manifest)

    def features(self, epoch: int, step: int, ranks: Sequence[int]) -> List[Features]:
        """The teacher's outputs at ``step`` of ``epoch`` for each of ``ranks``, on the device. Without stored
        pre-logits, Features.pre_logits is None (its readers read only the logits)."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._load(epoch))
        shard = self._epoch[1]
        pre = shard.get("pre_logits")
        return [Features(logits=shard["logits"][step, r], pre_logits=pre[step, r] if pre is not None else None)
                for r in ranks]

    def _load(self, epoch: int) -> Dict[str, torch.Tensor]:
        path = self.folder.shard_file(epoch)
        listed = self.manifest()["shards"].get(str(epoch))
        data = path.read_bytes() if path.exists() else b""
        if listed is None or hashlib.sha256(data).hexdigest() != listed:
            raise TeacherOutputsError(f"{path} is missing or damaged (its SHA-256 is not the manifest's); it was "
                                      "sound when the run started. Resume the run (--resume): the shard is computed "
                                      "again first")
        return torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)


def open_outputs(cfg: RunConfig, store: RunStore, device: torch.device, contents: Sequence[str]) -> StoredOutputs:
    body = made_by(cfg, store, device, contents)
    return StoredOutputs(store.teacher_outputs_dir(outputs_name(body)), body, device)


def find_outputs(cfg: RunConfig, store: RunStore, device: torch.device, contents: Sequence[str]) -> StoredOutputs:
    """The stored outputs with ``contents``, or with more (logits and pre-logits serve a logits reader) where those
    exist and these do not."""
    wanted = open_outputs(cfg, store, device, contents)
    if tuple(contents) == ("logits",) and wanted.folder.manifest() is None:
        fuller = open_outputs(cfg, store, device, ("logits", "pre_logits"))
        if fuller.folder.manifest() is not None:
            return fuller
    return wanted


# -- computing them -------------------------------------------------------------------------------------------------

class RecordedTeacher(nn.Module):
    """The teacher of a run that reads stored outputs: what a method's constructor reads of it (its name, its
    pre-logit width and class count, from the manifest) and no weights. Its step outputs come from ``outputs``."""

    def __init__(self, outputs: StoredOutputs):
        super().__init__()
        shapes = outputs.shapes()
        self.outputs, self.name = outputs, outputs.body["teacher"]["model"]
        self.num_features, self.num_classes = shapes["num_features"], shapes["num_classes"]

    def forward(self, images: torch.Tensor, stages: Sequence[int] = ()) -> Features:
        raise TeacherOutputsError("this run reads stored teacher outputs (train.teacher_outputs=stored): its teacher "
                                  "is not in memory, and a method asked it for a pass of its own")


def ensure_outputs(cfgs: Sequence[RunConfig], store: RunStore, device: torch.device, epochs: int,
                   build_teacher: Callable[[], Tuple[TappedModel, Optional[float]]],
                   say: Callable[[str], None]) -> StoredOutputs:
    """The stored outputs the readers among ``cfgs`` need, for epochs 0 to ``epochs - 1``: the missing, damaged or
    cut-off shards computed first (by ``build_teacher``'s teacher, built only then), under the folder's lock."""
    first = next(c for c in cfgs if reads_stored(c))
    outputs = find_outputs(first, store, device, stored_contents(cfgs))
    outputs.manifest()  # refuses outputs of other weights or another stream before anything is written
    if not outputs.missing_epochs(epochs):
        return outputs
    with outputs.folder.lock():
        outputs.folder.remove_stray_temp_files()
        todo = outputs.missing_epochs(epochs)  # another writer may have finished some while this one waited
        if todo:
            say(f"teacher {first.teacher.name}: computing its outputs on the data stream for epoch(s) "
                f"{_epoch_list(todo)} into {outputs.folder.path}")
            teacher, top1 = build_teacher()
            OutputsWriter(first, outputs, teacher, top1).write(todo)
    return outputs


def _epoch_list(epochs: List[int]) -> str:
    return ", ".join(str(e + 1) for e in epochs[:8]) + (", ..." if len(epochs) > 8 else "")


class OutputsWriter:
    """Runs the teacher's plain pass over the stream (every rank of train.world, in this process) and stores it,
    epoch by epoch: the pass a cohort shares (``TrainStep.teacher_pass``), on the same batches."""

    def __init__(self, cfg: RunConfig, outputs: StoredOutputs, teacher: TappedModel, top1: Optional[float]):
        self.cfg, self.outputs, self.teacher, self.top1 = cfg, outputs, teacher, top1
        self.device = outputs.device
        self.dtype = autocast_dtype(cfg.train.precision, self.device)
        self.channels_last = use_channels_last(cfg.train.channels_last, self.device)

    def write(self, epochs: Sequence[int]) -> None:
        stream, test_loader = self._stream()
        if self.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        if self.top1 is None:  # a checkpoint's or timm's weights: measured as the trainer would
            self.top1 = evaluate(self.teacher, test_loader, self.device, self.dtype, self.channels_last)["top1"]
        for epoch in epochs:
            tensors = self._epoch(stream, epoch)
            shapes = {"num_features": self.teacher.num_features, "num_classes": tensors["logits"].shape[-1]}
            extra = {"teacher_top1": self.top1, "steps": len(stream), "world": self.cfg.train.world, "shapes": shapes}
            self.outputs.write_epoch(epoch, tensors, extra)

    def _stream(self) -> Tuple[DataStream, Any]:
        cfg, world = self.cfg, self.cfg.train.world
        crop_pct = cfg.data.crop_pct or zoo_entry(cfg.student.name).crop_pct
        trains, test, info = loaders.build_rank_loaders(cfg.data, self.device, crop_pct, list(range(world)), world)
        mixup = loaders.build_mixup(cfg.data, info.num_classes, cfg.optim.label_smoothing)
        return DataStream(trains, cfg.train.seed, self.device, mixup, self.channels_last,
                          ranks=list(range(world))), test

    def _epoch(self, stream: DataStream, epoch: int) -> Dict[str, torch.Tensor]:
        """(steps, world, batch, width) tensors of the epoch: the logits, and the pre-logits when stored."""
        wanted = self.outputs.body["contents"]
        steps: Dict[str, List[torch.Tensor]] = {k: [] for k in wanted}
        self.teacher.eval()
        for _, batches in stream.batches(epoch):
            with torch.no_grad(), _autocast(self.device, self.dtype):
                passes = [self.teacher(batch.images) for batch in batches]
            for k in wanted:
                steps[k].append(torch.stack([getattr(p, k) for p in passes]))
        return {k: torch.stack(v) for k, v in steps.items()}


def estimated_bytes(cfgs: Sequence[RunConfig], device: torch.device) -> int:
    """The size of the outputs the readers among ``cfgs`` need (every epoch), counted without loading anything: the
    pre-logit width from the teacher built on the meta device."""
    from hkdbench.benchmark.data.datasets import dataset_info
    from hkdbench.benchmark.data.loaders import train_steps_per_epoch

    readers = [c for c in cfgs if reads_stored(c)]
    first, contents = readers[0], stored_contents(readers)
    info = dataset_info(first.data.dataset)
    per_sample = info.num_classes
    if "pre_logits" in contents:
        with torch.device("meta"):
            model = zoo_entry(first.teacher.name).build(info.num_classes, info.in_chans, first.data.img_size)
        per_sample += getattr(model, "head_hidden_size", None) or model.num_features
    dtype = autocast_dtype(first.train.precision, device) or torch.float32
    samples = train_steps_per_epoch(first.data, first.train.world) * first.data.batch_size * first.train.world
    return max(c.train.epochs for c in readers) * samples * per_sample * dtype.itemsize


def describe_outputs(cfgs: Sequence[RunConfig], store: RunStore, device: torch.device) -> str:
    """What ``hkdbench teacher-outputs --dry-run`` prints: where the outputs go, what they hold, their size, which
    epochs are stored. A teacher run not yet trained cannot name them (their name holds its weights' hash)."""
    readers = [c for c in cfgs if reads_stored(c)]
    first = readers[0]
    epochs = max(c.train.epochs for c in readers)
    size = f"{_in_units(estimated_bytes(readers, device))} for {epochs} epochs"
    what = f"{first.teacher.name} {' + '.join(stored_contents(readers))}"
    source = teacher_source(first)
    if source.is_run and not source.run_dir(store).is_done:
        return (f"teacher outputs of {what}: about {size}; its teacher run {source.run_dir(store).path.name} is "
                "not finished (it is trained first)")
    outputs = find_outputs(first, store, device, stored_contents(readers))
    missing = outputs.missing_epochs(epochs)
    return (f"teacher outputs of {what} at {outputs.folder.path}: about {size}; "
            f"{epochs - len(missing)} of {epochs} epochs stored")


def _in_units(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def check_can_store(cfgs: Sequence[RunConfig], distributed: bool, store: RunStore, device: torch.device,
                    epochs: int) -> None:
    """Under DDP the outputs are read, not written (one process computes them for every rank): a clear error before
    any write when they are not complete."""
    if not distributed:
        return
    first = next(c for c in cfgs if reads_stored(c))
    outputs = find_outputs(first, store, device, stored_contents(cfgs))
    if outputs.missing_epochs(epochs):
        raise ConfigError(f"{first.run_name()}: train.teacher_outputs=stored under several processes needs the "
                          f"teacher's outputs computed first: run `hkdbench teacher-outputs` with the same settings "
                          "on one process")
