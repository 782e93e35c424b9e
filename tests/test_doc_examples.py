"""The DeepSpeed examples of the docs run as written (issue #24).

Each runnable block is marked in its markdown file by a comment on the line before its fence,
``<!-- doctest: NAME -->``; these tests extract the block verbatim and run it in a subprocess on
this CPU-only machine (gloo), with a timeout:

- JSON configs: written to ``ds.json`` and handed to ``deepspeed.initialize`` by the snippet of
  docs/integrations.md (one process, env:// rendezvous), then one training step; the README's
  also under ``accelerate launch --use_deepspeed`` (2 processes) with the accelerate program of
  docs/deepspeed.md;
- the programs of docs/deepspeed.md: under ``torchrun`` (2 ranks; the block says "or torchrun")
  and under the ``accelerate launch`` command of the doc, with 2 processes instead of 8;
- the CPU DeepSpeed command of launch/README.md, as written but for ``--output-dir``.

What the harness adds, and nothing else: a free port; ``DS_ACCELERATOR=cpu`` and no visible GPU;
``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`` before the block runs (skips
a 2-minute JIT build of an optional CPU op; the other DeepSpeed tests do the same); for
accelerate, ``PartialState(backend="gloo")`` before the block, as docs/deepspeed.md says to do on
a CPU-only machine; for the integrations snippet, the ``model`` it refers to. After the block the
runner prints, per rank, what the engine it built looks like (world size, wrapper, steps taken),
and the tests check that.

About 55 s in all on 2 cores (the launch recipe 18 s, each of the others 5-8 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from multirank import free_port

pytest.importorskip("deepspeed", reason='DeepSpeed is not installed: pip install -e ".[deepspeed]"')

ROOT = Path(__file__).resolve().parents[1]
DOCS = {
    "readme": ROOT / "README.md",
    "integrations": ROOT / "docs" / "integrations.md",
    "deepspeed": ROOT / "docs" / "deepspeed.md",
    "launch": ROOT / "launch" / "README.md",
}
MARKER = re.compile(r"^<!-- doctest: ([\w-]+) -->\n```(\w*)\n(.*?)^```$", re.S | re.M)
TIMEOUT = 120  # each run takes 5-25 s
WORLD = 2  # processes for the multi-rank examples (the docs say 8 GPUs)

# name -> test that runs it; test_every_marked_block_is_run checks this covers every marker.
RUN_BY = {
    "readme-ds-json": "test_json_with_deepspeed_initialize, test_readme_json_under_accelerate",
    "integrations-ds-json": "test_json_with_deepspeed_initialize",
    "integrations-ds-initialize": "test_json_with_deepspeed_initialize",
    "deepspeed-json-optimizer": "test_optimizer_fragment_passes_check_config",
    "deepspeed-train": "test_deepspeed_program_under_torchrun",
    "accelerate-train": "test_accelerate_program, test_readme_json_under_accelerate",
    "accelerate-launch": "test_accelerate_program",
    "launch-deepspeed-cpu": "test_launch_recipe_under_deepspeed_on_cpu",
}

RUNNER = """\
import json, os, runpy, sys

import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 2-minute JIT build
if os.environ.get("DOCTEST_ACCELERATE"):
    from accelerate import PartialState

    PartialState(backend="gloo")  # on CPU; see docs/deepspeed.md
init = {}
if os.environ.get("DOCTEST_MODEL"):  # the `model` a snippet refers to
    import torch

    init["model"] = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    )
g = runpy.run_path(sys.argv[1], init_globals=init, run_name="__main__")

import torch
import torch.distributed as dist

import tvlars_scale

engine = g.get("engine", g.get("model"))
if os.environ.get("DOCTEST_STEP"):  # one training step through the engine the snippet built
    micro = engine.train_micro_batch_size_per_gpu()
    x = torch.randn(micro, 8).to(engine.device, torch.float32)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    expected_steps = 1
else:
    expected_steps = len(g["loader"])
result = {
    "rank": dist.get_rank(),
    "world": dist.get_world_size(),
    "wrapper": type(engine.optimizer).__name__,
    "basic": type(engine.basic_optimizer).__name__,
    "is_tvlars": isinstance(engine.basic_optimizer, tvlars_scale.TVLARS),
    "bf16": engine.bfloat16_enabled(),
    "zero_stage": engine.zero_optimization_stage(),
    "global_steps": engine.global_steps,
    "expected_steps": expected_steps,
}
with open(os.path.join(os.environ["DOCTEST_OUT"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(result, f)
"""


def block(name: str) -> tuple[str, str]:
    """(language, body) of the block marked ``<!-- doctest: name -->``; exactly one exists."""
    found = [
        (m.group(2), m.group(3))
        for path in DOCS.values()
        for m in MARKER.finditer(path.read_text())
        if m.group(1) == name
    ]
    assert len(found) == 1, f"doctest marker {name!r}: {len(found)} blocks"
    return found[0]


def command(name: str) -> list[str]:
    """A bash block of one command, continuation lines joined, split as the shell would."""
    lang, body = block(name)
    assert lang == "bash"
    return shlex.split(body.replace("\\\n", " "))


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "DOCTEST_OUT": str(tmp_path / "results"),
        "DS_ACCELERATOR": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run to completion; fail with the output's tail unless it exits 0. Returns stdout."""
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def results(tmp_path: Path) -> list[dict]:
    """What the runner wrote, one file per rank (stdout lines of ranks can interleave)."""
    found = [json.loads(f.read_text()) for f in (tmp_path / "results").glob("rank*.json")]
    return sorted(found, key=lambda r: r["rank"])


def write_block(tmp_path: Path, name: str, filename: str) -> Path:
    lang, body = block(name)
    assert lang in ("python", "json")
    path = tmp_path / filename
    path.write_text(body)
    return path


def write_runner(tmp_path: Path) -> Path:
    """The runner; it writes its results to tmp_path/results (env: DOCTEST_OUT)."""
    (tmp_path / "results").mkdir()
    path = tmp_path / "doctest_runner.py"
    path.write_text(RUNNER)
    return path


def accelerate_launch(argv: list[str], port: int) -> list[str]:
    """`accelerate launch ...` as written, through this interpreter, on a free port."""
    assert argv[:2] == ["accelerate", "launch"], argv
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--main_process_port",
        str(port),
        *argv[2:],
    ]


def needs_accelerate() -> None:
    for module in ("accelerate", "transformers"):  # accelerate + DeepSpeed needs transformers
        if importlib.util.find_spec(module) is None:
            pytest.skip(f'{module} is not installed: pip install -e ".[test]"')


def test_every_marked_block_is_run():
    names = {m.group(1) for path in DOCS.values() for m in MARKER.finditer(path.read_text())}
    assert names == set(RUN_BY)
    for name in names:  # each marker is followed by a fence, and one block only
        block(name)


@pytest.mark.parametrize("config", ["readme-ds-json", "integrations-ds-json"])
def test_json_with_deepspeed_initialize(tmp_path, config):
    """The config, saved as ds.json, through the `deepspeed.initialize` snippet of
    docs/integrations.md (one process), then one training step."""
    stage = json.loads(block(config)[1]).get("zero_optimization", {}).get("stage", 0)
    write_block(tmp_path, config, "ds.json")
    snippet = write_block(tmp_path, "integrations-ds-initialize", "snippet.py")
    rendezvous = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    run(
        [sys.executable, str(write_runner(tmp_path)), str(snippet)],
        env(tmp_path, DOCTEST_MODEL="1", DOCTEST_STEP="1", **rendezvous),
        cwd=tmp_path,
    )
    (r,) = results(tmp_path)
    assert r["is_tvlars"] and r["zero_stage"] == stage
    assert r["global_steps"] == r["expected_steps"] == 1


def test_optimizer_fragment_passes_check_config():
    """The `"optimizer": {...}` fragment of docs/deepspeed.md is a valid member of a config."""
    import tvlars_scale.deepspeed as tds

    _, body = block("deepspeed-json-optimizer")
    # with the clipping the doc prescribes below it (otherwise check_config warns)
    config = tds.check_config(json.loads("{" + body + ', "gradient_clipping": 0.0}'))
    assert config["optimizer"]["type"] == "TVLARS"


def test_deepspeed_program_under_torchrun(tmp_path):
    """The complete program of docs/deepspeed.md, 2 ranks, from the repository root."""
    program = write_block(tmp_path, "deepspeed-train", "train.py")
    out = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(WORLD),
            str(write_runner(tmp_path)),
            str(program),
        ],
        env(tmp_path),
        cwd=ROOT,
    )
    rs = results(tmp_path)
    assert [r["rank"] for r in rs] == list(range(WORLD)), out[-2000:]
    for r in rs:
        assert r["world"] == WORLD and r["is_tvlars"] and r["bf16"] and r["zero_stage"] == 2
        assert r["global_steps"] == r["expected_steps"] > 0


def test_accelerate_program(tmp_path):
    """The accelerate program of docs/deepspeed.md, launched by the doc's command with 2
    processes instead of 8."""
    needs_accelerate()
    program = write_block(tmp_path, "accelerate-train", "train.py")
    argv = command("accelerate-launch")
    i = argv.index("--num_processes")
    argv[i + 1] = str(WORLD)
    assert argv[-1] == "train.py"
    argv[-1:] = [str(write_runner(tmp_path)), str(program)]
    out = run(accelerate_launch(argv, free_port()), env(tmp_path, DOCTEST_ACCELERATE="1"), cwd=ROOT)
    rs = results(tmp_path)
    assert [r["rank"] for r in rs] == list(range(WORLD)), out[-2000:]
    for r in rs:
        assert r["world"] == WORLD and r["is_tvlars"] and r["bf16"] and r["zero_stage"] == 2
        assert r["global_steps"] == r["expected_steps"] > 0


def test_readme_json_under_accelerate(tmp_path):
    """The README's config with `accelerate launch --use_deepspeed` (2 processes) and the
    accelerate program of docs/deepspeed.md (a DummyOptim, as the README says)."""
    needs_accelerate()
    config = write_block(tmp_path, "readme-ds-json", "ds.json")
    program = write_block(tmp_path, "accelerate-train", "train.py")
    argv = [
        "accelerate",
        "launch",
        "--use_deepspeed",
        "--deepspeed_config_file",
        str(config),
        "--num_processes",
        str(WORLD),
        str(write_runner(tmp_path)),
        str(program),
    ]
    out = run(
        accelerate_launch(argv, free_port()), env(tmp_path, DOCTEST_ACCELERATE="1"), cwd=tmp_path
    )
    rs = results(tmp_path)
    assert [r["rank"] for r in rs] == list(range(WORLD)), out[-2000:]
    for r in rs:
        assert r["world"] == WORLD and r["is_tvlars"] and not r["bf16"]
        assert r["global_steps"] == r["expected_steps"] > 0


def test_launch_recipe_under_deepspeed_on_cpu(tmp_path):
    """launch/README.md's CPU DeepSpeed command prints the accuracy the text next to it gives."""
    needs_accelerate()
    argv = command("launch-deepspeed-cpu")
    i = argv.index("--output-dir")
    argv[i + 1] = str(tmp_path / "run")
    out = run(accelerate_launch(argv, free_port()), env(tmp_path), cwd=ROOT)
    text = DOCS["launch"].read_text()
    marker = text.index("<!-- doctest: launch-deepspeed-cpu -->")
    (documented,) = re.findall(r"test accuracy: ([\d.]+)% on 297", text[marker - 400 : marker])
    (got,) = re.findall(
        r"^test accuracy: ([\d.]+)% on 297 digits test images after 80 steps$", out, re.M
    )
    # 1 image = 0.34 points; the run is deterministic on one machine (seeded, one thread per
    # rank) but another CPU's float rounding may move an image or two.
    assert abs(float(got) - float(documented)) <= 1.0, (
        f"the run printed test accuracy {got}%, launch/README.md says {documented}%"
    )
