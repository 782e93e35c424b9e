"""Layouts: which local pieces of which tensors belong to which logical layer.

An optimizer sees whatever tensors the training engine put into ``param_groups``: whole
parameters (single process, DDP), DTensor shards (FSDP2), flat shards that cut across layers
(FSDP1, DeepSpeed ZeRO). A *layout* maps those tensors back to the model's logical layers:

- ``layers``: one ``Layer`` per original ``nn.Parameter`` (name, original shape, and the process
  groups its partial sums must be all-reduced over);
- ``segments``: the local pieces, each a contiguous range of one tensor that belongs to one layer.

The optimizer core only ever sees a ``GroupLayout``; it knows nothing of FSDP or DeepSpeed.
Adapters (one module each) turn a param group into a ``GroupLayout``; ``discover`` asks them in
order and raises ``UnmappableLayoutError`` when none claims the tensors. There is no fallback to
per-tensor norms for a tensor nobody understands: that would be silently wrong math.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DiscoveryContext",
    "GroupLayout",
    "Layer",
    "Segment",
    "UnmappableLayoutError",
    "describe_tensor",
    "discover",
    "register_adapter",
]


class UnmappableLayoutError(RuntimeError):
    """A tensor in ``param_groups`` cannot be mapped to logical layers."""


@dataclass(frozen=True)
class Layer:
    """One logical layer: an original ``nn.Parameter``, however it is sharded."""

    name: str
    shape: tuple[int, ...]
    #: Process groups to all-reduce this layer's partial sums over, in order. Empty: the rank
    #: holds the whole layer (or an identical replica of it), so no reduction is needed.
    reduce_over: tuple[Any, ...] = ()

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Segment:
    """A contiguous local piece of ``tensors[tensor]`` that belongs to ``layers[layer]``."""

    tensor: int
    layer: int
    #: Element range in the flattened local tensor; ``None`` means the whole local tensor,
    #: used with its own shape (no flattening, which keeps non-contiguous params usable).
    start: int | None = None
    numel: int | None = None


@dataclass
class GroupLayout:
    """How one param group's tensors split into logical layers."""

    layers: list[Layer]
    segments: list[Segment]
    #: Maps a tensor the optimizer holds (param, grad or state buffer) to its local storage.
    to_local: Callable[[Tensor], Tensor] = field(default=lambda t: t)
    #: Name of the adapter that produced this layout, for messages and tests.
    kind: str = "replicated"
    #: Index of the tensor whose optimizer state keeps the step counters, for engines that step
    #: one param group several times per training step, each time with different tensors
    #: (DeepSpeed ZeRO-3 sub-groups). The counters are mirrored into the group during the step.
    #: None: the counters live in the param group.
    counters_owner: int | None = None

    def local_pieces(self, tensors: Sequence[Tensor | None], segments: Sequence[Segment]):
        """Views of ``tensors`` (aligned with the group's params) for each segment."""
        pieces = []
        for seg in segments:
            local = self.to_local(tensors[seg.tensor])
            if seg.start is None:
                pieces.append(local)
            else:
                pieces.append(local.view(-1).narrow(0, seg.start, seg.numel))
        return pieces


@dataclass
class DiscoveryContext:
    """What an adapter may consult besides the tensors themselves."""

    optimizer: torch.optim.Optimizer
    group_index: int
    group: dict
    #: True for tensors the optimizer was constructed with (or added via add_param_group).
    is_original: Callable[[Tensor], bool]

    def param_name(self, index: int) -> str:
        """The group's name for ``params[index]`` (the optimizer was given ``named_parameters()``),
        else ``"<group index>.<index>"``."""
        names = self.group.get("param_names")
        return names[index] if names else f"{self.group_index}.{index}"


Adapter = Callable[[list[Tensor], DiscoveryContext], "GroupLayout | None"]
_ADAPTERS: list[tuple[int, str, Adapter]] = []


def register_adapter(name: str, adapter: Adapter, *, priority: int = 0) -> None:
    """Add a layout adapter. Higher priority is asked first; ``replicated`` is asked last."""
    global _ADAPTERS
    _ADAPTERS = [a for a in _ADAPTERS if a[1] != name]
    _ADAPTERS.append((priority, name, adapter))
    _ADAPTERS.sort(key=lambda a: -a[0])


def describe_tensor(t: Tensor) -> str:
    kind = type(t).__name__
    return f"{kind}(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"


def discover(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout:
    """Ask every adapter in turn; the first that claims the group wins."""
    _ensure_builtin_adapters()
    for _, _name, adapter in _ADAPTERS:
        layout = adapter(params, ctx)
        if layout is not None:
            return layout
    raise UnmappableLayoutError(_unmappable_message(params, ctx))


def _unmappable_message(params: list[Tensor], ctx: DiscoveryContext) -> str:
    odd = [describe_tensor(p) for p in params if not ctx.is_original(p)][:3]
    found = ", ".join(odd) if odd else ", ".join(describe_tensor(p) for p in params[:3])
    return (
        f"{type(ctx.optimizer).__name__}: cannot map param group {ctx.group_index} to logical "
        f"layers. Found {found}. Trust ratios need per-layer norms, and a flat or wrapped tensor "
        "without layout metadata would give per-shard norms (silently wrong). Fixes: under "
        "DeepSpeed ZeRO call `tvlars_scale.deepspeed.bind(engine)` once after "
        "`deepspeed.initialize`; under FSDP pass the parameters of the wrapped model "
        "(FSDP2 `fully_shard`, or FSDP1 `FullyShardedDataParallel`); otherwise build the "
        "optimizer from the model's own parameters."
    )


_BUILTINS_LOADED = False


def _ensure_builtin_adapters() -> None:
    # Imported lazily so that `import tvlars_scale` stays cheap and adapters that need optional
    # packages (deepspeed) only load when a group actually needs discovering.
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import deepspeed_zero, fsdp1, fsdp2, replicated  # noqa: F401
