"""Which tensors the optimizer was given, kept across copies and pickles.

Layout discovery asks whether a tensor in ``param_groups`` came in through ``add_param_group``
(an original parameter) or was swapped in later by an engine (DeepSpeed's flat partitions): the
latter needs the engine's layout. That identity is part of the optimizer's state and must
survive ``copy.deepcopy`` and pickle like the rest of it; ids and weak references belong to
this process, so a copy carries it as positions in ``param_groups`` and rebuilds it for its own
tensors. The same goes for ``model_group``, whose process group or mesh is kept as its ranks.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch.distributed as dist
from torch import Tensor

from ..groups import ranks_of

__all__ = ["Originals", "check_no_duplicates", "portable_model_group"]


class Originals:
    """The tensors added through ``add_param_group``, by identity (weakly held)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensors: list[Tensor]) -> None:
        for t in tensors:
            self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def positions(self, param_groups: list[dict[str, Any]]) -> list[list[int]]:
        """Per group, the indices of its original tensors: what a copy carries."""
        return [[i for i, p in enumerate(g["params"]) if p in self] for g in param_groups]

    @classmethod
    def at(cls, param_groups: list[dict[str, Any]], positions: list[list[int]]) -> Originals:
        """The tensors at ``positions`` of ``param_groups`` (a copy's own tensors)."""
        originals = cls()
        for group, indices in zip(param_groups, positions, strict=False):
            originals.add([group["params"][i] for i in indices])
        return originals


def portable_model_group(spec: Any) -> Any:
    """``model_group`` as a copy or a pickle can hold it: a process group or a device mesh belongs
    to this process, so its global ranks are kept (``resolve_model_group`` takes a tuple)."""
    if isinstance(spec, dist.ProcessGroup):
        return ranks_of(spec)
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(spec, DeviceMesh):
        return tuple(sorted(spec.mesh.flatten().tolist()))
    return spec


def check_no_duplicates(owner: str, index: int, param_group: Any) -> None:
    """A tensor listed twice in a group would be stepped twice and counted twice in its layer's
    norm. torch only warns (and says it will raise); we raise now, as torch does for a tensor
    in two groups. Anything else malformed is left to torch's own checks."""
    if not isinstance(param_group, dict) or "params" not in param_group:
        return
    params = param_group["params"]
    if isinstance(params, (Tensor, set)):
        return
    params = param_group["params"] = list(params)  # may be a generator (torch does the same)
    first: dict[int, int] = {}
    for i, p in enumerate(params):
        t = p[1] if isinstance(p, tuple) else p
        j = first.setdefault(id(t), i)
        if j != i:
            raise ValueError(
                f"{owner}: param group {index} holds the same tensor twice (params[{j}] and "
                f"params[{i}]); each parameter must appear once in an optimizer"
            )
