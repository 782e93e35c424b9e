"""Batched, seeded augmentations that run on the training device.

Each micro-batch gets its own ``torch.Generator`` seeded from (seed, step, micro-batch, rank),
so augmentation does not depend on how many batches came before: a resumed run draws exactly
what the uninterrupted run would have. The ops are whole-batch tensor ops (GPU-friendly):

- classification: random crop with zero padding (as the paper's RandomCrop(pad=4) on 32x32)
  and optional horizontal flip;
- Barlow Twins: random resized crop + flip (one ``affine_grid``/``grid_sample``), brightness /
  contrast / saturation jitter (p=0.8) and grayscale (p=0.2). Gaussian blur and solarization of
  the original recipe are left out (they matter little at these resolutions).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Normalizer", "augment_generator", "barlow_twins_views", "random_crop_flip"]


def augment_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded from ``key`` (e.g. seed, step, micro-batch, rank)."""
    seed = int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


class Normalizer:
    """uint8 batch -> float, resized to ``size`` when given, standardized per channel."""

    def __init__(self, mean, std, size: int | None, device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.size = size

    def to_unit(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x

    def standardize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def __call__(self, images: Tensor) -> Tensor:
        return self.standardize(self.to_unit(images))


def random_crop_flip(x: Tensor, pad: int, flip: bool, gen: torch.Generator) -> Tensor:
    """Per-sample random crop of a zero-padded batch, then an optional horizontal flip."""
    n, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (n, h, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (n, 1, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirrored = torch.rand(n, generator=gen, device=gen.device) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


def _random_resized_crop(
    x: Tensor, gen: torch.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)
) -> Tensor:
    n = x.shape[0]
    area = _uniform(n, *scale, gen)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen).exp()
    width = (area * log_ratio).sqrt().clamp(max=1.0)
    height = (area / log_ratio).sqrt().clamp(max=1.0)
    cx = (1 - width) * (2 * torch.rand(n, generator=gen, device=gen.device) - 1)
    cy = (1 - height) * (2 * torch.rand(n, generator=gen, device=gen.device) - 1)
    flip = torch.where(torch.rand(n, generator=gen, device=gen.device) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _color_jitter(x: Tensor, gen: torch.Generator, strength: float = 0.4) -> Tensor:
    n = x.shape[0]
    apply = (torch.rand(n, generator=gen, device=gen.device) < 0.8).view(n, 1, 1, 1)
    brightness = _uniform(n, 1 - strength, 1 + strength, gen).view(n, 1, 1, 1)
    contrast = _uniform(n, 1 - strength, 1 + strength, gen).view(n, 1, 1, 1)
    saturation = _uniform(n, 1 - strength, 1 + strength, gen).view(n, 1, 1, 1)
    y = (x * brightness).clamp(0, 1)
    mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean).clamp(0, 1)
    if x.shape[1] == 3:
        gray = _gray(y)
        y = ((y - gray) * saturation + gray).clamp(0, 1)
        to_gray = (torch.rand(n, generator=gen, device=gen.device) < 0.2).view(n, 1, 1, 1)
        y = torch.where(to_gray, _gray(y).expand_as(y), y)
    return torch.where(apply, y, x)


def barlow_twins_views(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two independently augmented views of a float batch in [0, 1]."""
    return tuple(_color_jitter(_random_resized_crop(x, gen), gen) for _ in range(2))  # type: ignore[return-value]
