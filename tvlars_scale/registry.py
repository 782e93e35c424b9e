"""Names under which the optimizers can be found: ``create_optimizer``, ``torch.optim``, timm.

DeepSpeed builds a JSON ``"optimizer": {"type": NAME}`` it does not know with
``getattr(torch.optim, NAME)`` (case-sensitive), so ``register()`` puts our classes there. It
never replaces a name torch already defines. DeepSpeed lower-cases and keeps for itself any
spelling of "lamb", so our LAMB is reachable from a JSON as ``"LayerwiseLAMB"``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import timm
from .optimizers import LAMB, LARS, TVLARS, LayerwiseOptimizer

__all__ = ["OPTIMIZERS", "create_optimizer", "register"]

#: Canonical names; lookups in ``create_optimizer`` are case-insensitive.
OPTIMIZERS: dict[str, type[LayerwiseOptimizer]] = {
    "TVLARS": TVLARS,
    "LARS": LARS,
    "LAMB": LAMB,
    "LayerwiseLAMB": LAMB,
}

#: Names set on ``torch.optim`` (DeepSpeed JSON "type" values), lower-case aliases included.
TORCH_OPTIM_NAMES: dict[str, type[LayerwiseOptimizer]] = {
    "TVLARS": TVLARS,
    "tvlars": TVLARS,
    "LARS": LARS,
    "lars": LARS,
    "LAMB": LAMB,
    "LayerwiseLAMB": LAMB,
}


def register() -> list[str]:
    """Make our optimizers resolvable as ``torch.optim.<name>``; returns the names set.

    Also registers them with timm (``tvlars_scale.timm``), lazily: at once if ``timm.optim`` is
    imported, else when it is. Runs on ``import tvlars_scale``. Idempotent; a name torch
    already defines is left alone.
    """
    registered = []
    for name, cls in TORCH_OPTIM_NAMES.items():
        existing = getattr(torch.optim, name, None)
        if existing is None or existing is cls:
            setattr(torch.optim, name, cls)
            registered.append(name)
    timm.register_when_imported()
    return registered


def create_optimizer(name: str, params: Any, **kwargs: Any) -> LayerwiseOptimizer:
    """Build an optimizer by name (case-insensitive): TVLARS, LARS, LAMB or LayerwiseLAMB.

    ``create_optimizer("tvlars", model.parameters(), lr=4.0)`` is ``TVLARS(model.parameters(),
    lr=4.0)``. Raises ``ValueError`` for another name, listing the known ones.
    """
    by_lower = {k.lower(): v for k, v in OPTIMIZERS.items()}
    cls = by_lower.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer name={name!r}; known names: {', '.join(OPTIMIZERS)}")
    return cls(params, **kwargs)
