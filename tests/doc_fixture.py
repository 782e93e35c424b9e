"""The fixture that completes the Python fragments of the docs, and the runner that runs them.

A fragment (a block marked ``<!-- doctest: NAME -->`` that tests/test_doc_examples.py lists in
``FRAGMENTS``) runs as written, with these names already defined, and nothing else:

- ``model``: a small ``nn.Module`` (``Model`` below) with ``model.blocks``, two residual blocks
  whose ``block.mlp`` has ``up`` and ``down`` Linear layers and whose ``block.norm`` is a
  LayerNorm, and a ``head``: 8 features in, 4 classes out, 628 parameters, seeded;
- ``loader``: a ``DataLoader`` of 4 batches of 8 ``(x, y)`` pairs, ``x`` of shape (8, 8);
- ``loss_fn``: ``nn.CrossEntropyLoss()``; ``epochs``: 2; ``device``: ``torch.device("cpu")``;
- ``tvlars_scale``: the package (imported by an earlier block of the same page);
- on 2 ranks: ``mesh``, ``init_device_mesh("cpu", (2,))``, with the gloo process group that
  ``torchrun`` plus the reader's own ``init_process_group`` would have set up.

Each fragment gets a fresh fixture (a new model, the same seed). After it, the runner looks for
the optimizer the fragment built (``optimizer`` or ``opt``; accelerate's wrapper is unwrapped),
takes one training step through the fixture's ``loss_fn`` and the fragment's ``model`` if the
fragment took none, and records, per rank, the optimizer's class, its step count and its
``layer_stats().to_dict()``.

    python tests/doc_fixture.py OUT_DIR NAME=FILE [NAME=FILE ...]             # one process
    torchrun --nproc_per_node 2 tests/doc_fixture.py OUT_DIR NAME=FILE ...    # two ranks

Writes ``OUT_DIR/NAME.rank<R>.json``: ``{"ok": true, "class", "steps", "stats"}`` or ``{"ok":
false, "error": traceback}``. A fragment's failure does not stop the others.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tvlars_scale

#: Fragments that build an optimizer but must not be stepped here (a first fused step compiles
#: for 10+ s on 2 cores; what it compiles is tested in tests/test_fused.py).
NO_STEP = {"fused-flag"}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(8), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fixture(mesh: Any = None) -> dict[str, Any]:
    """The names a fragment may use without defining them (a fresh set per fragment)."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    names = {
        "model": Model(),
        "loader": DataLoader(data, batch_size=8),
        "loss_fn": nn.CrossEntropyLoss(),
        "epochs": 2,
        "device": torch.device("cpu"),
        "tvlars_scale": tvlars_scale,
    }
    if mesh is not None:
        names["mesh"] = mesh
    return names


def optimizer_of(g: dict[str, Any]) -> tvlars_scale.LayerwiseOptimizer:
    found = g.get("optimizer", g.get("opt"))
    inner = getattr(found, "optimizer", None)  # accelerate's AcceleratedOptimizer
    if not isinstance(found, tvlars_scale.LayerwiseOptimizer) and inner is not None:
        found = inner
    if not isinstance(found, tvlars_scale.LayerwiseOptimizer):
        raise AssertionError(f"the fragment built no tvlars_scale optimizer (found {found!r})")
    return found


def steps_taken(optimizer: tvlars_scale.LayerwiseOptimizer) -> int:
    counts = [float(g["step"]) for g in optimizer.param_groups if "step" in g]
    return int(max(counts, default=0))


def run(name: str, path: str, mesh: Any) -> dict[str, Any]:
    g = runpy.run_path(path, init_globals=fixture(mesh), run_name="__main__")
    optimizer = optimizer_of(g)
    if steps_taken(optimizer) == 0 and name not in NO_STEP:
        x, y = next(iter(g["loader"]))
        optimizer.zero_grad()
        g["loss_fn"](g["model"](x), y).backward()
        optimizer.step()
    return {
        "ok": True,
        "class": type(optimizer).__name__,
        "steps": steps_taken(optimizer),
        "stats": optimizer.layer_stats().to_dict(),
    }


def main(out_dir: str, fragments: list[str]) -> None:
    torch.set_num_threads(1)
    mesh = None
    rank = 0
    if "WORLD_SIZE" in os.environ:  # under torchrun
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for spec in fragments:
        name, _, path = spec.partition("=")
        try:
            result = run(name, path, mesh)
        except BaseException:
            result = {"ok": False, "error": traceback.format_exc()}
        with open(os.path.join(out_dir, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if mesh is not None:
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
