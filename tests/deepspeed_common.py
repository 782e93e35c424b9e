"""Shared by the DeepSpeed tests and the script they launch with accelerate: the model, the data,
the single-process reference run and the comparison metrics.

The global batch of step k is ``batches()[k]`` (8 samples); rank r of 2 trains on rows
[4r, 4r + 4). DeepSpeed averages the two ranks' gradients, which equals the gradient of the mean
loss over the global batch, so the reference trains on the whole global batch in one process.
"""

from __future__ import annotations

import os

import torch
from torch import nn

import tvlars_scale.deepspeed as tds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIGS = os.path.join(ROOT, "ds_configs")
WORLD = 2
MICRO = 4  # samples per rank per step


def make_model() -> nn.Module:
    """Odd sizes so that ZeRO partitions cut layers and ZeRO-3 partitions end in padding."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(7, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    )


def param_groups(model: nn.Module, two_groups: bool) -> list[dict]:
    """One group, or two: the first two Linear layers and the rest with its own eta."""
    named = list(model.named_parameters())
    if not two_groups:
        return [{"params": [p for _, p in named]}]
    return [
        {"params": [p for _, p in named[:4]]},
        {"params": [p for _, p in named[4:]], "eta": 0.05},
    ]


def batches(
    steps: int, rows: int = WORLD * MICRO, features: tuple[int, int] = (7, 3)
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of ``rows`` (input, target) rows of ``features`` columns; data
    rank d trains on its own ``rows / dp`` of them."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(rows, features[0], generator=g), torch.randn(rows, features[1], generator=g))
        for _ in range(steps)
    ]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.float() - y) ** 2).mean()


def reference(
    type_name: str, params: dict, steps: int, two_groups: bool = False, clipping: float = 0.0
) -> tuple[list[torch.Tensor], dict]:
    """A single-process run of the JSON's optimizer on the global batches: final parameters and
    the last step's layer stats (by parameter name)."""
    model = make_model()
    groups = param_groups(model, two_groups)
    names = {p: n for n, p in model.named_parameters()}
    for group in groups:  # named params: layer stats carry the same names as DeepSpeed's
        group["params"] = [(names[p], p) for p in group["params"]]
    optimizer = tds.JSON_TYPES[type_name](groups, **tds.optimizer_kwargs(type_name, params))
    for x, y in batches(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        if clipping > 0:  # DeepSpeed clips the global norm before the optimizer runs
            nn.utils.clip_grad_norm_(model.parameters(), clipping)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()], optimizer.layer_stats().to_dict()


def max_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max over tensors of max|got - want| / max|want|."""
    return max(
        ((g.float() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want, strict=True)
    )


def update_relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max over tensors of ||got - want|| / ||want - initial||: the error as a fraction of the
    update the reference made (the initial values are make_model()'s)."""
    initial = [p.detach() for p in make_model().parameters()]
    return max(
        ((g.float() - w).norm() / (w - w0).norm()).item()
        for g, w, w0 in zip(got, want, initial, strict=True)
    )
