"""Layouts: which local pieces of which tensors belong to which logical layer.

An optimizer sees whatever tensors the training engine put into ``param_groups``: whole
parameters (single process, DDP, pipeline stages), DTensor shards (FSDP2, HSDP, tensor
parallelism and their compositions), flat shards that cut across layers (FSDP1, DeepSpeed ZeRO).
A *layout* maps those tensors back to the model's logical layers:

- ``layers``: one ``Layer`` per original ``nn.Parameter`` (name, original shape, and the process
  group its partial sums must be all-reduced over);
- ``segments``: the local pieces, each a contiguous range of one tensor that belongs to one layer.

The optimizer core only ever sees a ``GroupLayout``; it knows nothing of FSDP or DeepSpeed.
A *layout adapter* (the ``LayoutAdapter`` protocol, one module each) turns a param group into a
``GroupLayout``. ``discover`` asks them in a fixed order (``adapter_names()``):

1. adapters registered with ``register_adapter``, in the order they were registered;
2. ``deepspeed`` (tensors of a DeepSpeed wrapper bound to the optimizer), ``dtensor``, ``fsdp1``,
   and ``replicated`` last.

A param group may name its adapter (``group["layout"] = "dtensor"``): then only that one is
asked, and a refusal is an error. When no adapter claims the tensors, ``UnmappableLayoutError``
is raised. There is no fallback to per-tensor norms for a tensor nobody understands: that would
be silently wrong math. docs/design.md describes the protocol.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..errors import UnmappableLayoutError

__all__ = [
    "BUILTIN_ADAPTERS",
    "DiscoveryContext",
    "GroupLayout",
    "Layer",
    "LayoutAdapter",
    "Segment",
    "UnmappableLayoutError",
    "adapter_names",
    "check_layout_name",
    "describe_tensor",
    "discover",
    "register_adapter",
]


def held_as_is(t: Tensor) -> Tensor:
    """The local storage of a tensor held whole on this rank: the tensor itself."""
    return t


@dataclass(frozen=True)
class Layer:
    """One logical layer: an original ``nn.Parameter``, however it is sharded."""

    name: str
    shape: tuple[int, ...]
    #: The process group whose ranks hold the other pieces of this layer, to all-reduce its
    #: partial sums over (for a layer split over several groups, one group over all of them:
    #: ``tvlars_scale.groups.mesh_group``). None: the rank holds the whole layer (or an identical
    #: replica of it), so no reduction is needed.
    reduce_group: Any = None
    #: The tensor-parallel group of a layer that is a TP slice which an engine then shards over
    #: ``reduce_group`` (DeepSpeed ZeRO or FSDP1 over a Megatron-style or AutoTP model): each
    #: keeps its own group, so the sums are completed in two stages, first over
    #: ``reduce_group`` (every rank of it holds pieces of the same TP slice: the slice's sum),
    #: then over ``tp_group`` (the other slices: the layer's sum). None: not a TP slice, or its
    #: TP split is already in ``reduce_group`` (a DTensor mesh slice).
    tp_group: Any = None

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
    to_local: Callable[[Tensor], Tensor] = field(default=held_as_is)
    #: The local piece of a parameter's gradient, when that takes more than ``to_local``:
    #: ``grad_to_local(grad, param)`` gives the piece that pairs with the parameter's own (a
    #: partial sum to complete, as under sequence parallelism; a replicated gradient of a split
    #: parameter to slice). None: ``to_local(grad)``.
    grad_to_local: Callable[[Tensor, Tensor], Tensor] | None = None
    #: Name of the adapter that produced this layout, for messages and tests.
    kind: str = "replicated"
    #: Index of the tensor whose optimizer state keeps the step counters, for engines that step
    #: one param group several times per training step, each time with different tensors
    #: (DeepSpeed ZeRO-3 sub-groups). The counters are mirrored into the group during the step.
    #: None: the counters live in the param group.
    counters_owner: int | None = None

    @property
    def whole_tensors(self) -> bool:
        """Whether every piece is a whole tensor, held as it is (no local storage to take, no
        slice): then ``local_pieces`` of real tensors are the tensors themselves."""
        return (
            self.to_local is held_as_is
            and self.grad_to_local is None
            and all(s.start is None for s in self.segments)
        )

    def local_pieces(
        self, tensors: Sequence[Tensor | None], segments: Sequence[Segment], grads: bool = False
    ):
        """Views of ``tensors`` (aligned with the group's params) for each segment; with
        ``grads``, ``tensors`` are the params and the views are of their gradients. A complex
        piece is viewed as real pairs (``torch.view_as_real``), as torch's optimizers step
        complex tensors: its norm is the same, and the rules' updates are elementwise. A
        gradient that autograd left as a conjugate view (of a parameter used through
        ``.conj()`` or ``.mH`` only) is read through a resolved copy."""
        pieces = []
        for seg in segments:
            local = self._local_of(tensors[seg.tensor], grads)
            if seg.start is not None:
                local = local.view(-1).narrow(0, seg.start, seg.numel)
            if local.is_complex():
                local = torch.view_as_real(local.resolve_conj() if grads else local)
            pieces.append(local)
        return pieces

    def _local_of(self, t: Tensor, grad: bool) -> Tensor:
        if not grad:
            return self.to_local(t)
        if self.grad_to_local is None:
            return self.to_local(t.grad)
        return self.grad_to_local(t.grad, t)


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


class LayoutAdapter(Protocol):
    """Maps one param group's tensors to logical layers.

    Called at a group's first ``step()``, and again when its tensors (or which of them have
    gradients) change. Returns:

    - a ``GroupLayout`` when the tensors are of the adapter's kind and it can map them exactly;
      every rank that shares a layer's ``reduce_group`` must list that group's layers in the
      same order (their partial sums are all-reduced as one vector);
    - ``None`` when they are not of its kind (the next adapter is asked).

    Raises ``UnmappableLayoutError`` when they are of its kind but cannot be mapped exactly
    (an unknown placement, a missing binding): never an approximate layout.
    """

    def __call__(self, params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None: ...


#: The built-in adapters, in the order they are asked (after any registered ones).
BUILTIN_ADAPTERS = ("deepspeed", "dtensor", "fsdp1", "replicated")
_BUILTINS: dict[str, LayoutAdapter] = {}
# An OrderedDict (not a dict) because RemovableHandle keeps a weak reference to it.
_REGISTERED: OrderedDict[int, tuple[str, LayoutAdapter]] = OrderedDict()


def register_adapter(name: str, adapter: LayoutAdapter) -> RemovableHandle:
    """Add a layout adapter, asked before the built-in ones (in registration order).

    Returns a handle whose ``remove()`` unregisters it. ``name`` is what a param group's
    ``"layout"`` key and ``GroupLayout.kind`` use; it must not be taken.
    """
    _ensure_builtin_adapters()
    if name in adapter_names():
        raise ValueError(
            f"register_adapter: a layout adapter named {name!r} is already registered; "
            f"taken names: {', '.join(adapter_names())}"
        )
    handle = RemovableHandle(_REGISTERED)
    _REGISTERED[handle.id] = (name, adapter)
    return handle


def _register_builtin(name: str, adapter: LayoutAdapter) -> None:
    assert name in BUILTIN_ADAPTERS, name
    _BUILTINS[name] = adapter


def _adapters() -> list[tuple[str, LayoutAdapter]]:
    _ensure_builtin_adapters()
    return [*_REGISTERED.values(), *((n, _BUILTINS[n]) for n in BUILTIN_ADAPTERS)]


def adapter_names() -> list[str]:
    """The layout adapters in the order ``discover`` asks them."""
    return [name for name, _ in _adapters()]


def check_layout_name(owner: str, name: Any) -> None:
    """Validate a param group's ``"layout"`` entry (None: discover)."""
    if name is not None and name not in adapter_names():
        raise ValueError(
            f"{owner}: invalid layout={name!r} in a param group; expected None (discover it) or "
            f"one of {', '.join(adapter_names())}"
        )


def describe_tensor(t: Tensor) -> str:
    kind = type(t).__name__
    return f"{kind}(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"


def discover(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout:
    """The group's named adapter (``group["layout"]``), else each adapter in turn; the first
    that claims the group wins."""
    named = ctx.group.get("layout")
    if named is not None:
        adapter = dict(_adapters()).get(named)
        if adapter is None:  # e.g. from a loaded state_dict, whose adapter is not registered
            raise UnmappableLayoutError(
                f"{type(ctx.optimizer).__name__}: param group {ctx.group_index} names "
                f"layout={named!r}, which is not a registered layout adapter (registered: "
                f"{', '.join(adapter_names())}). Register it before the first step() "
                '(tvlars_scale.layouts.register_adapter) or drop "layout" to discover it.'
            )
        layout = adapter(params, ctx)
        if layout is None:
            raise UnmappableLayoutError(
                f"{type(ctx.optimizer).__name__}: param group {ctx.group_index} names "
                f"layout={named!r}, which does not recognise its tensors "
                f"({', '.join(describe_tensor(p) for p in params[:3])}). Name the adapter that "
                f'matches them ({", ".join(adapter_names())}) or drop "layout" to discover it.'
            )
        return layout
    for _name, adapter in _adapters():
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
        "(FSDP2 `fully_shard`, or FSDP1 `FullyShardedDataParallel`); for another engine, "
        "register a layout adapter (`tvlars_scale.layouts.register_adapter`); otherwise "
        "build the optimizer from the model's own parameters."
    )


_BUILTINS_LOADED = False


def _ensure_builtin_adapters() -> None:
    # Imported lazily so that `import tvlars_scale` stays cheap and adapters that need optional
    # packages (deepspeed) only load when a group actually needs discovering.
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from . import deepspeed_zero, dtensor, fsdp1, replicated  # noqa: F401
