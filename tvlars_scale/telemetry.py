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
    """The per-layer norms and ratios of an optimizer's last step: ``optimizer.layer_stats()``.

    Every tensor has one entry per logical layer of the optimizer's param groups, in the order
    of ``names``: shape (L,), on the device the step ran on. The values are those of the whole
    layers (reduced across ranks), the same on every rank that holds a piece of a layer. Excluded
    layers (biases, norm gains) are included. Nothing is copied to the host until ``to_dict``.

    Attributes:
        names: the layers' names: the parameter names when the optimizer was given
            ``named_parameters()`` (or the engine knows them), else ``"<group>.<index>"``.
        weight_norm: LWN = ||w||.
        grad_norm: LGN, the norm in the trust ratio's denominator: ||g + wd*w|| (LARS, TVLARS
            with ``trust_denominator="combined"``), ||g|| (``"sum"``), ||u|| (LAMB).
        trust_ratio: LARS and TVLARS: q = eta*||w||/LGN; LAMB: ||w||/||u||. 1 where either norm
            is 0 and for excluded layers.
        scale: what multiplies the layer's direction in the update: phi(t)*q for TVLARS (phi or
            1 for excluded layers), q for LARS and LAMB.
    """

    names: list[str]
    weight_norm: Tensor
    grad_norm: Tensor
    trust_ratio: Tensor
    scale: Tensor

    @property
    def norm_ratio(self) -> Tensor:
        """LNR = LWN / LGN (inf where LGN is 0)."""
        return self.weight_norm / self.grad_norm

    @staticmethod
    def concat(parts: list[LayerStats]) -> LayerStats:
        """The layers of ``parts`` one after the other (the param groups of an optimizer)."""
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
        """A host copy: ``{layer name: {"lwn", "lgn", "trust_ratio", "scale", "lnr"}}``, Python
        floats (``weight_norm``, ``grad_norm``, ``trust_ratio``, ``scale``, ``norm_ratio``), in
        one device-to-host transfer: the only host sync of the telemetry."""
        table = torch.stack(
            [self.weight_norm, self.grad_norm, self.trust_ratio, self.scale, self.norm_ratio]
        )
        rows = table.detach().double().cpu().T.tolist()
        keys = ("lwn", "lgn", "trust_ratio", "scale", "lnr")
        return {
            name: dict(zip(keys, row, strict=True))
            for name, row in zip(self.names, rows, strict=True)
        }
