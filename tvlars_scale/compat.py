"""What ``tvlars_scale`` needs from its environment: optional packages and engine internals.

- **Extras.** ``import tvlars_scale`` (the optimizers, every layout, the DeepSpeed JSON checks)
  needs torch only. The training recipes need the ``recipes`` extra, DeepSpeed the
  ``deepspeed`` extra. ``require_extra`` turns a missing package into an ``ImportError`` that
  names the ``pip install`` command, before anything else runs.
- **Internals.** The FSDP1 and DeepSpeed layouts read private attributes of the engines
  (``FlatParameter._shard_param_infos``, ``DeepSpeedZeroOptimizer.partition_size``, ...) that
  change between releases. ``internal`` and ``import_internal`` read them; a missing one means an
  engine version outside what the compatibility matrix ran (``docs/compatibility.md``), and the
  ``UnmappableLayoutError`` says so, naming the installed version and the supported range,
  instead of an ``AttributeError`` in the middle of a step.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from typing import Any

from torch.torch_version import TorchVersion

from .errors import UnmappableLayoutError

__all__ = [
    "EXTRAS",
    "SUPPORTED",
    "import_internal",
    "internal",
    "require_extra",
    "require_version",
]

#: Oldest and newest versions the compatibility matrix ran (docs/compatibility.md). The lower
#: bounds are those of pyproject.toml (a test checks); newer releases are not refused, but an
#: internal they removed is reported with this range.
SUPPORTED: dict[str, tuple[str, str]] = {
    "torch": ("2.9", "2.14.1"),
    "deepspeed": ("0.16.9", "0.19.8"),
}

#: Extra -> {module the code imports: distribution that provides it}, for the extras whose
#: absence the code reports itself (DeepSpeed is imported only by DeepSpeed's own launchers).
EXTRAS: dict[str, dict[str, str]] = {
    "recipes": {
        "accelerate": "accelerate",
        "matplotlib": "matplotlib",
        "numpy": "numpy",
        "sklearn": "scikit-learn",
        "torchvision": "torchvision",
        "tqdm": "tqdm",
    },
}


def require_extra(extra: str, *modules: str, what: str) -> None:
    """Raise ``ImportError`` unless ``modules`` of ``extra`` (default: all of them) are importable.

    ``what`` names the feature that needs them, e.g. ``"tvlars_scale.recipes"``.
    """
    wanted = EXTRAS[extra]
    missing = [wanted[m] for m in (modules or wanted) if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{what} needs {', '.join(missing)} (the {extra} extra of tvlars_scale): "
            f"run pip install -e '.[{extra}]' in a clone of tvlars_scale"
        )


def _installed_version(package: str) -> str:
    module = sys.modules.get(package)
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "(not installed)"
    return str(version)


def _unsupported(package: str, missing: str) -> UnmappableLayoutError:
    oldest, newest = SUPPORTED[package]
    return UnmappableLayoutError(
        f"tvlars_scale: {package} {_installed_version(package)} has no {missing}, which "
        f"tvlars_scale reads to map sharded tensors to layers. Supported: {package} >= {oldest} "
        f"(tested up to {newest}; docs/compatibility.md). Install a supported {package}, or "
        "report the version at which this changed."
    )


def internal(obj: Any, name: str, package: str) -> Any:
    """``obj.name``, an internal of ``package``'s; ``UnmappableLayoutError`` if it is missing."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _unsupported(package, f"{type(obj).__name__}.{name}") from None


def import_internal(module: str, name: str, package: str) -> Any:
    """``from module import name``; ``UnmappableLayoutError`` if either is missing."""
    try:
        return getattr(importlib.import_module(module), name)
    except AttributeError:
        pass
    except ModuleNotFoundError as exc:  # a module of its own missing, not a broken install
        if exc.name is None or not (module + ".").startswith(exc.name + "."):
            raise
    raise _unsupported(package, f"{module}.{name}")


def require_version(package: str, minimum: str, feature: str, found: str, instead: str) -> None:
    """``UnmappableLayoutError`` unless the installed ``package`` is at least ``minimum`` for
    ``feature``; ``found`` says what the compatibility matrix saw on older releases, ``instead``
    what works there."""
    installed = _installed_version(package)
    if TorchVersion(installed) < minimum:
        raise UnmappableLayoutError(
            f"tvlars_scale: {feature} needs {package} >= {minimum}; {package} {installed} is "
            f"installed. {found} (docs/compatibility.md). Upgrade {package}, or use {instead}."
        )
