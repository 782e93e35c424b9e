"""The classification recipe: a ResNet (or the small CNN) trained from scratch.

The paper's settings: ResNet-18 on CIFAR-10 and ResNet-34 on Tiny ImageNet, ImageNet stem,
100 epochs, random crop (padding 4 on 32x32) + horizontal flip. Digits and MNIST are not
flipped (a mirrored digit is another symbol).
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Normalizer, random_crop_flip
from .config import DEFAULT_EPOCHS
from .distributed import model_input_dtype
from .models import build_model, default_model
from .runner import Run
from .training import evaluate_splits

__all__ = ["ClassificationTask", "run_classification"]

_NO_FLIP = ("digits", "mnist5k")


@dataclass
class ClassificationTask:
    normalizer: Normalizer
    crop_pad: int
    flip: bool
    accelerator: Any

    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, gen: torch.Generator
    ) -> Tensor:
        x = random_crop_flip(self.normalizer.to_unit(images), self.crop_pad, self.flip, gen)
        x = self.normalizer.standardize(x).to(model_input_dtype(model))
        with self.accelerator.autocast():
            logits = model(x)
        return F.cross_entropy(logits.float(), labels)


def run_classification(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args, "classification", DEFAULT_EPOCHS, default_model(args.dataset))
    data = run.data
    model = build_model(run.model_name, data.num_classes, data.channels, args.stem, args.width)
    model, optimizer = run.prepare(model)
    size = args.image_size or data.image_size
    task = ClassificationTask(
        run.normalizer,
        crop_pad=max(1, size // 8),  # 4 on 32x32, as the paper's RandomCrop(32, padding=4)
        flip=args.dataset not in _NO_FLIP,
        accelerator=run.accelerator,
    )

    evaluate_fn = functools.partial(
        evaluate_splits,
        model,
        data,
        run.normalizer,
        run.accelerator,
        run.plan.per_device,
        args.num_workers,
    )

    summary = run.fit(model, optimizer, task, evaluate_fn)
    del model, optimizer, evaluate_fn  # see Run.finish
    headline = (
        f"test accuracy: {100 * summary['test_acc']:.2f}% on {summary['test_samples']} "
        f"{args.dataset} test images after {summary['step']} steps"
        if "test_acc" in summary
        else f"stopped at step {summary['step']} (already complete)"
    )
    run.finish(summary, headline)
    return summary
