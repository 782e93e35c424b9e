"""The Barlow Twins recipe: self-supervised pre-training, then linear evaluation.

Pre-training optimizes the Barlow Twins loss with TVLARS (or a baseline) at the chosen global
batch; the linear stage then trains a linear classifier on the frozen backbone with SGD and a
cosine schedule (``linear_eval``). The paper: 1000 + 100 epochs, projector 4096-4096-4096.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .augment import Normalizer, barlow_twins_views
from .barlow_twins import BarlowTwins, barlow_twins_loss
from .config import check_count, check_number
from .distributed import model_input_dtype
from .linear_eval import LinearEvalConfig, linear_eval
from .models import backbone, build_model, default_model
from .runner import Run

__all__ = ["BT_EPOCHS", "LINEAR_EPOCHS", "BarlowTwinsTask", "run_barlow_twins"]

#: Pre-training / linear epochs per dataset: the paper's 1000 / 100 on CIFAR-10 and Tiny
#: ImageNet, short runs on the small offline datasets.
BT_EPOCHS = {
    "digits": 30,
    "mnist5k": 10,
    "fashion-mnist": 5,
    "cifar10": 1000,
    "tiny-imagenet": 1000,
}
LINEAR_EPOCHS = {
    "digits": 20,
    "mnist5k": 10,
    "fashion-mnist": 5,
    "cifar10": 100,
    "tiny-imagenet": 100,
}


@dataclass
class BarlowTwinsTask:
    normalizer: Normalizer
    lambd: float
    accelerator: Any

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, gen: torch.Generator
    ) -> Tensor:
        dtype = model_input_dtype(model)
        v1, v2 = (
            self.normalizer.standardize(v).to(dtype)
            for v in barlow_twins_views(self.normalizer.to_unit(images), gen)
        )
        with self.accelerator.autocast():
            z1, z2 = model(v1, v2)
        return barlow_twins_loss(z1.float(), z2.float(), self.lambd)


def _check_options(args: argparse.Namespace) -> None:
    """The Barlow Twins and linear-stage options, before anything runs (the linear stage comes
    after pre-training: a bad value would otherwise stop the run there)."""
    check_number("--bt-lambda", args.bt_lambda, low=0.0)
    if args.linear_epochs is not None:
        check_number("--linear-epochs", args.linear_epochs, low=0.0)  # 0 skips the stage
    check_count("--linear-batch-size", args.linear_batch_size, 1)
    check_number("--linear-lr", args.linear_lr, low=0.0)
    check_number("--linear-weight-decay", args.linear_weight_decay, low=0.0)


def run_barlow_twins(args: argparse.Namespace) -> dict[str, Any]:
    _check_options(args)
    run = Run(args, "barlow-twins", BT_EPOCHS, default_model(args.dataset))
    data, accelerator = run.data, run.accelerator
    projector = args.projector
    if projector == "auto":
        projector = "4096-4096-4096" if accelerator.device.type == "cuda" else "512-512-512"
    run.identity["--projector"] = projector
    net = build_model(run.model_name, data.num_classes, data.channels, args.stem, args.width)
    feature_dim = net.feature_dim
    model, optimizer = run.prepare(BarlowTwins(backbone(net), feature_dim, projector))
    task = BarlowTwinsTask(run.normalizer, args.bt_lambda, accelerator)
    summary = run.fit(model, optimizer, task, description="pretrain")

    if args.linear_epochs != 0:
        size = args.image_size or data.image_size
        cfg = LinearEvalConfig(
            epochs=args.linear_epochs
            if args.linear_epochs is not None
            else LINEAR_EPOCHS[args.dataset],
            global_batch=args.linear_batch_size,
            lr=args.linear_lr,
            weight_decay=args.linear_weight_decay,
            crop_pad=max(1, size // 8),
            flip=args.dataset not in ("digits", "mnist5k"),
            seed=args.seed,
            log_every=args.log_every,
            num_workers=args.num_workers,
        )
        summary.update(
            linear_eval(
                accelerator,
                accelerator.unwrap_model(model).backbone,
                feature_dim,
                data,
                run.normalizer,
                cfg,
                run.logger,
                input_dtype=model_input_dtype(model),
            )
        )
    del model, optimizer  # see Run.finish
    headline = (
        f"linear-eval test accuracy: {100 * summary['test_acc']:.2f}% on "
        f"{summary['test_samples']} {args.dataset} test images (backbone pre-trained "
        f"{summary['step']} steps, final Barlow Twins loss {summary.get('loss', float('nan')):.4f})"
        if "test_acc" in summary
        else f"pre-trained {summary['step']} steps; final loss {summary.get('loss', float('nan')):.4f}"
    )
    run.finish(summary, headline)
    return summary
