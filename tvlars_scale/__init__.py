"""tvlars_scale: TVLARS, LARS and LAMB with exact layer-wise norms under sharding.

Importing the package registers ``torch.optim.TVLARS``, ``LARS``, ``LAMB`` and
``LayerwiseLAMB`` so that a DeepSpeed JSON ``"optimizer": {"type": "TVLARS"}`` resolves.
"""

from . import deepspeed, fsdp  # noqa: F401  (the engines' bind() calls; neither imports DeepSpeed)
from .errors import UnmappableLayoutError
from .functional import tvlars_factor
from .optim import LAMB, LARS, TVLARS, LayerwiseOptimizer
from .registry import OPTIMIZERS, create_optimizer, register
from .schedules import TVLARSPhi, TVLARSSchedule, polynomial_decay, sqrt_scaled_lr, warmup_cosine
from .telemetry import LayerStats

# The one place the version is written: pyproject.toml reads it (setuptools attr:), CITATION.cff
# repeats it and CHANGELOG.md says what it holds (tests/test_packaging.py).
__version__ = "0.1.0"
__all__ = [
    "LAMB",
    "LARS",
    "OPTIMIZERS",
    "TVLARS",
    "LayerStats",
    "LayerwiseOptimizer",
    "TVLARSPhi",
    "TVLARSSchedule",
    "UnmappableLayoutError",
    "create_optimizer",
    "polynomial_decay",
    "register",
    "sqrt_scaled_lr",
    "tvlars_factor",
    "warmup_cosine",
]

register()
