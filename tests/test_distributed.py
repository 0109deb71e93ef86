"""Data-parallel training on the CPU: 2 processes, gloo, tiny models, a couple of steps.

* a DDP run over 2 x 64 images per step (train.world=2) ends with the same student weights on both ranks, and they
  equal those of the same run in one process that trains both ranks in turn; train.world=2 and 4 on 2 processes
  equal 1 process, with augmentation, mixup and BatchNorm (engine/ranks.py);
* methods with state work under DDP: SPOFA's EMA baselines and CRD's memory banks are identical on every rank,
  PAT's feedback is per rank; the run store holds one run (rank 0's files) with world size 2 and global batch 128;
* CRD and SPOFA (values of every rank in the forward) and train.dist_bn=reduce give the same run on 2 gloo
  processes and on 1 process emulating 2 ranks, and 4 ranks on 2 processes as on 1;
* the loaders shard every global batch disjointly and keep the single-process order.
"""
import dataclasses
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hkdbench.benchmark.core.config import DataConfig
from hkdbench.benchmark.data.loaders import TensorLoader
from hkdbench.benchmark.data.datasets import dataset_info
from hkdbench.benchmark.recipes.resolve import resolve_run_config

pytestmark = pytest.mark.usefixtures("fmnist_available")

TINY = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=64", "data.eval_batch_size=32",
        "data.img_size=16", "data.hflip=0", "data.crop_padding=0", "train.epochs=1", "train.world=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, runs_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from hkdbench.benchmark.core.config import run_config_from_dict
    from hkdbench.benchmark.engine.distributed import DistContext
    from hkdbench.benchmark.engine.trainer import train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    captured = {}

    class Ctx(DistContext):
        def wrap(self, module, *args):
            captured["module"] = module
            return super().wrap(module, *args)

    ctx = Ctx(rank=rank, world_size=world, backend="gloo")
    result = train(run_config_from_dict(cfg_dict), runs_dir, resume=True, device="cpu", progress=False,
                   dist_ctx=ctx, echo=False)
    module = captured["module"]
    torch.save({"student": module.student.model.state_dict(), "module": module.state_dict(),
                "status": result.status, "top1": result.summary["last_top1"] if result.summary else None,
                "ddp_ignored": sorted(getattr(module, "_ddp_params_and_buffers_to_ignore", []))},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _spawn(cfg, tmp_path, world=2):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    mp.spawn(_worker, args=(world, _free_port(), cfg.to_dict(), str(runs), str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)], runs


def _teacher_checkpoint(tmp_path) -> str:
    from hkdbench.benchmark.models.zoo import create_model

    torch.manual_seed(0)
    teacher = create_model("resnet_mini", 10, in_chans=1, img_size=16)
    path = tmp_path / "teacher.pt"
    torch.save(teacher.model.state_dict(), path)
    return str(path)


def test_loader_shards_global_batches_disjointly():
    cfg = DataConfig(batch_size=4, eval_batch_size=3, img_size=28, crop_padding=0, hflip=0)
    info = dataset_info("fashion-mnist")
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 28, 28).contiguous()
    labels = torch.arange(20)
    single = TensorLoader(images, labels, cfg.__class__(**{**cfg.__dict__, "batch_size": 8}), info, True, "cpu", 1.0)
    shards = [TensorLoader(images, labels, cfg, info, True, "cpu", 1.0, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 2
    for step, (_, y) in enumerate(single.batches(seed=3, epoch=1)):
        parts = [list(sh.batches(seed=3, epoch=1, start_step=step))[0][1] for sh in shards]
        assert torch.equal(torch.cat(parts), y)  # rank 0 takes the first half of the global batch, rank 1 the rest
    evals = [TensorLoader(images, labels, cfg, info, False, "cpu", 1.0, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([y for ev in evals for _, y in ev.batches()])
    assert sorted(seen.tolist()) == list(range(20))  # rank-strided eval batches cover the test set once


def test_ddp_matches_the_ranks_emulated_in_one_process_and_ranks_agree(tmp_path):
    from hkdbench.benchmark.engine.trainer import train

    cfg = resolve_run_config(kind="student", student="vit_mini", method="none", recipe="demo", overrides=TINY)
    ranks, runs = _spawn(cfg, tmp_path)
    assert [r["status"] for r in ranks] == ["done", "done"]
    for k, v in ranks[0]["student"].items():
        assert torch.equal(v, ranks[1]["student"][k]), k  # identical weights on both ranks
    # the same run (train.world=2) in one process, which trains both ranks in turn: the same weights
    single = train(cfg, runs_dir=str(tmp_path / "single"), progress=False)
    reference = torch.load(single.run_dir.path / "final.pt", weights_only=True)
    for k, v in reference.items():
        assert torch.equal(ranks[0]["student"][k], v), k
    # one run in the store, written by rank 0: world size 2, global batch 128, evaluated on the whole test set
    (run,) = [p for p in runs.iterdir() if (p / "config.json").exists()]
    summary = json.loads((run / "summary.json").read_text())
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["global_batch"] == 128 and summary["global_batch"] == 128
    assert env["ranks_per_process"] == 1 and json.loads((single.run_dir.path / "env.json").read_text())[
        "ranks_per_process"] == 2
    assert ranks[0]["top1"] == ranks[1]["top1"] == single.summary["last_top1"]
    saved = torch.load(run / "final.pt", weights_only=True)
    assert all(torch.equal(saved[k], ranks[0]["student"][k]) for k in saved)
    # the logged training loss and accuracy are those of the whole global batch (both ranks), as in one process
    _assert_same_metrics(run, single.run_dir.path)


TIMING = {"epoch_time_s", "images_per_s", "train_time_s", "finished", "cohort_size", "device"}


def _assert_same_metrics(a, b):
    """Equal metrics lines and summaries. The logged means of the loss terms may differ in their last bits: a
    process adds its ranks' values per step before the steps, DDP's ranks their steps before the ranks (float64
    sums of the same float32 values, in another order), and the test-set loss is summed over other shards."""
    records = [[json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
               + [json.loads((p / "summary.json").read_text())] for p in (a, b)]
    for x, y in zip(*records, strict=True):
        assert x.keys() == y.keys()
        for key in set(x) - TIMING:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-12, abs=1e-12), key
            else:
                assert x[key] == y[key], key


AUGMENTED = ["data.train_subset=256", "data.eval_subset=128", "data.batch_size=32", "data.eval_batch_size=32",
             "data.img_size=16", "data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25", "train.epochs=2",
             "data.auto_augment=rand-m9-mstd0.5-inc1"]


def _layout_worker(rank: int, world: int, port: int, cfg_dict: dict, runs_dir: str, out_dir: str) -> None:
    _cohort_worker(rank, world, port, [cfg_dict], runs_dir, out_dir)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_run_is_the_same_on_every_spread_of_its_ranks(tmp_path, world):
    """KD into a BatchNorm student under RandAugment, mixup/cutmix and erasing: train.world=2 on 2 gloo processes
    and on 1 process; train.world=4 on 2 processes of 2 ranks each and on 1 process of 4: the same weights, bit
    for bit (each rank's gradient is the same; they are summed as a balanced tree in rank order, then scaled by
    1 / world, a power of two), and the same metrics (see _assert_same_metrics for their last bits)."""
    from hkdbench.benchmark.engine.trainer import train

    cfg = resolve_run_config(kind="student", student="resnet_mini", teacher="resnet_mini", method="kd",
                             recipe="demo", teacher_checkpoint=_teacher_checkpoint(tmp_path),
                             overrides=AUGMENTED + [f"train.world={world}"])
    out, spread = tmp_path / "out", tmp_path / "spread"
    out.mkdir()
    mp.spawn(_layout_worker, args=(2, _free_port(), cfg.to_dict(), str(spread), str(out)), nprocs=2, join=True)
    assert [torch.load(out / f"rank{r}.pt") for r in range(2)] == [["done"]] * 2
    one = train(cfg, runs_dir=str(tmp_path / "one"), progress=False)
    a, b = spread / cfg.run_name(), one.run_dir.path
    _assert_same_metrics(a, b)
    for name in ("final.pt", "best.pt"):
        wa, wb = torch.load(a / name), torch.load(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def _exchanging_cfg(tmp_path, method: str, world: int):
    """CRD (Z from every rank's first batch, the banks updated with every rank's) or SPOFA (its statistics averaged
    over the ranks at every step) into a BatchNorm student under RandAugment, mixup/cutmix, erasing and drop path."""
    extra = ["method.nce_k=64"] if method == "crd" else []
    return resolve_run_config(kind="student", student="resnet_mini", teacher="resnet_mini", method=method,
                              recipe="demo", teacher_checkpoint=_teacher_checkpoint(tmp_path),
                              overrides=AUGMENTED + extra + [f"train.world={world}", "train.drop_path=0.1"])


def _assert_same_run(a, b):
    """Equal metrics (see _assert_same_metrics) and equal kept weights (the EMA's too), bit for bit."""
    _assert_same_metrics(a, b)
    kept = sorted(p.name for p in a.glob("*.pt") if p.name != "checkpoint.pt")
    assert kept == sorted(p.name for p in b.glob("*.pt") if p.name != "checkpoint.pt") and "final.pt" in kept
    for name in kept:
        wa, wb = torch.load(a / name), torch.load(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize("method", ["crd", "spofa"])
def test_values_of_every_rank_are_the_same_on_emulated_ranks(tmp_path, method):
    """train.world=2 on 2 gloo processes (DDP, the methods' own all-reduce and all-gather) and on 1 process that
    trains both ranks in turn (engine/exchange.py): the same weights bit for bit, the same banks, Z and EMA
    baselines, the same metrics. Z and SPOFA's statistic are means of two float32 values, (a + b) / 2 on both."""
    from hkdbench.benchmark.engine.trainer import train

    cfg = _exchanging_cfg(tmp_path, method, 2)
    ranks, runs = _spawn(cfg, tmp_path)
    assert [r["status"] for r in ranks] == ["done", "done"]
    kept = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_checkpoint=True))  # not in the hash
    one = train(kept, runs_dir=str(tmp_path / "one"), progress=False)
    _assert_same_run(runs / cfg.run_name(), one.run_dir.path)
    emulated = torch.load(one.run_dir.checkpoint_file, weights_only=False)["module"]
    shared = [k for k in ranks[0]["module"] if k.startswith("method.") and (".memory." in k or k.endswith(".mu"))]
    assert shared, "the method keeps state every rank holds"
    for k in shared:
        assert torch.equal(ranks[0]["module"][k], emulated[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["crd", "spofa"])
def test_values_of_every_rank_are_the_same_on_four_emulated_ranks(tmp_path, method):
    """train.world=4 on 2 processes of 2 ranks each and on 1 process of 4: the same run bit for bit (the means
    are ((a + b) + (c + d)) / 4 on both; the banks' update gathers the same rows in the same order)."""
    from hkdbench.benchmark.engine.trainer import train

    cfg = _exchanging_cfg(tmp_path, method, 4)
    out, spread = tmp_path / "out", tmp_path / "spread"
    out.mkdir()
    mp.spawn(_layout_worker, args=(2, _free_port(), cfg.to_dict(), str(spread), str(out)), nprocs=2, join=True)
    assert [torch.load(out / f"rank{r}.pt") for r in range(2)] == [["done"]] * 2
    one = train(cfg, runs_dir=str(tmp_path / "one"), progress=False)
    _assert_same_run(spread / cfg.run_name(), one.run_dir.path)


def _dist_bn_cfg(tmp_path, world: int, dist_bn: str = "reduce"):
    """KD into a BatchNorm student with an EMA (decay 0.9: it moves within a few steps), 2 epochs."""
    return resolve_run_config(kind="student", student="resnet_mini", teacher="resnet_mini", method="kd",
                              recipe="demo", teacher_checkpoint=_teacher_checkpoint(tmp_path),
                              overrides=AUGMENTED + [f"train.world={world}", f"train.dist_bn={dist_bn}",
                                                     "train.ema_decay=0.9"])


def _spread_and_one(cfg, tmp_path):
    """The run on 2 gloo processes and in 1 process: their run directories."""
    from hkdbench.benchmark.engine.trainer import train

    out, spread = tmp_path / "out", tmp_path / "spread"
    out.mkdir()
    mp.spawn(_layout_worker, args=(2, _free_port(), cfg.to_dict(), str(spread), str(out)), nprocs=2, join=True)
    assert [torch.load(out / f"rank{r}.pt") for r in range(2)] == [["done"]] * 2
    return spread / cfg.run_name(), train(cfg, runs_dir=str(tmp_path / "one"), progress=False).run_dir.path


def test_dist_bn_reduce_is_the_same_on_emulated_ranks(tmp_path):
    """timm's --dist-bn reduce, train.world=2: on 2 gloo processes (an all-reduce of each rank's BatchNorm
    statistics after every epoch, of each rank's EMA's before its evaluation) and on 1 process (each rank's
    statistics after its last micro-batch, each rank's EMA of its own): the same weights, EMA's included, bit for
    bit ((a + b) / 2.0 on both), and the same metrics. Against 'broadcast' (rank 0's): other running statistics,
    the same parameters (training reads the batch's statistics, not the running ones)."""
    from hkdbench.benchmark.engine.trainer import train

    cfg = _dist_bn_cfg(tmp_path, 2)
    spread, one = _spread_and_one(cfg, tmp_path)
    _assert_same_run(spread, one)
    broadcast = train(_dist_bn_cfg(tmp_path, 2, "broadcast"), runs_dir=str(tmp_path / "b"), progress=False)
    for name in ("final.pt", "final_ema.pt"):
        reduced, rank0 = torch.load(one / name), torch.load(broadcast.run_dir.path / name)
        stats = [k for k in reduced if "running_" in k]
        assert stats and all(not torch.equal(reduced[k], rank0[k]) for k in stats), name
        if name == "final.pt":
            assert all(torch.equal(reduced[k], rank0[k]) for k in reduced if "running_" not in k
                       and "num_batches" not in k)


@pytest.mark.slow
def test_dist_bn_reduce_is_the_same_on_four_emulated_ranks(tmp_path):
    """train.world=4 with dist_bn=reduce on 2 processes of 2 ranks and on 1 of 4: the same run bit for bit (the
    statistics summed ((a + b) + (c + d)) on both)."""
    _assert_same_run(*_spread_and_one(_dist_bn_cfg(tmp_path, 4), tmp_path))


@pytest.mark.parametrize("method", ["spofa", "pat", "crd"])
def test_stateful_methods_under_ddp(tmp_path, method):
    extra = ["method.nce_k=64"] if method == "crd" else []
    cfg = resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=method,
                             recipe="demo", teacher_checkpoint=_teacher_checkpoint(tmp_path), overrides=TINY + extra)
    ranks, _ = _spawn(cfg, tmp_path)
    assert [r["status"] for r in ranks] == ["done", "done"]
    for k, v in ranks[0]["student"].items():
        assert torch.equal(v, ranks[1]["student"][k]), k
    m0, m1 = ranks[0]["module"], ranks[1]["module"]
    if method == "spofa":
        ema = [k for k in m0 if k.endswith(".mu")]
        assert ema, "SPOFA has EMA baselines"
        for k in ema:  # the batch statistic is averaged over ranks: the same baseline everywhere
            assert torch.equal(m0[k], m1[k]), k
    elif method == "crd":  # every rank applies every rank's batch: identical banks, all 256 rows updated
        # ... by itself: DDP does not broadcast rank 0's banks at every forward
        assert ranks[0]["ddp_ignored"] == [f"method.memory.{b}" for b in ("memory_student", "memory_teacher",
                                                                          "z_student", "z_teacher")]
        for k in ("method.memory.memory_student", "method.memory.memory_teacher", "method.memory.z_student"):
            assert torch.equal(m0[k], m1[k]), k
        norms = m0["method.memory.memory_student"].norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # updated rows are unit vectors
    else:
        feedback = [k for k in m0 if k.endswith(".feedback") and m0[k].numel()]
        assert feedback, "PAT stores feedback"
        assert any(not torch.equal(m0[k], m1[k]) for k in feedback)  # each rank keeps its own


def _cohort_worker(rank: int, world: int, port: int, cfg_dicts: list, runs_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from hkdbench.benchmark.core.config import run_config_from_dict
    from hkdbench.benchmark.engine.distributed import DistContext
    from hkdbench.benchmark.engine.trainer import CohortTrainer
    from hkdbench.benchmark.core.store import RunStore

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, backend="gloo")
    results = CohortTrainer([run_config_from_dict(d) for d in cfg_dicts], RunStore(runs_dir), device="cpu",
                            progress=False, dist_ctx=ctx, echo=False).run(resume=True)
    torch.save([r.status for r in results], os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_a_cohort_under_ddp_equals_its_runs_under_ddp_alone(tmp_path):
    """Two ranks train a cohort (none, kd): every member's run directory (rank 0's) holds the weights the same run
    has when trained alone on two ranks."""
    checkpoint = _teacher_checkpoint(tmp_path)
    cfgs = [resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=m, recipe="demo",
                               teacher_checkpoint=checkpoint, overrides=TINY) for m in ("none", "kd")]
    out = tmp_path / "out"
    out.mkdir()
    cohort_runs = tmp_path / "cohort"
    mp.spawn(_cohort_worker, args=(2, _free_port(), [c.to_dict() for c in cfgs], str(cohort_runs), str(out)),
             nprocs=2, join=True)
    assert [torch.load(out / f"rank{r}.pt") for r in range(2)] == [["done", "done"]] * 2
    for i, cfg in enumerate(cfgs):
        (tmp_path / f"alone{i}").mkdir()
        alone, alone_runs = _spawn(cfg, tmp_path / f"alone{i}")
        assert [r["status"] for r in alone] == ["done", "done"]
        mine = torch.load(cohort_runs / cfg.run_name() / "final.pt", weights_only=True)
        theirs = torch.load(alone_runs / cfg.run_name() / "final.pt", weights_only=True)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), cfg.method


def _diverging_cohort_worker(rank: int, world: int, port: int, cfg_dicts: list, runs_dir: str, out_dir: str) -> None:
    """The cohort worker, where KD's loss becomes NaN at its second step on rank 1 alone (rank 0's shard stays
    finite at that step). A short gloo timeout: a rank left waiting in a collective fails the test, not hangs it."""
    import datetime

    import torch.distributed as dist

    from hkdbench.methods.kd import KD

    if rank == 1:
        real, calls = KD.losses, iter(range(10 ** 6))

        def nan_at_the_second_step(self, *args, **kwargs):
            losses = real(self, *args, **kwargs)
            if next(calls) == 1:
                losses["kd"] = losses["kd"] * float("nan")
            return losses

        KD.losses = nan_at_the_second_step
    real_init = dist.init_process_group
    dist.init_process_group = lambda *a, **k: real_init(*a, timeout=datetime.timedelta(seconds=60), **k)
    _cohort_worker(rank, world, port, cfg_dicts, runs_dir, out_dir)


def test_a_divergence_on_one_rank_fails_the_run_on_every_rank_at_that_step(tmp_path):
    """A cohort (none, kd) on two ranks, KD's loss NaN on rank 1 alone at its step 1: both ranks mark kd FAILED at
    that step (its record holds rank 1's terms) and train 'none' to the end: the job ends, and no rank waits in a
    collective of kd while the other runs none's."""
    from hkdbench.benchmark.core.store import RunDir

    checkpoint = _teacher_checkpoint(tmp_path)
    cfgs = [resolve_run_config(kind="student", student="vit_mini", teacher="resnet_mini", method=m, recipe="demo",
                               teacher_checkpoint=checkpoint, overrides=TINY + ["train.epochs=2"])
            for m in ("none", "kd")]
    out, runs = tmp_path / "out", tmp_path / "runs"
    out.mkdir()
    mp.spawn(_diverging_cohort_worker, args=(2, _free_port(), [c.to_dict() for c in cfgs], str(runs), str(out)),
             nprocs=2, join=True)
    assert [torch.load(out / f"rank{r}.pt") for r in range(2)] == [["done", "failed"]] * 2
    failure = RunDir(runs / cfgs[1].run_name()).failure()
    assert (failure["epoch"], failure["step"]) == (1, 1)  # 2 steps per epoch: the second step of epoch 1
    assert "non-finite loss at epoch 1, step 1 on rank 1 of 2" in failure["reason"]
    assert math.isnan(failure["losses"]["kd"]) and math.isfinite(failure["losses"]["ce"])
    assert [m["epoch"] for m in RunDir(runs / cfgs[0].run_name()).metrics()] == [1, 2]
