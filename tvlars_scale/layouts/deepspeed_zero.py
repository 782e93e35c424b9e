"""DeepSpeed layouts: the fp32 master tensors of DeepSpeed's optimizer wrappers, mapped back to
the model's parameters.

DeepSpeed builds the optimizer (the "basic optimizer"), then a wrapper swaps the tensors in its
``param_groups`` for the wrapper's own fp32 master tensors:

=================================  ================================================  =============================
wrapper                            what the basic optimizer holds                    partial sums reduced over
=================================  ================================================  =============================
``FP16_UnfusedOptimizer``          an fp32 copy of every parameter, original shapes  nothing (replicated)
(stage 0 with bf16/fp16)
``DeepSpeedZeroOptimizer``         per group, this rank's slice of one flat buffer   ``real_dp_process_group[i]``
(stages 1 and 2)                   cut across layers; round-robin order and
                                   ``parameter_alignment`` pads inside it
``BF16_Optimizer``                 the same, without round robin or pads             ``real_dp_process_group[i]``
(stage 1, bf16, fp32 grad accum)
``DeepSpeedZeroOptimizer_Stage3``  per sub-group, the ``ds_tensor`` partitions of    ``sub_group_process_groups[sg]``
                                   its params back to back; each ends in padding
                                   that holds garbage
=================================  ================================================  =============================

The element ranges come from the wrapper's own bookkeeping lists (``round_robin_bit16_groups``,
``round_robin_bit16_offsets``, ``partition_size``, ``fp16_groups``, ``partition_numel()``...).
DeepSpeed's ``_hp_mapping`` is not used: it is wrong under ``round_robin_gradients``.
Every rank lists every parameter of a (sub)group as a layer, in the same order, so that the
all-reduced vectors line up; a rank contributes only the pieces it holds. ZeRO-3 steps a param
group once per sub-group, each time with that sub-group's flat tensor, so its layouts keep the
step counters in that tensor's optimizer state (``GroupLayout.counters_owner``).

**Tensor parallelism.** With a Megatron-style ``mpu`` (or AutoTP, whose ``mpu`` is
``deepspeed.utils.groups``) a parameter may be this rank's TP slice, tagged
(``layouts.tensor_parallel``; the tags live on the model's parameter, not on the fp32 master).
Its layer is reduced over the group above (the slice), then over the ``mpu``'s TP group (the
layer; ``Layer.tp_group``), and has the layer's whole shape. The TP peers exchange what they
list once per param group, at its first step: that gives the whole shapes of uneven slices,
places the layers of slices a rank holds nothing of (the wrappers drop parameters of no
element), and refuses, on every peer at once, whatever cannot line up. MiCS (DeepSpeed <= 0.18)
is refused.

The wrapper is named by ``tvlars_scale.deepspeed.bind(engine)``, called once after
``deepspeed.initialize`` (the recipes call it after accelerate's ``prepare``). Without a binding
the adapter falls back to the call stack: DeepSpeed always calls the basic optimizer's ``step()``
from the wrapper's (or the engine's) own methods, so at discovery time it looks up the callers
for the DeepSpeed object that owns this optimizer, once, and remembers it.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ..compat import internal, require_version
from . import (
    DiscoveryContext,
    GroupLayout,
    Layer,
    Segment,
    UnmappableLayoutError,
    _register_builtin,
    describe_tensor,
)
from .deepspeed_tp import with_tensor_parallel
from .replicated import is_whole

__all__ = ["Binding", "bind_wrapper", "binding_for"]

#: How far up the call stack to look for the DeepSpeed wrapper/engine calling ``step()``.
_MAX_FRAMES = 32


@dataclass(frozen=True)
class _Piece:
    """One parameter's share of a master tensor."""

    param: Tensor  # the model's parameter (DeepSpeed's low-precision "bit16" param)
    shape: tuple[int, ...]  # its original shape
    start: int | None  # element offset in the local master tensor; None: the whole tensor
    numel: int  # elements held by this rank (0: none)


@dataclass(frozen=True)
class _Master:
    """What one tensor the basic optimizer holds is made of."""

    #: Every parameter of the (sub)group, in model order, on every rank (held or not).
    pieces: list[_Piece]
    #: The group whose ranks hold the other pieces; None: the tensor holds whole parameters.
    process_group: Any | None


# --------------------------------------------------------------------------- the four wrappers
def _zero12_masters(w) -> list[Tensor]:
    return internal(w, "single_partition_of_fp32_groups", "deepspeed")


def _zero12_master(w, i: int) -> _Master:
    """ZeRO-1/2: rank r owns [r*P, (r+1)*P) of the group's flat buffer, in round-robin order."""
    group = internal(w, "round_robin_bit16_groups", "deepspeed")[i]
    # 0.19.8 `parameter_alignment` pads params inside the buffer; older versions lack the lists.
    offsets = getattr(w, "round_robin_bit16_offsets", None)
    metas = getattr(w, "round_robin_bit16_meta", None)  # shapes even while params are offloaded
    process_group = internal(w, "real_dp_process_group", "deepspeed")[i]
    size = int(internal(w, "partition_size", "deepspeed")[i])  # a float up to 0.19.0
    low = dist.get_rank(group=process_group) * size
    by_param, running = {}, 0
    for k, p in enumerate(group):
        shape = tuple(metas[i][k].shape) if metas else tuple(p.shape)
        numel = _numel(shape)
        offset = offsets[i][k] if offsets else running
        running = offset + numel
        by_param[id(p)] = _clip(p, shape, offset, low, size)
    pieces = [by_param[id(p)] for p in internal(w, "bit16_groups", "deepspeed")[i]]
    return _checked(_zero12_masters(w)[i], size, pieces, process_group, "ZeRO-1/2")


def _bf16_masters(w) -> list[Tensor]:
    return internal(w, "fp32_groups_flat_partition", "deepspeed")


def _bf16_master(w, i: int) -> _Master:
    """BF16_Optimizer: the same cut as ZeRO-1/2, params back to back, padding at the end."""
    process_group = internal(w, "real_dp_process_group", "deepspeed")[i]
    flat = internal(w, "bf16_groups_flat", "deepspeed")[i]
    size = flat.numel() // dist.get_world_size(group=process_group)
    low = dist.get_rank(group=process_group) * size
    pieces, offset = [], 0
    for p in internal(w, "bf16_groups", "deepspeed")[i]:
        pieces.append(_clip(p, tuple(p.shape), offset, low, size))
        offset += p.numel()
    return _checked(_bf16_masters(w)[i], size, pieces, process_group, "BF16_Optimizer")


def _zero3_masters(w) -> list[Tensor]:
    return internal(w, "fp32_partitioned_groups_flat", "deepspeed")


def _zero3_master(w, sg: int) -> _Master:
    """ZeRO-3: each param is cut on its own; rank r holds elements [r*n, (r+1)*n) of it, where
    n = partition_numel(); past the param's end the partition is padding (garbage, masked)."""
    # Recent releases keep a process group per sub-group; up to 0.19.0 all used the DP group.
    groups = getattr(w, "sub_group_process_groups", None)
    if groups is not None:
        process_group = groups[sg]
    else:
        process_group = internal(w, "dp_process_group", "deepspeed")
    rank = dist.get_rank(group=process_group)
    pieces, offset = [], 0
    for p in internal(w, "fp16_groups", "deepspeed")[sg]:
        n = p.partition_numel()
        valid = min(max(p.ds_numel - rank * n, 0), n)
        pieces.append(_Piece(p, tuple(p.ds_shape), offset, valid))
        offset += n
    return _checked(_zero3_masters(w)[sg], offset, pieces, process_group, "ZeRO-3")


def _unfused_masters(w) -> list[Tensor]:
    return [t for group in internal(w, "fp32_groups", "deepspeed") for t in group]


def _unfused_master(w, index: int) -> _Master:
    """FP16_UnfusedOptimizer (stage 0, bf16/fp16): whole fp32 copies, nothing to reduce."""
    lp_groups = internal(w, "fp16_groups", "deepspeed")
    hp_groups = internal(w, "fp32_groups", "deepspeed")
    for lps, hps in zip(lp_groups, hp_groups, strict=True):
        if index < len(hps):
            hp = hps[index]
            return _Master([_Piece(lps[index], tuple(hp.shape), None, hp.numel())], None)
        index -= len(hps)
    raise IndexError(index)


@dataclass(frozen=True)
class _Kind:
    name: str
    masters: Callable[[Any], list[Tensor]]
    master: Callable[[Any, int], _Master]
    #: True where the wrapper steps one param group once per sub-group with a different tensor.
    counters_in_state: bool = False


@functools.cache
def _kinds() -> list[tuple[type, _Kind]]:
    # Imported here: only called once DeepSpeed is imported, and it is an optional dependency.
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return [
        (DeepSpeedZeroOptimizer, _Kind("deepspeed_zero12", _zero12_masters, _zero12_master)),
        (BF16_Optimizer, _Kind("deepspeed_bf16", _bf16_masters, _bf16_master)),
        (
            DeepSpeedZeroOptimizer_Stage3,
            _Kind("deepspeed_zero3", _zero3_masters, _zero3_master, counters_in_state=True),
        ),
        (FP16_UnfusedOptimizer, _Kind("deepspeed_stage0", _unfused_masters, _unfused_master)),
    ]


def _kind_of(wrapper: Any) -> _Kind | None:
    for cls, kind in _kinds():
        if isinstance(wrapper, cls):
            return kind
    return None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _clip(p: Tensor, shape: tuple[int, ...], offset: int, low: int, size: int) -> _Piece:
    """The part of flat range [offset, offset + numel) inside this rank's [low, low + size)."""
    start, end = max(offset, low), min(offset + _numel(shape), low + size)
    return _Piece(p, shape, start - low if end > start else 0, max(end - start, 0))


def _checked(tensor: Tensor, size: int, pieces: list[_Piece], process_group, what: str) -> _Master:
    # A layout that does not match the tensor would silently mix layers: refuse it.
    end = max((pc.start + pc.numel for pc in pieces if pc.numel), default=0)
    if tensor.numel() != size or end > size:
        raise UnmappableLayoutError(
            f"{what} layout mismatch: the optimizer holds {describe_tensor(tensor)} but DeepSpeed's "
            f"bookkeeping gives a partition of {size} elements (pieces up to {end}). This DeepSpeed "
            "version or configuration is not supported by tvlars_scale; please report it."
        )
    return _Master(pieces, process_group)


# --------------------------------------------------------------------------- finding the wrapper
@dataclass
class Binding:
    """The DeepSpeed objects that drive one basic optimizer (weak references)."""

    _wrapper: Callable[[], Any] | None
    _engine: Callable[[], Any] | None
    #: What the TP peers listed for each param group (``_tp_peers``), gathered once: a plan
    #: rebuilt on one rank alone (say, a gradient that appeared) must not gather again.
    tp_peers: dict = field(default_factory=dict)

    @property
    def wrapper(self) -> Any | None:
        """The ZeRO/BF16/FP16 wrapper, or None when the engine steps the optimizer directly."""
        return self._wrapper() if self._wrapper is not None else None

    @property
    def engine(self) -> Any | None:
        return self._engine() if self._engine is not None else None


_BINDINGS: weakref.WeakKeyDictionary[Optimizer, Binding] = weakref.WeakKeyDictionary()


def bind_wrapper(optimizer: Optimizer, wrapper: Any | None, engine: Any | None = None) -> Binding:
    """Record that ``wrapper`` (or ``engine`` directly, when ``wrapper`` is None) steps ``optimizer``."""
    if wrapper is not None and _kind_of(wrapper) is None:
        raise TypeError(
            f"tvlars_scale: unsupported DeepSpeed optimizer wrapper {type(wrapper).__name__}; "
            "supported: DeepSpeedZeroOptimizer (ZeRO-1/2), BF16_Optimizer, "
            "DeepSpeedZeroOptimizer_Stage3 (ZeRO-3), FP16_UnfusedOptimizer (stage 0, bf16/fp16)"
        )
    binding = Binding(
        weakref.ref(wrapper) if wrapper is not None else None,
        weakref.ref(engine) if engine is not None else None,
    )
    _BINDINGS[optimizer] = binding
    _warn_if_clipping(optimizer, binding)
    return binding


def _wraps(obj: Any, optimizer: Optimizer) -> bool:
    return _kind_of(obj) is not None and obj.__dict__.get("optimizer") is optimizer


def _is_engine_of(obj: Any, optimizer: Optimizer) -> bool:
    from deepspeed.runtime.engine import DeepSpeedEngine

    return isinstance(obj, DeepSpeedEngine) and obj.__dict__.get("basic_optimizer") is optimizer


def _from_call_stack(optimizer: Optimizer) -> Binding | None:
    """The wrapper and engine among the callers of ``step()`` (wrapper first: while the engine is
    still building it, e.g. FP16_UnfusedOptimizer's start-up step, ``engine.optimizer`` is unset)."""
    wrapper = engine = None
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if owner is not None and owner is not optimizer:
            if wrapper is None and _wraps(owner, optimizer):
                wrapper = owner
            elif engine is None and _is_engine_of(owner, optimizer):
                engine = owner
        frame = frame.f_back
    if (
        wrapper is None
        and engine is not None
        and _wraps(engine.__dict__.get("optimizer"), optimizer)
    ):
        wrapper = engine.optimizer
    if wrapper is None and engine is None:
        return None
    return bind_wrapper(optimizer, wrapper, engine)


def binding_for(optimizer: Optimizer) -> Binding | None:
    """The DeepSpeed binding of ``optimizer``: recorded, or found among the callers of step()."""
    binding = _BINDINGS.get(optimizer)
    if binding is not None and (binding.wrapper is not None or binding.engine is not None):
        return binding
    return _from_call_stack(optimizer)


# --------------------------------------------------------------------------- gradient clipping
_CLIPPING_WARNED = False


def _warn_if_clipping(optimizer: Optimizer, binding: Binding) -> None:
    """DeepSpeed clips the global gradient norm (default 1.0) before the optimizer runs. A LARS
    rule with weight decay is not invariant to that rescaling: eta*||w|| / ||c*g + wd*w||."""
    global _CLIPPING_WARNED
    if _CLIPPING_WARNED or "eta" not in optimizer.defaults:
        return
    wrapper, engine = binding.wrapper, binding.engine
    if wrapper is not None:
        clip = getattr(wrapper, "clip_grad", 0.0)
    else:
        clip = engine.gradient_clipping() if engine is not None else 0.0
    if not clip or clip <= 0:
        return
    _CLIPPING_WARNED = True
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(
        f"tvlars_scale: DeepSpeed gradient_clipping={clip} rescales the gradients by "
        f"min(1, {clip}/||g||) before {type(optimizer).__name__} sees them. With weight decay this "
        "changes every layer's trust ratio eta*||w||/||g + wd*w|| (the gradient shrinks relative to "
        "wd*w), so the run differs from the unclipped rule. Layer-wise optimizers already bound each "
        "layer's step; set \"gradient_clipping\": 0 in the DeepSpeed config (DeepSpeed's default is "
        "1.0) unless you mean it.",
        UserWarning,
        stacklevel=2,
    )


def _check_verified(kind: _Kind, engine: Any | None) -> None:
    """ZeRO-3 and the pipeline engine equal a single process on DeepSpeed 0.19 but not on the
    oldest release the matrix ran (0.16.9), where they are refused rather than guessed."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if kind.name == "deepspeed_zero3":
        found = "On DeepSpeed 0.16.9 ZeRO-3 runs intermittently differed from one process"
        feature, instead = "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3)", "ZeRO-1/2 or FSDP2"
        require_version("deepspeed", "0.19", feature, found, instead)
    if isinstance(engine, PipelineEngine):
        found = "On DeepSpeed 0.16.9 a PipelineModule run differed from one process"
        instead = "torch.distributed.pipelining"
        require_version("deepspeed", "0.19", "DeepSpeed's PipelineEngine", found, instead)


def _refuse_mics(wrapper: Any | None, engine: Any | None) -> None:
    """MiCS (``zero_optimization.mics_shard_size`` > 0, DeepSpeed <= 0.18; removed in 0.19)
    partitions ZeRO-3 within shard groups and replicates across them. Its wrapper subclasses
    ZeRO-3's, which would take it for plain ZeRO-3: refused, recognised by class name and config
    value (its module is gone from 0.19, so nothing is imported)."""
    mro = {cls.__name__ for cls in type(wrapper).__mro__} if wrapper is not None else set()
    shard_size = getattr(getattr(engine, "_config", None), "mics_shard_size", None)
    if "MiCS_Optimizer" in mro or (isinstance(shard_size, int) and shard_size > 0):
        raise UnmappableLayoutError(
            f"tvlars_scale: DeepSpeed MiCS (mics_shard_size={shard_size}) is not supported: its "
            "partitions span a shard group, replicated across groups, and this adapter maps "
            "plain ZeRO-3 partitions only. Use ZeRO-3 without mics_shard_size, or FSDP2 HSDP "
            "for the same layout (DeepSpeed 0.19 removed MiCS)."
        )


# --------------------------------------------------------------------------- the adapter
def deepspeed_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if "deepspeed" not in sys.modules or not params:
        return None
    binding = binding_for(ctx.optimizer)
    if binding is None:
        return None
    wrapper = binding.wrapper
    _refuse_mics(wrapper, binding.engine)
    if wrapper is None:  # stage 0, fp32: the engine steps the original params, replicated
        return _named_replicated(params, ctx, binding)
    kind = _kind_of(wrapper)
    _check_verified(kind, binding.engine)
    masters = kind.masters(wrapper)
    owned = {id(t): k for k, t in enumerate(masters)}
    found = [owned.get(id(p)) for p in params]
    if all(k is None for k in found):
        return None
    if any(k is None for k in found):
        stray = next(p for p, k in zip(params, found, strict=True) if k is None)
        raise UnmappableLayoutError(
            f"{type(ctx.optimizer).__name__}: param group {ctx.group_index} mixes "
            f"{type(wrapper).__name__} master tensors with {describe_tensor(stray)}, which that "
            "wrapper does not own; cannot map it to layers."
        )
    names = getattr(wrapper, "param_names", None) or getattr(binding.engine, "param_names", None)
    layers: list[Layer] = []
    segments: list[Segment] = []
    held: list[Tensor] = []  # the model parameter of each layer, which carries its TP tags
    for j, k in enumerate(found):
        master = kind.master(wrapper, k)
        for piece in master.pieces:
            name = names.get(piece.param) if names else None
            layers.append(
                Layer(name or f"{ctx.group_index}.{len(layers)}", piece.shape, master.process_group)
            )
            held.append(piece.param)
            if piece.numel:
                start, numel = (None, None) if piece.start is None else (piece.start, piece.numel)
                segments.append(Segment(j, len(layers) - 1, start, numel))
    layout = GroupLayout(
        layers=layers,
        segments=segments,
        kind=kind.name,
        counters_owner=0 if kind.counters_in_state else None,
    )
    # Which step() call this is: ZeRO-3 steps a group once per sub-group (of ``len(masters)``).
    call = (kind.name, ctx.group_index)
    if kind.counters_in_state:
        call += (tuple(found), len(masters))
    return with_tensor_parallel(layout, held, names, binding, ctx, call)


def _named_replicated(
    params: list[Tensor], ctx: DiscoveryContext, binding: Binding
) -> GroupLayout | None:
    """The parameters themselves, each a layer held whole (as the ``replicated`` adapter maps
    them), with the model's names (DeepSpeed builds the optimizer from unnamed parameters) and
    the TP group of the TP slices among them."""
    if not all(is_whole(p, ctx) for p in params):
        return None
    names = getattr(binding.engine, "param_names", None) or {}
    layers = [
        Layer(names.get(p) or ctx.param_name(i), tuple(p.shape)) for i, p in enumerate(params)
    ]
    layout = GroupLayout(layers, [Segment(i, i) for i in range(len(params))], kind="replicated")
    return with_tensor_parallel(
        layout, params, names, binding, ctx, ("replicated", ctx.group_index)
    )


_register_builtin("deepspeed", deepspeed_layout)
