"""Checkpoints every N steps, atomic on disk, and a ``--resume`` that continues exactly.

What makes a resumed run identical to an uninterrupted one:

- the optimizer state, including the per-group step counters TVLARS' phi(t) reads (and the
  skipped-step counters);
- the model (and DeepSpeed engine) state;
- ``TrainState.step`` (``train_state.json``): the data position (epoch, step in the epoch) and
  the LR schedule are pure functions of it (``batching``, ``optim.LRController``), and
  augmentation is seeded per step (``augment``). The file also records what the data order
  depends on (seed, global batch) and what fixes the optimizer and its schedules over the run
  (``optim.fixed_over_run``: the run's length, LR, TVLARS' decay, ...), and refuses a resume
  that would change them: the optimizer's param groups come from the checkpoint, while the LR
  schedules would follow the new command line;
- the RNG states of every process, for anything else that draws random numbers;
- the telemetry cursor: the byte length of ``metrics.jsonl`` / ``layers.jsonl`` at the
  checkpoint. Resuming in the same run directory cuts the files back to it, so the records a
  crashed attempt wrote after its last checkpoint are not duplicated.

Engines: under accelerate (DDP, DeepSpeed, accelerate's FSDP) ``Accelerator.save_state`` /
``load_state`` (DDP: ``torch.save`` on the main process; DeepSpeed: ``engine.save_checkpoint``).
A model sharded here with ``fully_shard`` (``--fsdp2``) is not known to accelerate; it goes
through ``torch.distributed.checkpoint`` (sharded and reshardable: a checkpoint taken at one
world size loads at another), with the RNG states saved per rank. A DeepSpeed ZeRO checkpoint
holds one optimizer partition per rank, so it loads at its own world size only: DeepSpeed's
universal conversion (``deepspeed.checkpoint.ds_to_universal``, 0.19.8) extracts the
``exp_avg``/``exp_avg_sq`` states of Adam by name and has no place for TVLARS' momentum, so
another world size is refused before loading, with that explanation.

Safe loading: every file a checkpoint holds loads with ``torch.load(weights_only=True)``, so a
shared checkpoint cannot run code: the optimizer state is tensors and plain values, and the RNG
states are written as such (numpy's as a tensor, not a pickled array). accelerate's own
``random_states_N.pkl`` holds numpy arrays, which its loader reads with ``weights_only=True`` and
numpy's array reconstruction allowed. ``torch.distributed.checkpoint`` reads the non-tensor
items (param group values) with ``weights_only=False`` (torch 2.14): ``load_sharded`` checks
each with ``weights_only=True`` first. Two parts are the engines' own formats and are not
covered: DCP's ``.metadata`` file is a plain pickle, and DeepSpeed's ZeRO files pickle DeepSpeed
objects (its loss scaler, ``ZeroStageEnum``, fragment addresses), which DeepSpeed loads with
``weights_only=False`` (docs/integrations.md).

Atomicity: a checkpoint is written into ``step_NNNNNNN.partial/``; when every rank is done the
main process writes ``train_state.json`` last and renames the folder to ``step_NNNNNNN``. A crash
at any point leaves either no ``step_NNNNNNN`` folder or a complete one, and only complete ones
(``train_state.json`` present, name without suffix) are ever resumed from. The newest ``keep``
are kept.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, option_value

__all__ = [
    "Checkpointer",
    "TrainState",
    "latest_checkpoint",
    "load_sharded",
    "resolve_resume",
    "save_sharded",
]

_PREFIX = "step_"
_COMPLETE = re.compile(rf"{_PREFIX}\d{{7}}")
_STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Optimizer steps taken (= global batches consumed) by the run, and, once loaded, the
    checkpoint's record of the run (``saved``: world size, engine, data order, telemetry)."""

    step: int = 0
    saved: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.saved = dict(state)


def _complete(path: Path) -> bool:
    return _COMPLETE.fullmatch(path.name) is not None and (path / _STATE_FILE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (None if it has none)."""
    folder = Path(run_dir) / "checkpoints"
    found = sorted(p for p in folder.glob(f"{_PREFIX}*") if _complete(p))
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
    if not _complete(path):
        raise ConfigError(
            f"--resume={resume!r}: no complete checkpoint there (expected a folder "
            f"RUN_DIR/checkpoints/{_PREFIX}NNNNNNN with {_STATE_FILE}, a run directory, or 'auto')"
        )
    return path


def save_sharded(path: str | Path, model, optimizer, rank: int) -> None:
    """``torch.distributed.checkpoint`` of an FSDP2 model and its optimizer, plus this rank's
    RNG states. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save(_rng_states(), Path(path) / f"rng_{rank}.pt")


def load_sharded(path: str | Path, model, optimizer, rank: int) -> None:
    """Load what ``save_sharded`` wrote, at any world size (DCP reshards on load). The RNG
    states are restored when this rank existed in the saving run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), planner=_weights_only_planner())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    rng = Path(path) / f"rng_{rank}.pt"
    if rng.is_file():
        _set_rng_states(torch.load(rng, weights_only=True))


def _weights_only_planner():
    """DCP's default load planner, refusing any non-tensor item that ``weights_only=True`` would
    refuse (the default reads them with ``weights_only=False``). Items are small values (param
    group settings), so reading each twice costs nothing. Built on use: DCP is imported lazily."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = value.getvalue()
            torch.load(io.BytesIO(data), weights_only=True)
            super().load_bytes(read_item, io.BytesIO(data))

    return WeightsOnlyLoadPlanner()


class Checkpointer:
    """Saves and loads the run's checkpoints. ``run`` describes the run for ``train_state.json``
    (``model``: the recipe and the options that make its network and data, ``seed``,
    ``global_batch``, ``steps_per_epoch``, ``total_steps``, ``optimizer``: option -> value, from
    ``optim.fixed_over_run``); the resume checks read it. A checkpoint without a key (written
    before it was recorded) is not checked on it: ``load`` then returns a warning naming what
    was not checked."""

    def __init__(
        self,
        accelerator,
        run_dir: str | Path,
        model,
        optimizer,
        state: TrainState,
        keep: int = 2,
        run: dict[str, Any] | None = None,
    ) -> None:
        from accelerate.utils import DistributedType
        from torch.distributed.fsdp import FSDPModule

        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / "checkpoints"
        self.model, self.optimizer, self.state = model, optimizer, state
        self.keep = keep
        self.run = dict(run or {})
        # A model accelerate did not prepare (our own fully_shard) needs torch's DCP.
        self.sharded_here = (
            isinstance(model, FSDPModule) and accelerator.distributed_type != DistributedType.FSDP
        )
        self.engine = (
            "fsdp2"
            if self.sharded_here
            else str(accelerator.distributed_type).rsplit(".", 1)[-1].lower()
        )

    def save(self, telemetry: dict[str, int] | None = None) -> Path:
        """Write checkpoint ``step_NNNNNNN`` (collective). ``telemetry``: the main process's
        ``RunLogger.cursor()``."""
        accelerator = self.accelerator
        final = self.folder / f"{_PREFIX}{self.state.step:07d}"
        partial = final.with_name(final.name + ".partial")
        if accelerator.is_main_process:  # left over by a crash: start clean
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self.sharded_here:
            save_sharded(partial, self.model, self._inner_optimizer(), accelerator.process_index)
        else:
            accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._write_state(partial / _STATE_FILE, telemetry)
            if final.exists():  # the same step saved again (a restarted run): replace it
                stale = final.with_name(final.name + ".stale")
                shutil.rmtree(stale, ignore_errors=True)
                final.rename(stale)
                shutil.rmtree(stale)
            partial.rename(final)
            _fsync_dir(self.folder)
            complete = sorted(p for p in self.folder.glob(f"{_PREFIX}*") if _complete(p))
            for old in complete[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _write_state(self, path: Path, telemetry: dict[str, int] | None) -> None:
        step, per_epoch = self.state.step, self.run.get("steps_per_epoch")
        record = self.state.state_dict() | self.run
        record.update(world_size=self.accelerator.num_processes, engine=self.engine)
        if per_epoch:
            record["epoch"], record["step_in_epoch"] = divmod(step, per_epoch)
        if telemetry is not None:
            record["telemetry"] = telemetry
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def load(self, path: str | Path) -> list[str]:
        """Check the checkpoint against this run, then load it. Returns warnings to print."""
        path = Path(path)
        saved = json.loads((path / _STATE_FILE).read_text())
        self._check_compatible(path, saved)
        try:
            if self.sharded_here:
                load_sharded(
                    path, self.model, self._inner_optimizer(), self.accelerator.process_index
                )
            else:
                self.accelerator.load_state(str(path))
        except RuntimeError as exc:  # torch's strict load_state_dict lists every mismatch
            if "Error(s) in loading state_dict" not in str(exc):
                raise
            first = next((x.strip() for x in str(exc).splitlines()[1:] if x.strip()), "")
            raise ConfigError(
                f"--resume={path}: its weights do not fit this run's network "
                f"({first.rstrip('.')}); resume with the options of the run that wrote it "
                "(--model, --width, --stem, --dataset, --projector)"
            ) from None
        self.state.load_state_dict(saved)
        return self._unchecked(path, saved)

    def _unchecked(self, path: Path, saved: dict[str, Any]) -> list[str]:
        """What a checkpoint written before it was recorded cannot be checked on: accepted (it
        may be a long run's), with a warning, since a change there would go unnoticed."""
        missing = [
            what
            for key, what in (
                ("model", "the recipe, --model and --dataset"),
                ("optimizer", "--optimizer and its settings"),
            )
            if key in self.run and key not in saved
        ]
        if not missing:
            return []
        return [
            f"warning: --resume={path}: the checkpoint does not record {' or '.join(missing)} "
            "(written by an earlier version), so a change of them is not refused: make sure "
            "this run's are those of the run that wrote it"
        ]

    def telemetry_cursor(self, path: Path | None) -> dict[str, int] | None:
        """Where the telemetry files of this run directory resume: the checkpoint's cursor when
        it is one of this run's checkpoints, empty files for a fresh start, None (append) when
        the checkpoint comes from another run directory."""
        if path is None:
            return {}
        if Path(path).resolve().parent != self.folder.resolve():
            return None
        return self.state.saved.get("telemetry")

    def _check_compatible(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse, before loading anything, a resume that could not continue the same run."""
        self._check_model(path, saved)
        for key, option in (("seed", "--seed"), ("global_batch", "--global-batch-size")):
            if key in saved and key in self.run and saved[key] != self.run[key]:
                raise ConfigError(
                    f"--resume={path}: the checkpoint was taken with {option}={saved[key]}, this "
                    f"run has {option}={self.run[key]}; the data order (and the schedules) would "
                    f"change: resume with {option}={saved[key]}"
                )
        self._check_optimizer(path, saved)
        engine = saved.get("engine")
        if engine is not None and engine != self.engine:
            raise ConfigError(
                f"--resume={path}: the checkpoint was written by {engine}, this run uses "
                f"{self.engine}; resume it with the same engine (launcher and --fsdp2 / DeepSpeed "
                "config)"
            )
        world = saved.get("world_size")
        if self.engine == "deepspeed" and world not in (None, self.accelerator.num_processes):
            raise ConfigError(
                f"--resume={path}: a DeepSpeed ZeRO checkpoint holds one optimizer partition per "
                f"rank and was written by {world} processes, this run has "
                f"{self.accelerator.num_processes}; resume with {world} processes, or train with "
                "--fsdp2, whose checkpoints reshard (DeepSpeed's universal checkpoint conversion, "
                "ds_to_universal, reads Adam's exp_avg/exp_avg_sq only, not the momentum and "
                "step counters of TVLARS/LARS)"
            )

    def _check_model(self, path: Path, saved: dict[str, Any]) -> None:
        """The weights are those of one recipe's network trained on one dataset: another
        network whose shapes happen to match would load, and train on from the wrong start."""
        old, new = saved.get("model"), self.run.get("model")
        if not (isinstance(old, dict) and isinstance(new, dict)):
            return
        if "recipe" in old and old["recipe"] != new.get("recipe"):
            raise ConfigError(
                f"--resume={path}: the checkpoint was written by the {old['recipe']} recipe, "
                f"this is the {new.get('recipe')} recipe; resume it with the script that wrote it"
            )
        for option in (o for o in new if o in old and o != "recipe"):
            if old[option] != new[option]:
                was, now = option_value(option, old[option]), option_value(option, new[option])
                raise ConfigError(
                    f"--resume={path}: the checkpoint was taken with {was}, this run has {now}; "
                    f"its weights are of that network and data: resume with {was}, or start a "
                    "new run in another --output-dir"
                )

    def _check_optimizer(self, path: Path, saved: dict[str, Any]) -> None:
        """The optimizer's param groups (TVLARS' total_steps and lmbda, the LR, ...) are loaded
        from the checkpoint while the LR schedules are rebuilt from the command line: a changed
        option would be half applied, so it is refused. --max-steps is not among them."""
        old, new = saved.get("optimizer"), self.run.get("optimizer")
        if isinstance(old, dict) and isinstance(new, dict):
            # Only options both records hold: one recorded by another version is not a change.
            for option in (o for o in new if o in old):
                if not _same(old[option], new[option]):
                    was, now = option_value(option, old[option]), option_value(option, new[option])
                    raise ConfigError(
                        f"--resume={path}: the checkpoint was taken with {was}, this run has "
                        f"{now}; the optimizer and its schedule are fixed for a whole run (a "
                        "resume keeps the checkpoint's optimizer settings, so the change would be "
                        f"half applied): resume with {was}, or start a new run in another "
                        "--output-dir (--max-steps may change)"
                    )
        steps = saved.get("total_steps"), self.run.get("total_steps")
        if None not in steps and steps[0] != steps[1]:
            raise ConfigError(
                f"--resume={path}: the checkpoint was taken in a run of {steps[0]} optimizer "
                f"steps, this run has {steps[1]} (--epochs x {self.run.get('steps_per_epoch')} "
                "steps per epoch); TVLARS' phi and the LR schedules span the run: resume with "
                "the same --epochs and training set"
            )

    def _inner_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # unwrap accelerate's


def _same(a: Any, b: Any) -> bool:
    """Equal, for numbers up to rounding (a resolved default against the same value given)."""
    numbers = all(isinstance(x, Real) and not isinstance(x, bool) for x in (a, b))
    return math.isclose(a, b, rel_tol=1e-9) if numbers else a == b


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the parent)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_states() -> dict[str, Any]:
    """Every RNG state as tensors and plain Python values, so that it loads with
    ``weights_only=True`` (numpy's state holds an ndarray, which would need a pickled global)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    name, key, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
