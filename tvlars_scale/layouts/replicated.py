"""Replicated layout: single process, DDP, DeepSpeed stage 0 without a wrapper.

Every rank holds every parameter whole (DDP has already averaged the gradients), so each
parameter is one layer and one segment, and nothing is reduced.

This adapter is asked last and refuses anything that looks sharded, or any tensor the optimizer
was not built with (a flat buffer swapped in by an engine): mapping those one-to-one would give
per-shard norms.
"""

from __future__ import annotations

from torch import Tensor

from . import DiscoveryContext, GroupLayout, Layer, Segment, register_adapter


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


def replicated_layout(params: list[Tensor], ctx: DiscoveryContext) -> GroupLayout | None:
    if any(looks_sharded(p) or not ctx.is_original(p) for p in params):
        return None
    names = ctx.group.get("param_names")
    layers = [
        Layer(name=names[i] if names else f"{ctx.group_index}.{i}", shape=tuple(p.shape))
        for i, p in enumerate(params)
    ]
    segments = [Segment(tensor=i, layer=i) for i in range(len(params))]
    return GroupLayout(layers=layers, segments=segments, kind="replicated")


register_adapter("replicated", replicated_layout, priority=-1000)
