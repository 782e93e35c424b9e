"""Linear evaluation: a linear classifier on a frozen backbone, SGD + cosine schedule.

As in the paper's Barlow Twins protocol (and the authors' code: 100 epochs, batch 256,
classifier LR 0.3, momentum 0.9, cosine annealing, backbone frozen). The backbone stays in
eval mode (BatchNorm uses its running statistics) and runs without gradients, so it may be any
engine's module (DDP, FSDP2 units, a DeepSpeed engine's module); only the head is trained,
data-parallel via ``DistributedDataParallel``. Augmentation: random crop + flip.

Besides the final evaluation (a ``"linear_eval"`` record), the head is evaluated on the test
split at the end of every ``ceil(epochs / epoch_evals)``-th epoch (``"linear_epoch"`` records):
about ``epoch_evals`` points of an accuracy curve, each a forward pass over the test set (a
fraction of one training epoch's cost; the backbone runs forward-only either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import warmup_cosine
from .augment import Normalizer, augment_generator, random_crop_flip
from .batching import plan_global_batch
from .config import ConfigError
from .data import ImageData
from .metrics import RunLogger
from .training import MicroBatches, batch_loader, evaluate_splits

__all__ = ["LinearEvalConfig", "LinearProbe", "linear_eval"]


@dataclass(frozen=True)
class LinearEvalConfig:
    epochs: float = 100
    global_batch: int = 256
    lr: float = 0.3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    crop_pad: int = 4
    flip: bool = True
    seed: int = 0
    log_every: int = 10
    num_workers: int = 0
    #: test-set evaluations during the stage (at most one per epoch; 0: only the final one)
    epoch_evals: int = 20


class LinearProbe(nn.Module):
    """``head(backbone(x))`` with the backbone frozen and always in eval mode."""

    def __init__(self, backbone: nn.Module, head: nn.Module, input_dtype: torch.dtype) -> None:
        super().__init__()
        self.backbone, self.head, self.input_dtype = backbone, head, input_dtype
        for p in backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            features = self.backbone(x.to(self.input_dtype)).float()
        return self.head(features)


def linear_eval(
    accelerator,
    backbone: nn.Module,
    feature_dim: int,
    data: ImageData,
    normalizer: Normalizer,
    cfg: LinearEvalConfig,
    logger: RunLogger,
    input_dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Train a linear head on the frozen ``backbone`` (on ``data.train``); returns the final
    test metrics, and validation metrics when ``data.val`` exists."""
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    plan = plan_global_batch(cfg.global_batch, world, grad_accum=1)
    steps_per_epoch = len(data.train) // plan.global_batch
    if steps_per_epoch < 1:
        raise ConfigError(
            f"--linear-batch-size={cfg.global_batch} exceeds the {len(data.train)} training images"
        )
    total = max(1, round(cfg.epochs * steps_per_epoch))

    torch.manual_seed(cfg.seed)
    # BatchNorm without affine in front of the classifier (as MAE's linear probe): features of
    # a frozen backbone can have any scale, which a fixed-LR SGD probe cannot absorb. In eval
    # mode it is a fixed affine map, so the classifier stays linear in the features.
    head = nn.Sequential(
        nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, data.num_classes)
    )
    head = head.to(device)
    probe = LinearProbe(backbone, head, input_dtype)
    trained = head
    if world > 1 and dist.is_initialized():
        trained = nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(0, total))

    # The steps that end every ``stride``-th whole epoch, but the last (the final evaluation).
    eval_steps: set[int] = set()
    if cfg.epoch_evals > 0:
        stride = math.ceil(cfg.epochs / cfg.epoch_evals)
        epochs = range(stride, int(cfg.epochs) + 1, stride)
        eval_steps = {e * steps_per_epoch for e in epochs} - {total}

    micro = MicroBatches(data.train, plan, rank, cfg.seed + 1, steps_per_epoch)
    probe.train()
    for step, (images, labels) in enumerate(
        batch_loader(micro, [(s, 0) for s in range(total)], cfg.num_workers)
    ):
        images, labels = images.to(device), labels.to(device)
        gen = augment_generator(device, cfg.seed + 1, step, 0, rank)
        x = normalizer.standardize(
            random_crop_flip(normalizer.to_unit(images), cfg.crop_pad, cfg.flip, gen)
        )
        with torch.no_grad(), accelerator.autocast():
            features = backbone(x.to(input_dtype)).float()
        loss = F.cross_entropy(trained(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()
            logger.log(
                "linear",
                step + 1,
                loss=mean,
                lr=schedule.get_last_lr()[0],
                epoch=(step + 1) / steps_per_epoch,
            )
        if step + 1 in eval_steps:
            epoch_metrics = evaluate_splits(
                probe, data, normalizer, accelerator, plan.per_device, cfg.num_workers
            )
            logger.log(
                "linear_epoch", step + 1, epoch=(step + 1) / steps_per_epoch, **epoch_metrics
            )
    metrics = evaluate_splits(
        probe, data, normalizer, accelerator, plan.per_device, cfg.num_workers
    )
    logger.log("linear_eval", total, epoch=total / steps_per_epoch, **metrics)
    return metrics
