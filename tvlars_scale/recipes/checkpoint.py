"""Checkpoints every N steps, and a ``--resume`` that continues exactly.

What makes a resumed run identical to an uninterrupted one:

- the optimizer state, including the per-group step counters TVLARS' phi(t) reads;
- the model (and DeepSpeed engine) state;
- ``TrainState.step`` (``train_state.json``): the data position and the LR schedule are pure
  functions of it (``batching``, ``optim.LRController``), and augmentation is seeded per step
  (``augment``);
- the RNG states of every process, for anything else that draws random numbers.

Under accelerate (DDP, DeepSpeed, accelerate's FSDP) this is ``Accelerator.save_state`` /
``load_state``. A model sharded here with ``fully_shard``
(``--fsdp2``) is not known to accelerate; it goes through ``torch.distributed.checkpoint``
(sharded, reshardable), with the RNG states saved per rank.

Layout: ``RUN_DIR/checkpoints/step_0000123/``; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError

__all__ = ["Checkpointer", "TrainState", "latest_checkpoint", "resolve_resume"]

_PREFIX = "step_"


@dataclass
class TrainState:
    """Optimizer steps taken (= global batches consumed) by the run."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    # train_state.json is written last: a folder without it is an interrupted save.
    found = sorted(p for p in folder.glob(f"{_PREFIX}*") if (p / "train_state.json").is_file())
    return found[-1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``--resume``: None, ``auto`` (the newest checkpoint of the run, if any), or a path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory: take its newest checkpoint
        path = latest_checkpoint(path) or path
    if not (path / "train_state.json").is_file():
        raise ConfigError(
            f"--resume={resume!r}: no checkpoint there (expected a folder "
            f"RUN_DIR/checkpoints/{_PREFIX}NNNNNNN with train_state.json, a run directory, or 'auto')"
        )
    return path


class Checkpointer:
    def __init__(
        self, accelerator, run_dir: str | Path, model, optimizer, state: TrainState, keep: int = 2
    ) -> None:
        from accelerate.utils import DistributedType
        from torch.distributed.fsdp import FSDPModule

        self.accelerator = accelerator
        self.folder = Path(run_dir) / "checkpoints"
        self.model, self.optimizer, self.state = model, optimizer, state
        self.keep = keep
        # A model accelerate did not prepare (our own fully_shard) needs torch's DCP.
        self.sharded_here = (
            isinstance(model, FSDPModule) and accelerator.distributed_type != DistributedType.FSDP
        )

    def save(self) -> Path:
        path = self.folder / f"{_PREFIX}{self.state.step:07d}"
        if self.sharded_here:
            self._save_dcp(path)
        else:
            self.accelerator.save_state(str(path))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            (path / "train_state.json").write_text(json.dumps(self.state.state_dict()))
            for old in sorted(self.folder.glob(f"{_PREFIX}*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path)
        if self.sharded_here:
            self._load_dcp(path)
        else:
            self.accelerator.load_state(str(path))
        self.state.load_state_dict(json.loads((path / "train_state.json").read_text()))

    # -- model sharded with fully_shard by the recipe -------------------------------------
    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's

    def _save_dcp(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self._inner_optimizer())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        rank = self.accelerator.process_index
        torch.save(_rng_states(), path / f"rng_{rank}.pt")

    def _load_dcp(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self._inner_optimizer())
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.model,
            self._inner_optimizer(),
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        rng = path / f"rng_{self.accelerator.process_index}.pt"
        if rng.is_file():
            _set_rng_states(torch.load(rng, weights_only=False))


def _rng_states() -> dict[str, Any]:
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
