"""Per-layer telemetry: the true (reduced) norms and ratios of the last optimizer step.

The optimizer keeps, per param group, references to the small per-layer tensors it computed
anyway. Nothing is copied to the host and nothing accumulates across steps: each step replaces
the previous one. ``LayerStats.to_dict`` is the one place that syncs, when the caller asks.

Names follow the paper: LWN = ||w||, LGN = the gradient norm the trust ratio used
(||g + wd*w|| with ``trust_denominator="combined"``, ||g|| with ``"sum"``; ||u|| for LAMB), and
LNR = LWN / LGN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerStats"]


@dataclass
class LayerStats:
    names: list[str]
    weight_norm: Tensor  # LWN, one entry per layer
    grad_norm: Tensor  # LGN
    trust_ratio: Tensor  # q: eta*LWN/LGN, 1 at the zero-norm fallback and for excluded layers
    scale: Tensor  # s: what multiplies the direction (phi * q for TVLARS)

    @property
    def norm_ratio(self) -> Tensor:
        """LNR = LWN / LGN (inf where LGN is 0)."""
        return self.weight_norm / self.grad_norm

    @staticmethod
    def concat(parts: list[LayerStats]) -> LayerStats:
        if not parts:
            empty = torch.zeros(0)
            return LayerStats([], empty, empty, empty, empty)
        return LayerStats(
            names=[n for p in parts for n in p.names],
            weight_norm=torch.cat([p.weight_norm for p in parts]),
            grad_norm=torch.cat([p.grad_norm for p in parts]),
            trust_ratio=torch.cat([p.trust_ratio for p in parts]),
            scale=torch.cat([p.scale for p in parts]),
        )

    def to_dict(self) -> dict[str, dict[str, float]]:
        """Host copy keyed by layer name (one device-to-host transfer)."""
        table = torch.stack(
            [self.weight_norm, self.grad_norm, self.trust_ratio, self.scale, self.norm_ratio]
        )
        rows = table.detach().double().cpu().T.tolist()
        keys = ("lwn", "lgn", "trust_ratio", "scale", "lnr")
        return {
            name: dict(zip(keys, row, strict=True))
            for name, row in zip(self.names, rows, strict=True)
        }
