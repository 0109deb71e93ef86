"""train.world in one process: each rank's own augmentation draws, the ranks emulated in turn, what is refused.

The runs on several gloo processes, compared with these, are in tests/test_distributed.py."""
import pytest
import torch

from hkdbench.benchmark.core.config import ConfigError, DataConfig
from hkdbench.benchmark.data import loaders
from hkdbench.benchmark.data.datasets import dataset_info
from hkdbench.benchmark.data.stream import DataStream, step_seed
from hkdbench.benchmark.engine.exchange import EmulatedExchange
from hkdbench.benchmark.engine.pairwise import PairwiseSum
from hkdbench.benchmark.engine.ranks import RankLayout, check_layout, rank_seed
from hkdbench.benchmark.engine.trainer import train, train_cohort
from hkdbench.benchmark.recipes.resolve import resolve_run_config

# randomness everywhere: crops, flips, RandAugment, mixup/cutmix, erasing in the stream, drop-path in the student
TINY = ["data.train_subset=128", "data.eval_subset=64", "data.batch_size=16", "data.eval_batch_size=32",
        "data.img_size=16", "data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25",
        "data.auto_augment=rand-m9-mstd0.5-inc1", "train.drop_path=0.1"]
TIMING = {"epoch_time_s", "images_per_s", "train_time_s", "finished", "cohort_size"}


def cfg_of(method="none", world=2, student="resnet_mini", extra=(), teacher=None, checkpoint=None):
    return resolve_run_config(kind="student", student=student, teacher=teacher, method=method, recipe="demo",
                              teacher_checkpoint=checkpoint,
                              overrides=TINY + [f"train.world={world}", "train.epochs=2", *extra])


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING}


# -- every rank's augmentation is its own ---------------------------------------------------------------------------

def _one_image_loaders(world: int, cfg: DataConfig):
    """The loaders of ``world`` ranks over 64 copies of one image: every rank's slice holds the same pixels, so
    only the draws can tell them apart."""
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    images, labels = image.expand(64, 1, 28, 28).contiguous(), torch.arange(64) % 10
    info = dataset_info("fashion-mnist")
    return [loaders.TensorLoader(images, labels, cfg, info, True, "cpu", 1.0, rank=r, world_size=world)
            for r in range(world)], info


@pytest.mark.parametrize("pipeline,size", [("small", 28), ("paper224", 32)])
def test_two_ranks_slices_of_one_step_get_their_own_draws(pipeline, size):
    """Crop boxes, flips, RandAugment ops, erasing and the mixup lambda differ between rank 0's and rank 1's slice
    of one step, as timm's per-rank seeding gives them; each is a function of (seed, epoch, step, rank) alone."""
    cfg = DataConfig(pipeline=pipeline, img_size=size, batch_size=8, auto_augment="rand-m9-mstd0.5-inc1",
                     mixup=0.8, reprob=0.25)
    rank_loaders, info = _one_image_loaders(2, cfg)
    mixup = loaders.build_mixup(cfg, info.num_classes, 0.0)
    stream = DataStream(rank_loaders, seed=1, device=torch.device("cpu"), mixup=mixup, ranks=[0, 1])
    for _, (rank0, rank1) in stream.batches(epoch=0):
        assert not torch.equal(rank0.images, rank1.images)
        lam0 = rank0.targets.soft.max(-1).values.min()  # max(lambda, 1 - lambda): a row of two classes
        lam1 = rank1.targets.soft.max(-1).values.min()
        assert lam0 != lam1
    # rank 1 of world 2 draws the same when it is alone in its process (real DDP) as beside rank 0 (emulated)
    alone = DataStream(rank_loaders[1:], seed=1, device=torch.device("cpu"), mixup=mixup, ranks=[1])
    together = DataStream(rank_loaders, seed=1, device=torch.device("cpu"), mixup=mixup, ranks=[0, 1])
    for (_, (a,)), (_, (_, b)) in zip(alone.batches(epoch=0, start_step=1), together.batches(epoch=0, start_step=1)):
        assert torch.equal(a.images, b.images) and torch.equal(a.targets.soft, b.targets.soft)


def test_rank_zero_keeps_the_one_rank_keys():
    """Rank 0's data key and model seed are those of a one-rank run (the goldens hold the numbers); the others'
    differ from it and from each other."""
    assert step_seed(7, 3, 11) == step_seed(7, 3, 11, rank=0) == ((7 * 1_000_003 + 3) * 10_000_019 + 11) % 2 ** 63
    assert len({step_seed(7, 3, 11, rank=r) for r in range(8)}) == 8
    assert rank_seed(700_024, 0) == 700_024 and len({rank_seed(700_024, r) for r in range(8)}) == 8


# -- the ranks' gradients --------------------------------------------------------------------------------------------

def test_pairwise_sum_is_a_balanced_tree_in_rank_order():
    """1 process x 4 ranks sums ((g0 + g1) + (g2 + g3)), what 2 processes x 2 ranks and their all-reduce give;
    a parameter without a gradient on a rank counts as absent, and stays None where no rank has one."""
    torch.manual_seed(0)
    g = [torch.randn(1000) * 10 ** (3 * i) for i in range(4)]  # magnitudes far apart: any other order rounds apart
    tree = PairwiseSum()
    for i in range(4):
        tree.add([g[i].clone(), None, g[i].clone() if i == 2 else None])
    total, none, one = tree.total()
    assert torch.equal(total, (g[0] + g[1]) + (g[2] + g[3]))
    assert not torch.equal(total, ((g[0] + g[1]) + g[2]) + g[3])  # the sequential sum would differ
    assert none is None and torch.equal(one, g[2])


def test_the_emulated_exchange_gives_ddps_mean_and_one_change_with_every_rank():
    """Four ranks in one process: the collecting pass records each rank's value and changes nothing; each rank's
    real pass takes ((a + b) + (c + d)) / 4, what 2 processes x 2 ranks and their all-reduce give (here 0, where
    the sum in rank order would give 1 / 4); the shared state changes once, with every rank's values in rank order;
    a mean the step did not collect is an error, not another run."""
    exchange = EmulatedExchange(RankLayout(4))
    exchange.begin_step()
    values = [torch.tensor(v) for v in (1e8, 1.0, -1e8, 1.0)]  # float32: the order of the sum shows
    for v in values:
        with exchange.collecting():
            assert exchange.mean(v) is v
            exchange.update_shared(lambda *_: pytest.fail("a collecting pass changes nothing"), v[None])
    exchange.settle_means()
    changes = []
    for v in values:
        exchange.next_rank()
        assert exchange.mean(v).item() == 0.0
        exchange.update_shared(changes.append, v[None])
    exchange.finish_step()
    assert len(changes) == 1 and torch.equal(changes[0], torch.stack(values))
    exchange.begin_step()
    exchange.next_rank()
    with pytest.raises(RuntimeError, match="did not announce"):
        exchange.mean(values[0])


# -- what is refused ---------------------------------------------------------------------------------------------------

def test_the_config_validates_world_sync_bn_and_dist_bn():
    for bad, match in ((["train.world=0"], "train.world must be in"),
                       (["train.sync_bn=true"], "needs train.world > 1"),
                       (["train.dist_bn=reduce"], "train.dist_bn=reduce needs train.world > 1"),
                       (["train.world=2", "train.dist_bn="], "must be 'broadcast' .* or 'reduce'")):
        with pytest.raises(ConfigError, match=match):
            cfg_of(world=1, extra=bad)


@pytest.mark.parametrize("world,processes,extra,method,match", [
    (3, 2, [], "none", "cannot be spread over 2 processes"),
    (4, 2, ["train.sync_bn=true"], "none", "train.sync_bn=true needs every rank's BatchNorm statistics"),
    (2, 2, ["train.sync_bn=true"], "none", "runs on CUDA GPUs only"),
])
def test_what_cannot_run_as_the_reference_did_is_refused(world, processes, extra, method, match):
    teacher = None if method == "none" else "resnet_mini"
    cfg = cfg_of(method, world=world, extra=extra, teacher=teacher, student="vit_mini")
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg, processes, torch.device("cpu"))
    check_layout(cfg_of(method, world=world, teacher=teacher, student="vit_mini"), world, "cpu")  # one per rank


def test_an_emulated_run_is_refused_before_anything_is_written(fmnist_available, tmp_path):
    cfg = cfg_of("kd", world=2, teacher="resnet_mini", extra=["train.sync_bn=true"],
                 checkpoint=_teacher_checkpoint(tmp_path))
    with pytest.raises(ConfigError, match="run 2 processes"):
        train(cfg, runs_dir=str(tmp_path / "runs"), progress=False)
    assert not (tmp_path / "runs" / cfg.run_name()).exists()


def test_the_layout_lists_each_process_s_ranks():
    assert RankLayout(8, 1, 2).ranks == [4, 5, 6, 7] and RankLayout(8, 1, 2).emulated
    assert RankLayout(2, 1, 2).ranks == [1] and not RankLayout(2, 1, 2).emulated


# -- emulated runs ---------------------------------------------------------------------------------------------------

def _teacher_checkpoint(tmp_path) -> str:
    from hkdbench.benchmark.models.zoo import create_model

    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save(create_model("resnet_mini", 10, in_chans=1, img_size=16).model.state_dict(), path)
    return str(path)


def test_world_is_what_the_run_computes(fmnist_available, tmp_path):
    """The same recipe on 1 and 2 ranks: two runs (hashes), other weights; the summary states the global batch."""
    one = train(cfg_of(world=1), runs_dir=str(tmp_path), progress=False)
    two = train(cfg_of(world=2), runs_dir=str(tmp_path), progress=False)
    assert one.run_dir.path.name != two.run_dir.path.name
    assert (one.summary["global_batch"], two.summary["global_batch"]) == (16, 32)
    assert (one.summary["world"], two.summary["world"]) == (1, 2)
    a, b = (torch.load(r.run_dir.path / "final.pt") for r in (one, two))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _stop_after(calls: int):
    count = iter(range(10 ** 6))
    return lambda: next(count) >= calls


@pytest.mark.parametrize("method,student,extra", [("kd", "resnet_mini", []), ("pat", "vit_mini", []),
                                                   ("crd", "resnet_mini", ["method.nce_k=64"]),
                                                   ("spofa", "resnet_mini", []),
                                                   ("kd", "resnet_mini", ["train.dist_bn=reduce",
                                                                          "train.ema_decay=0.9"])])
def test_an_emulated_run_stopped_mid_epoch_resumes_bit_for_bit(fmnist_available, tmp_path, method, student, extra):
    """Two ranks emulated in one process, stopped at step 2 of epoch 1 and resumed: every rank's generators (drop
    path), BatchNorm's statistics, PAT's per-rank feedback, CRD's banks and Z (a resumed CRD asks every rank for Z
    again, and keeps the saved one), SPOFA's baselines come back, and the run equals an uninterrupted one."""
    cfg = cfg_of(method, world=2, student=student, teacher="resnet_mini", checkpoint=_teacher_checkpoint(tmp_path),
                 extra=extra)
    straight = train(cfg, runs_dir=str(tmp_path / "a"), progress=False)
    stopped = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, should_stop=_stop_after(6))
    assert stopped.status == "interrupted"
    resumed = train(cfg, runs_dir=str(tmp_path / "b"), progress=False, resume=True)
    a, b = straight.run_dir, resumed.run_dir
    assert [without_timing(r) for r in a.metrics()] == [without_timing(r) for r in b.metrics()]
    for name in ("final.pt", "final_ema.pt") if cfg.train.ema_decay else ("final.pt",):
        wa, wb = torch.load(a.path / name), torch.load(b.path / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_a_cohort_on_emulated_ranks_equals_its_members_alone(fmnist_available, tmp_path):
    """none, kd and spofa on 2 emulated ranks as one cohort (one stream, every draw shared, one teacher pass per
    rank's batch, which SPOFA's collecting pass takes too) write what each writes alone."""
    checkpoint = _teacher_checkpoint(tmp_path)
    cfgs = [cfg_of(m, world=2, student="vit_mini", teacher="resnet_mini", checkpoint=checkpoint)
            for m in ("none", "kd", "spofa")]
    together = train_cohort(cfgs, str(tmp_path / "cohort"), progress=False)
    for cfg, member in zip(cfgs, together):
        alone = train(cfg, runs_dir=str(tmp_path / f"alone_{cfg.method}"), progress=False)
        assert [without_timing(r) for r in member.run_dir.metrics()] == [
            without_timing(r) for r in alone.run_dir.metrics()]
        wa, wb = torch.load(member.run_dir.path / "final.pt"), torch.load(alone.run_dir.path / "final.pt")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), cfg.method
