"""The errors the package raises beyond Python's own, in a leaf module: every other module may
import it (the layouts, the engine-version checks in ``compat``, the optimizers) without
importing each other."""

from __future__ import annotations

__all__ = ["UnmappableLayoutError"]


class UnmappableLayoutError(RuntimeError):
    """A tensor in ``param_groups`` cannot be mapped to logical layers exactly: an unknown
    placement or wrapper, a missing ``bind``, an engine version whose internals differ. Raised
    at the first ``step()`` that meets it, never answered with an approximate layout."""
