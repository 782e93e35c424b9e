"""Replicated layout: single process, DDP, DeepSpeed stage 0 without a wrapper.

Every rank holds every parameter whole (DDP has already averaged the gradients), so each
parameter is one layer and one segment, and nothing is reduced.

This adapter is asked last and refuses anything that looks sharded, or any tensor the optimizer
was not built with (a flat buffer swapped in by an engine): mapping those one-to-one would give
per-shard norms. A parameter tagged as a tensor-parallel slice (Megatron's
``tensor_model_parallel``, DeepSpeed AutoTP's metadata: ``layouts.tensor_parallel``) is an error
too: its TP group is the engine's, out of sight here, and the slice's norm is not the layer's.
"""

from __future__ import annotations

from torch import Tensor

from . import DiscoveryContext, GroupLayout, Layer, Segment, _register_builtin
from .tensor_parallel import refuse_tp_slices


def looks_sharded(t: Tensor) -> bool:
    """Markers that FSDP1, FSDP2 (DTensor) and DeepSpeed ZeRO-3 put on the tensors they own."""
    from torch.distributed.tensor import DTensor

    return (
        isinstance(t, DTensor)
        or getattr(t, "_is_flat_param", False)
        or getattr(t, "_fsdp_flattened", False)
        or hasattr(t, "ds_id")
        or hasattr(t, "ds_tensor")
    )


def is_whole(t: Tensor, ctx: DiscoveryContext) -> bool:
    """A whole, unsharded parameter the optimizer was built with (sharded adapters reuse this for
    the parameters an engine leaves alone, e.g. FSDP's ignored modules)."""
    return ctx.is_original(t) and not looks_sharded(t)


def replicated_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if not all(is_whole(p, ctx) for p in params):
        return None
    names = [ctx.param_name(i) for i in range(len(params))]
    refuse_tp_slices(params, names, "replicated", type(ctx.optimizer).__name__)
    layers = [Layer(name=name, shape=tuple(p.shape)) for name, p in zip(names, params, strict=True)]
    segments = [Segment(tensor=i, layer=i) for i in range(len(params))]
    return GroupLayout(layers=layers, segments=segments, kind="replicated")


_register_builtin("replicated", replicated_layout)
