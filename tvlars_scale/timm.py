"""timm: our optimizers by name in ``timm.optim.create_optimizer_v2``.

timm has its own ``lars`` and ``lamb`` (and ``larc``, ``nlars``, ``lambc``, ...), and reads an
optimizer name up to its last ``_`` (``lookahead_<name>``), so ours are registered as:

- ``"tvlars"``: ``TVLARS``
- ``"layerwiselars"``: ``LARS``
- ``"layerwiselamb"``: ``LAMB`` (the name a DeepSpeed JSON uses too, ``"LayerwiseLAMB"``)

``create_optimizer_v2(model, "tvlars", lr=..., weight_decay=...)`` passes timm's param groups:
1-D parameters and the model's ``no_weight_decay()`` names get weight decay 0. Our own
``exclude_bias_and_norm`` (default True) also takes 1-D parameters out of the trust ratio, as
the paper does; with ``filter_bias_and_bn=False`` pass ``exclude_bias_and_norm=False`` too, or
1-D parameters still get neither. Without ``lr``, each optimizer's documented default applies.

Registration is lazy, so timm stays optional and ``import tvlars_scale`` never imports it:
``tvlars_scale.register()`` (run on import) registers at once when ``timm.optim`` is already
imported, and otherwise right after it is first imported. A name timm already uses for another
optimizer is never replaced.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from typing import Any

from .optimizers import LAMB, LARS, TVLARS, LayerwiseOptimizer

__all__ = ["TIMM_NAMES", "register", "register_when_imported"]

#: timm names -> our classes.
TIMM_NAMES: dict[str, type[LayerwiseOptimizer]] = {
    "tvlars": TVLARS,
    "layerwiselars": LARS,
    "layerwiselamb": LAMB,
}

_DESCRIPTIONS = {
    "tvlars": "TVLARS (tvlars_scale): time-varying LARS, exact layer norms under sharding",
    "layerwiselars": "LARS (tvlars_scale): exact layer norms under sharding",
    "layerwiselamb": "LAMB (tvlars_scale): exact layer norms under sharding",
}


def register() -> list[str]:
    """Register our names in timm's optimizer registry (imports timm); returns the names set.

    Idempotent. Raises ``ImportError`` if timm is missing or predates its optimizer registry
    (timm 1.0.12).
    """
    # By module name, not attribute: right after timm.optim executes (the import hook below),
    # the timm package does not have its ``optim`` attribute yet.
    optim = importlib.import_module("timm.optim")
    factory = sys.modules.get("timm.optim._optim_factory")
    registry = getattr(factory, "default_registry", None)
    if registry is None or not hasattr(optim, "OptimInfo"):
        version = getattr(sys.modules.get("timm"), "__version__", "?")
        raise ImportError(
            f"tvlars_scale: timm {version} has no optimizer registry "
            "(timm.optim._optim_factory.default_registry); timm>=1.0.12 is needed"
        )
    known = set(optim.list_optimizers())
    registered = []
    for name, cls in TIMM_NAMES.items():
        if name in known:
            if optim.get_optimizer_info(name).opt_class is cls:
                registered.append(name)
            else:  # timm's own optimizer of that name: never replaced, but say so
                warnings.warn(
                    f"tvlars_scale: timm already has an optimizer named {name!r}; "
                    f"{cls.__name__} is not registered under it",
                    RuntimeWarning,
                    stacklevel=2,
                )
            continue
        lamb = cls is LAMB
        registry.register(
            optim.OptimInfo(
                name=name,
                opt_class=cls,
                description=_DESCRIPTIONS[name],
                has_eps=lamb,
                has_momentum=not lamb,
                has_betas=lamb,
            )
        )
        registered.append(name)
    return registered


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm.optim`` is about to be imported, it wraps that module's
    loader so that ``register()`` runs as soon as the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "timm.optim":
            return None
        sys.meta_path.remove(self)  # once is enough
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _Registering(spec.loader)
                return spec
        return None


class _Registering(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        try:
            register()
        except ImportError as exc:  # an old timm: say so, but never break the user's import
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self.loader, name)


def register_when_imported() -> None:
    """``register()`` now if ``timm.optim`` is imported, else right after its first import."""
    if "timm.optim" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
