"""FSDP integration: the one call FSDP1 may need, next to ``tvlars_scale.deepspeed.bind``.

FSDP2 (``fully_shard``, HSDP) and FSDP1 with ``use_orig_params=False`` need nothing: the
optimizer maps the sharded tensors to layers by itself at its first ``step()``. FSDP1 with
``use_orig_params=True`` (1-D views that carry no link back to their FlatParameter), HYBRID_SHARD
and FSDP1 over a tensor-parallel model (``device_mesh=mesh["dp"]``: shard groups the
FlatParameter does not record) need ``bind(model)`` once, after wrapping; without it the first
``step()`` raises an error that names this call.
"""

from .layouts.fsdp1 import bind

__all__ = ["bind"]
