"""TVLARS, LARS and LAMB (kept importable here; they live in ``tvlars_scale.optim``)."""

from .optim import LAMB, LARS, PRESETS, TRUST_DENOMINATORS, TVLARS, LayerwiseOptimizer

__all__ = ["LAMB", "LARS", "PRESETS", "TRUST_DENOMINATORS", "TVLARS", "LayerwiseOptimizer"]
