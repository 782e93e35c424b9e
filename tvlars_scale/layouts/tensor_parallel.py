"""Tensor-parallel slices held as plain tensors: the tags Megatron-style models and DeepSpeed AutoTP
put on a parameter, read in one place.

A DTensor says how it is split in its placements (``layouts/dtensor.py``). A Megatron-style model
(a user's ``mpu`` handed to ``deepspeed.initialize``) or DeepSpeed's AutoTP instead holds each
rank's slice as an ordinary ``torch.Tensor`` and tags it:

- ``tensor_model_parallel`` (and the older ``model_parallel``): True on a split parameter; Megatron
  sets it False on the replicated ones. ``partition_dim`` / ``partition_stride`` say how it was cut.
  DeepSpeed reads the flag through ``deepspeed.runtime.utils.is_model_parallel_parameter``.
- ``ds_autotp_universal_checkpoint_meta`` (AutoTP, DeepSpeed >= 0.18): a dict with
  ``partition_dim``, ``logical_shape`` (the whole layer's shape) and ``replicated``.

``tp_slice(p)`` turns the tags into a ``TPSlice``; an untagged parameter gives None. Tags that
contradict each other are refused, never resolved by a guess. The TP group itself is the
engine's (``mpu``), so mapping a slice is the engine adapter's job; an adapter that cannot map
one refuses it (``refuse_tp_slices``) instead of treating it as a whole layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..errors import UnmappableLayoutError

__all__ = ["AUTOTP_META", "TPSlice", "refuse_tp_slices", "tp_slice"]

#: The attribute DeepSpeed AutoTP sets on every parameter it handles
#: (``deepspeed.checkpoint.constants.DS_AUTOTP_UC_META``).
AUTOTP_META = "ds_autotp_universal_checkpoint_meta"


@dataclass(frozen=True)
class TPSlice:
    """What a parameter's tensor-parallel tags say."""

    #: True: this rank holds one slice of the layer, the TP group's other ranks the others
    #: (possibly uneven, possibly empty). False: every rank of the TP group holds all of it.
    split: bool
    #: The dim the layer was cut along (None when unknown or replicated).
    partition_dim: int | None
    #: The whole layer's shape when the tags give it (AutoTP), else None.
    logical_shape: tuple[int, ...] | None
    #: Which tags said so, for messages: "autotp" or "megatron".
    source: str


def tp_slice(p: Tensor, name: str | None = None) -> TPSlice | None:
    """The tensor-parallel tags of ``p`` (called ``name`` in messages), or None when it carries
    none.

    Raises ``UnmappableLayoutError`` when AutoTP's metadata and the Megatron tags disagree
    (split on one, replicated on the other; or cut along different dims).
    """
    what = f"parameter {name!r} {tuple(p.shape)}" if name else f"a parameter {tuple(p.shape)}"
    flag = getattr(p, "tensor_model_parallel", None)
    if flag is None:
        flag = getattr(p, "model_parallel", None)
    meta = getattr(p, AUTOTP_META, None)
    if isinstance(meta, dict):
        split = not meta.get("replicated", False)
        if flag is not None and bool(flag) != split:
            raise UnmappableLayoutError(
                f"{what} has tensor_model_parallel={flag!r} but DeepSpeed AutoTP's "
                f"{AUTOTP_META} says replicated={meta.get('replicated')!r}; cannot tell whether "
                "it is a tensor-parallel slice."
            )
        dim = meta.get("partition_dim") if split else None
        tagged_dim = getattr(p, "partition_dim", None)
        if split and None not in (dim, tagged_dim) and dim != tagged_dim:
            raise UnmappableLayoutError(
                f"{what} has partition_dim={tagged_dim!r} but DeepSpeed AutoTP's {AUTOTP_META} "
                f"says partition_dim={dim!r}; cannot tell which dim it was cut along."
            )
        logical = meta.get("logical_shape") or meta.get("original_shape")
        return TPSlice(
            split=split,
            partition_dim=dim,
            logical_shape=tuple(logical) if logical is not None else None,
            source="autotp",
        )
    if flag is None:
        return None
    split = bool(flag)
    return TPSlice(
        split=split,
        partition_dim=getattr(p, "partition_dim", None) if split else None,
        logical_shape=None,
        source="megatron",
    )


def refuse_tp_slices(
    params: Sequence[Tensor], names: Sequence[str], adapter: str, owner: str
) -> None:
    """Refuse any tensor-parallel slice among ``params``: adapter ``adapter`` would otherwise
    take it for a whole layer and give it its slice's norm."""
    for p, name in zip(params, names, strict=True):
        tags = tp_slice(p, name)
        if tags is not None and tags.split:
            # Megatron tags its parallel layers even at TP size 1, where a slice is the layer.
            untag = (
                " If the model is not tensor-parallel (TP size 1), untag it: "
                "p.tensor_model_parallel = False."
                if tags.source == "megatron"
                else ""
            )
            raise UnmappableLayoutError(
                f"{owner}: parameter {name!r} ({tuple(p.shape)}) is tagged as a tensor-parallel "
                f"slice ({tags.source}: tensor_model_parallel / {AUTOTP_META}), but the "
                f"{adapter!r} layout cannot see its TP group and would use the slice's norm as "
                "the layer's (silently wrong trust ratios). Train it under DeepSpeed with the "
                "mpu (deepspeed.initialize(..., mpu=mpu) or tensor_parallel.autotp_size) and "
                "call tvlars_scale.deepspeed.bind(engine), or express tensor parallelism as "
                f"DTensors (torch.distributed.tensor.parallel).{untag}"
            )
