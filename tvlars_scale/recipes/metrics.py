"""What a run writes: progress bar, ``metrics.jsonl``, ``layers.jsonl``, TensorBoard.

Only the main process writes. Files (one JSON object per line, appended, so a resumed run
continues the same files):

- ``metrics.jsonl``: ``{"kind": "train", "step", "epoch", "loss", "lr", "opt_step", "phi",
  "skipped_steps", "samples", "time", "samples_per_s"}`` every ``--log-every`` steps
  (``skipped_steps``: optimizer steps skipped so far because a gradient was non-finite on some
  rank, by the optimizer or by a DeepSpeed wrapper's own overflow check), and ``{"kind":
  "eval", "step", "epoch", "test_loss", "test_acc", "test_samples"}`` after each evaluation
  (plus ``val_loss``, ``val_acc``, ``val_samples`` with a validation split, ``--val-fraction``);
- ``layers.jsonl``: ``{"step", "layers": {name: {"lwn", "lgn", "lnr", "trust_ratio",
  "scale"}}}`` every ``--telemetry-every`` steps: the true (cross-rank) per-layer norms from
  ``optimizer.layer_stats()``; the only host sync they cost is on those steps;
- ``tensorboard/`` when the ``tensorboard`` package is installed.

``cursor()`` is the byte length of both files, saved with each checkpoint; a run resumed in the
same directory passes it back as ``rewind_to`` and the files are cut to it (records written after
the checkpoint by an attempt that crashed would otherwise appear twice). ``rewind_to={}`` starts
empty files; None appends.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["RunLogger"]

_FILES = ("metrics.jsonl", "layers.jsonl")


def _clean(value: Any) -> Any:
    # JSON has no inf/nan: write them as strings rather than produce an unreadable file.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunLogger:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        description: str = "train",
        rewind_to: dict[str, int] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._bar = self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if rewind_to is not None:
            for name in _FILES:
                path = self.run_dir / name
                if path.exists():
                    os.truncate(path, min(rewind_to.get(name, 0), path.stat().st_size))
        # Open for the whole run (appending one line per log step); closed by ``close``.
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115
        self._layers = open(self.run_dir / "layers.jsonl", "a")  # noqa: SIM115
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc=description, dynamic_ncols=True
            )
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def cursor(self) -> dict[str, int] | None:
        """Bytes written so far to each telemetry file (None on the other processes)."""
        if not self.enabled:
            return None
        return {"metrics.jsonl": self._metrics.tell(), "layers.jsonl": self._layers.tell()}

    def _write(self, stream, record: dict[str, Any]) -> None:
        stream.write(json.dumps(_clean(record)) + "\n")
        stream.flush()

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self._write(self._metrics, {"kind": kind, "step": step, **values})
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._bar is not None and kind == "eval":
            self._bar.write(
                f"step {step}: test accuracy {100 * values['test_acc']:.2f}% "
                f"({values['test_samples']} images), test loss {values['test_loss']:.4f}"
            )

    def layers(self, step: int, layers: dict[str, dict[str, float]]) -> None:
        if not self.enabled:
            return
        self._write(self._layers, {"step": step, "layers": layers})
        if self._tb is not None:
            for name, row in layers.items():
                self._tb.add_scalar(f"lnr/{name}", row["lnr"], step)

    def advance(self, steps: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._metrics.close()
        self._layers.close()
