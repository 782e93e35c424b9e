"""Run a function on N CPU ranks (gloo) from a pytest test, and collect what each rank returns.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` processes with
``torch.multiprocessing`` (spawn), sets the torchrun environment variables, initialises a gloo
process group, calls ``fn(rank, world_size, *args)`` and returns the per-rank results (anything
``torch.save`` can write). ``fn`` must be a module-level function of an importable module (a
test module is fine: spawn re-imports it by name). A failure on any rank fails the test with
that rank's traceback.
"""

from __future__ import annotations

import os
import pathlib
import socket
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Written then renamed: a rank killed mid-write leaves no result that looks complete.
        path = os.path.join(out_dir, f"rank{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _entry,
                args=(fn, world_size, free_port(), out_dir, args),
                nprocs=world_size,
                start_method="spawn",
            )
        except Exception as exc:
            errors = [
                pathlib.Path(out_dir, name).read_text()
                for name in sorted(os.listdir(out_dir))
                if name.endswith(".err")
            ]
            finished = all(
                os.path.exists(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)
            )
            if errors or not finished:
                raise AssertionError("a rank failed:\n" + "\n".join(errors)) from exc
            # Every rank returned its result and then died while shutting down (gloo's threads
            # can abort "terminate called without an active exception" at interpreter exit):
            # the results are complete, the crash is not the code under test.
            warnings.warn(f"a rank crashed after returning its result: {exc}", stacklevel=2)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
