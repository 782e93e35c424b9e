"""Barlow Twins (Zbontar et al. 2021): projector, model and the cross-rank loss.

The loss standardizes each embedding dimension over the GLOBAL batch and builds the
cross-correlation matrix ``c = z1ᵀ z2 / N`` from every rank's samples, with differentiable
all-reduces (``_AllReduceSum``). Each rank then holds the same
loss; the all-reduce's backward sums the ranks' upstream gradients and data-parallel averaging
divides by the world size, so the parameter gradient equals the single-process gradient on the
global batch. (The reference code all-reduces ``c`` without autograd and standardizes with a
SyncBatchNorm, which yields 1/world of that gradient; SyncBatchNorm also does not run on CPU.)

With gradient accumulation the correlation is taken over one micro-batch of every rank
(``per-device batch x world size`` samples), as usual for Barlow Twins.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError

__all__ = ["BarlowTwins", "barlow_twins_loss", "build_projector", "cross_rank_standardize"]


def build_projector(in_dim: int, spec: str) -> nn.Sequential:
    """``"4096-4096-4096"``: (Linear, BN, ReLU) per hidden width, then a final Linear (no bias)."""
    try:
        widths = [int(w) for w in spec.split("-")]
    except ValueError:
        widths = []
    if not widths or min(widths) < 1:
        raise ConfigError(f"invalid --projector={spec!r}; expected widths like 4096-4096-4096")
    dims = [in_dim, *widths]
    layers: list[nn.Module] = []
    for d_in, d_out in pairwise(dims[:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """``forward(y1, y2) -> (z1, z2)``: one call for both views (one DDP forward per step)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, projector: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = build_projector(feature_dim, projector)

    def forward(self, y1: Tensor, y2: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(self.backbone(y1)), self.projector(self.backbone(y2))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the backward sums the upstream gradients over the ranks.

    Not ``torch.distributed._functional_collectives.all_reduce``: up to torch 2.9 its backward
    silently drops the gradient (the input's ``.grad`` stays None). Not
    ``torch.distributed.nn.functional.all_reduce``: deprecated in favour of the former.
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def _global_sum(t: Tensor) -> Tensor:
    return _AllReduceSum.apply(t) if _distributed() else t


def cross_rank_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """BatchNorm without affine over the global batch (biased variance, as BN training)."""
    n = _global_sum(torch.tensor(float(z.shape[0]), device=z.device))
    mean = _global_sum(z.sum(0)) / n
    centered = z - mean
    var = _global_sum((centered * centered).sum(0)) / n
    return centered / torch.sqrt(var + eps)


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.005) -> Tensor:
    """sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 over the global batch."""
    n = _global_sum(torch.tensor(float(z1.shape[0]), device=z1.device))
    c = _global_sum(cross_rank_standardize(z1).T @ cross_rank_standardize(z2)) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag
