"""The optimizers: one layer-wise core (``base``), two rules (``lars``: LARS and TVLARS;
``lamb``: LAMB).

- ``plan.py``: discovery of each group's layout, its state, local views and step counters;
- ``loading.py``: what a state dict must hold to load, checked before ``load_state_dict`` changes
  anything;
- ``mode.py``: how a step runs (decision on the host or the device, fused or eager), decided
  once per step;
- ``base.py``: ``LayerwiseOptimizer``, the step the rules share;
- ``lars.py``, ``lamb.py``: the rules.

docs/design.md describes the rule, the layout protocol, the reduction and the decision.
"""

from .base import LayerwiseOptimizer
from .lamb import LAMB
from .lars import LARS, PRESETS, TRUST_DENOMINATORS, TVLARS

__all__ = ["LAMB", "LARS", "PRESETS", "TRUST_DENOMINATORS", "TVLARS", "LayerwiseOptimizer"]
