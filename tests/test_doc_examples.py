"""Every fenced block of the docs runs as written, or says in one word why not (issue #24).

The docs are README.md, launch/README.md and docs/*.md. Every fenced block has a marker comment
on the line right before its fence:

- ``<!-- doctest: NAME -->``: the block runs (NAME, unique across the docs, says which test runs
  it: ``RUN_BY``), or is compared with what a run prints;
- ``<!-- not-run: REASON -->``: it does not run, for the one-word reason ``REASON`` (``REASONS``
  lists them). It is still checked: Python parses (a ``signature`` as a ``def``), bash passes
  ``bash -n``, JSON and YAML parse, and a DeepSpeed JSON (or its ``"optimizer"`` member) passes
  ``tvlars_scale.deepspeed.check_config``.

``test_every_fenced_block_is_marked`` fails on a block without a marker, and
``test_every_marked_block_is_run`` on a NAME that no test runs.

How the blocks run, each in a subprocess on this CPU-only machine (gloo), with a timeout; what
the harness adds is listed, and nothing else is:

- Python fragments (``FRAGMENTS``): completed by the fixture of ``tests/doc_fixture.py`` (a
  small model with ``model.blocks``, a ``loader``, a ``loss_fn``, ``epochs``, ``device``, the
  ``tvlars_scale`` module, and on 2 ranks a 1-D ``mesh`` over the gloo world), all fragments of
  one world size in one process, then one training step each if the fragment took none. On 2
  ranks both must report the same per-layer norms.
- complete programs (``PROGRAMS``): as the comment on their first line says, under ``torchrun``
  with 2 ranks.
- ``pycon`` sessions: as doctests, with the names of ``tvlars_scale`` and
  ``tvlars_scale.schedules`` imported (docs/api.md's examples come from the docstrings).
- the DeepSpeed examples: JSON configs are written to ``ds.json`` and handed to
  ``deepspeed.initialize`` by the snippet of docs/integrations.md (one process, env://
  rendezvous), then one training step; the README's also under ``accelerate launch
  --use_deepspeed`` (2 processes) with the accelerate program of docs/deepspeed.md. The programs
  of docs/deepspeed.md run under ``torchrun`` (2 ranks; the block says "or torchrun") and under
  the ``accelerate launch`` command of the doc, with 2 processes instead of 8. For these the
  harness adds a free port, ``DS_ACCELERATOR=cpu`` and no visible GPU,
  ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False`` (skips a 2-minute JIT
  build of an optional CPU op, as the other DeepSpeed tests do), for accelerate
  ``PartialState(backend="gloo")`` (as docs/deepspeed.md says to do on a CPU-only machine), and
  for the integrations snippet the ``model`` it refers to; after the block it prints what the
  engine it built looks like (world size, wrapper, steps taken), which the tests check.
- launch/README.md's first command, as written, in a scratch directory that links ``launch/``
  and ``ds_configs/`` (so ``runs/`` lands there): its output must hold the lines of the block
  shown after it (the accuracy within one point; ``...`` stands for any text), and
  ``tvlars-plot`` then runs on that run, linked under the three names the doc uses. Its CPU
  DeepSpeed command runs from the repository root, with ``--output-dir`` in a scratch
  directory, and must print the accuracy the text gives.

About 2 minutes on 2 idle cores, 170 s of CPU time (the two launch recipes about 20 s each, the
DeepSpeed runs 5-8 s each, the fragments and programs 5-10 s per process).
"""

from __future__ import annotations

import ast
import doctest
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180  # each run takes 5-25 s on 2 idle cores
WORLD = 2  # processes for the multi-rank examples (the docs say 8 GPUs)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "launch" / "README.md", *sorted(ROOT.glob("docs/*.md"))]


#: Why a block does not run: one word each.
REASONS = {
    "gpu": "needs CUDA GPUs",
    "multi-node": "needs several machines, or a cluster's scheduler",
    "install": "installs packages or creates an environment",
    "output": "what a command prints",
    "formula": "the math, or pseudocode",
    "diagram": "a file tree or a picture in text",
    "config": "a configuration excerpt: parsed, and a DeepSpeed one checked with check_config",
    "elided": "code with `...` standing for the reader's own arguments or code",
    "fragment": "part of a class or a program, which does not run alone",
    "slow": "runs on CPU, but beyond this test's time budget; another test runs the same route",
    "signature": "an API signature (docs/api.md, generated: tests/test_api_doc.py)",
}

#: Python fragments completed by tests/doc_fixture.py: name -> ranks.
FRAGMENTS = {
    "readme-tvlars": 1,
    "integrations-plain": 1,
    "integrations-timm": 1,
    "fused-flag": 1,
    "integrations-accelerate": 1,
    "migration-timm-lars": 1,
    "migration-timm-lamb": 1,
    "migration-torchlars": 1,
    "migration-apex-lamb": 1,
    "migration-tvlars": 1,
    "readme-fsdp2": 2,
    "readme-fsdp1": 2,
    "integrations-fsdp2": 2,
}
#: Complete programs, each run under torchrun with 2 ranks.
PROGRAMS = (
    "fsdp-fsdp2-program",
    "fsdp-fsdp1-program",
    "integrations-torchtitan-program",
    "integrations-transformers-program",
)
#: Programs that import an optional package: name -> (module, install step).
PROGRAM_NEEDS = {
    "integrations-torchtitan-program": (
        "torchtitan",
        'pip install -e ".[torchtitan]" (Python >= 3.11)',
    ),
    "integrations-transformers-program": (
        "transformers.distributed.checkpoint",  # transformers 5's DistributedConfig models
        'pip install -e ".[test]" (transformers >= 5, as constraints/ci.txt pins)',
    ),
}

# name -> test that runs it; test_every_marked_block_is_run checks this covers every marker
# (pycon sessions excepted: test_pycon_sessions runs every one).
RUN_BY = {
    "readme-ds-json": "test_json_with_deepspeed_initialize, test_readme_json_under_accelerate",
    "integrations-ds-json": "test_json_with_deepspeed_initialize",
    "migration-ds-json": "test_json_with_deepspeed_initialize",
    "integrations-ds-initialize": "test_json_with_deepspeed_initialize",
    "deepspeed-json-optimizer": "test_optimizer_fragment_passes_check_config",
    "deepspeed-train": "test_deepspeed_program_under_torchrun",
    "accelerate-train": "test_accelerate_program, test_readme_json_under_accelerate",
    "accelerate-launch": "test_accelerate_program",
    "launch-deepspeed-cpu": "test_launch_recipe_under_deepspeed_on_cpu",
    "launch-cpu-2proc": "test_launch_first_run",
    "launch-cpu-2proc-output": "test_launch_first_run",
    "launch-plot": "test_launch_first_run",
    **dict.fromkeys(FRAGMENTS, "test_fragment"),
    **dict.fromkeys(PROGRAMS, "test_program"),
}

FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"^\s*<!-- (doctest|not-run): ([\w-]+) -->\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    body: str
    marker: str | None  # "doctest", "not-run" or None
    value: str | None  # the NAME or the REASON

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the marker on the line before each."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = len(opening.group(1)), opening.group(2), opening.group(3)
        close = re.compile(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        body = (
            "\n".join(
                line[indent:] if line[:indent].isspace() else line.lstrip(" ")
                for line in lines[i + 1 : j]
            )
            if indent
            else "\n".join(lines[i + 1 : j])
        )
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        found.append(
            Block(
                path,
                i + 1,
                lang,
                body + "\n" if body else "",
                marker.group(1) if marker else None,
                marker.group(2) if marker else None,
            )
        )
        i = j + 1
    return found


def all_blocks() -> list[Block]:
    return [b for path in doc_files() for b in fenced_blocks(path)]


def block(name: str) -> tuple[str, str]:
    """(language, body) of the block marked ``<!-- doctest: name -->``; exactly one exists."""
    found = [(b.lang, b.body) for b in all_blocks() if b.marker == "doctest" and b.value == name]
    assert len(found) == 1, f"doctest marker {name!r}: {len(found)} blocks"
    return found[0]


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


#: What a process aborted by an unjoined C++ thread at exit prints (std::terminate).
TEARDOWN_ABORT = "terminate called without an active exception"


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


def needs_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip('DeepSpeed is not installed: pip install -e ".[deepspeed]"')


# ---------------------------------------------------------------- every block is accounted for
def test_every_fenced_block_is_marked():
    blocks = all_blocks()
    assert len(blocks) > 50  # the parser found the docs' blocks
    unmarked = [b.where for b in blocks if b.marker is None]
    assert not unmarked, (
        "fenced blocks without a marker on the line before the fence; add "
        "<!-- doctest: NAME --> (and run it: tests/test_doc_examples.py) or "
        f"<!-- not-run: REASON --> with REASON one of {', '.join(REASONS)}: {unmarked}"
    )
    unknown = [f"{b.where} ({b.value})" for b in blocks if b.marker == "not-run"
               and b.value not in REASONS]  # fmt: skip
    assert not unknown, f"not-run reasons outside REASONS: {unknown}"


def test_every_marked_block_is_run():
    named = [b for b in all_blocks() if b.marker == "doctest"]
    names = [b.value for b in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"doctest names used twice: {duplicates}"
    sessions = {b.value for b in named if b.lang == "pycon"}
    assert set(names) - sessions == set(RUN_BY), "RUN_BY must list every doctest NAME"
    for b in named:
        assert b.lang == "pycon" or b.value not in sessions, b.where


def test_blocks_that_do_not_run_are_well_formed():
    """Python parses, bash passes ``bash -n``, JSON and YAML parse, DeepSpeed JSON passes
    check_config: for every block, run or not."""
    import yaml

    from tvlars_scale.deepspeed import check_config

    problems = []
    for b in all_blocks():
        try:
            if b.lang == "python":
                source = b.body
                if b.value == "signature":  # name(args) -> type: parse it as a def
                    source = "def f" + source[source.index("(") :].rstrip() + ": ..."
                ast.parse(source)
            elif b.lang == "pycon":
                doctest.DocTestParser().get_examples(b.body)
            elif b.lang in ("bash", "sh"):
                check = subprocess.run(["bash", "-n"], input=b.body, text=True,
                                       capture_output=True)  # fmt: skip
                assert check.returncode == 0, check.stderr
            elif b.lang == "json":
                text = b.body.strip()
                config = json.loads(text if text.startswith("{") else "{" + text + "}")
                if {"optimizer", "zero_optimization"} & set(config):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # clipping advice: not an error
                        check_config(config)
            elif b.lang in ("yaml", "yml"):
                yaml.safe_load(b.body)
        except Exception as e:  # collected, reported together
            problems.append(f"{b.where} ({b.lang}): {type(e).__name__}: {e}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", ["readme-ds-json", "integrations-ds-json", "migration-ds-json"])
def test_json_with_deepspeed_initialize(tmp_path, config):
    """The config, saved as ds.json, through the `deepspeed.initialize` snippet of
    docs/integrations.md (one process), then one training step."""
    needs_deepspeed()
    from tvlars_scale.deepspeed import JSON_TYPES

    parsed = json.loads(block(config)[1])
    stage = parsed.get("zero_optimization", {}).get("stage", 0)
    expected = JSON_TYPES[parsed["optimizer"]["type"]].__name__
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
    assert r["basic"] == expected and r["zero_stage"] == stage
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
    needs_deepspeed()
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
    needs_deepspeed()
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
    needs_deepspeed()
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
    needs_deepspeed()
    needs_accelerate()
    argv = command("launch-deepspeed-cpu")
    i = argv.index("--output-dir")
    argv[i + 1] = str(tmp_path / "run")
    out = run(accelerate_launch(argv, free_port()), env(tmp_path), cwd=ROOT)
    text = (ROOT / "launch" / "README.md").read_text()
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


# ---------------------------------------------------------------- Python fragments and programs
FIXTURE = Path(__file__).with_name("doc_fixture.py")


def plain_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def torchrun(*argv: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(WORLD), *argv]  # fmt: skip


@pytest.fixture(scope="module")
def fragment_results(tmp_path_factory) -> dict[int, Path]:
    """Every fragment of ``FRAGMENTS``, run by tests/doc_fixture.py: one process for the
    single-process ones, one 2-rank world for the others. Returns the results folder per world
    size."""
    folders = {}
    for world in sorted(set(FRAGMENTS.values())):
        folder = tmp_path_factory.mktemp(f"fragments{world}")
        specs = []
        for name, ranks in FRAGMENTS.items():
            if ranks == world:
                lang, body = block(name)
                assert lang == "python", name
                (folder / f"{name}.py").write_text(body)
                specs.append(f"{name}={folder / f'{name}.py'}")
        argv = [str(FIXTURE), str(folder), *specs]
        run(torchrun(*argv) if world > 1 else [sys.executable, *argv], plain_env(), cwd=folder)
        folders[world] = folder
    return folders


@pytest.mark.parametrize("name", FRAGMENTS)
def test_fragment(fragment_results, name):
    """The fragment ran with the fixture, built a tvlars_scale optimizer that stepped, and on 2
    ranks both ranks report the same true per-layer norms."""
    needs = {"integrations-accelerate": "accelerate"}.get(name, "timm" if "timm" in name else None)
    if needs and importlib.util.find_spec(needs) is None:
        pytest.skip(f'{needs} is not installed: pip install -e ".[test]"')
    world = FRAGMENTS[name]
    ranks = []
    for rank in range(world):
        path = fragment_results[world] / f"{name}.rank{rank}.json"
        assert path.is_file(), f"{name}: rank {rank} wrote no result"
        result = json.loads(path.read_text())
        assert result["ok"], f"{name} on rank {rank}:\n{result['error']}"
        ranks.append(result)
    for r in ranks:
        assert r["class"] in ("TVLARS", "LARS", "LAMB")
        assert r["steps"] >= (0 if name == "fused-flag" else 1)
    if name != "fused-flag":
        assert ranks[0]["stats"], name
    for other in ranks[1:]:
        assert other["stats"].keys() == ranks[0]["stats"].keys()
        for layer, row in other["stats"].items():
            assert row == pytest.approx(ranks[0]["stats"][layer], rel=1e-5), layer


@pytest.mark.parametrize("name", PROGRAMS)
def test_program(tmp_path, name):
    """A complete program, under ``torchrun`` with 2 ranks as its first line says."""
    module, install = PROGRAM_NEEDS.get(name, (None, None))
    if module:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package of a dotted name is missing
            found = False
        if not found:
            pytest.skip(f"{module} is not installed: {install}")
    lang, body = block(name)
    assert lang == "python" and body.startswith("# torchrun --nproc_per_node 2 "), name
    program = tmp_path / body.split()[4]
    program.write_text(body)
    argv = torchrun(str(program))
    for _ in range(2):
        proc = subprocess.run(
            argv, env=plain_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT
        )
        # Once more only if the program finished its work and printed it, and a gloo thread then
        # aborted the process at exit (torch 2.14 on CPU, now and then, barrier or not).
        if not (TEARDOWN_ABORT in proc.stderr and "'lwn'" in proc.stdout):
            break
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "'lwn'" in proc.stdout  # rank 0 printed a layer's true norms


# ---------------------------------------------------------------- pycon sessions (doctests)
def sessions() -> list[Block]:
    return [b for b in all_blocks() if b.lang == "pycon" and b.marker == "doctest"]


@pytest.mark.parametrize("session", sessions(), ids=lambda b: b.value)
def test_pycon_sessions(session):
    import tvlars_scale
    import tvlars_scale.schedules

    names = {**vars(tvlars_scale.schedules), **vars(tvlars_scale)}
    names = {k: v for k, v in names.items() if not k.startswith("__")}
    test = doctest.DocTestParser().get_doctest(session.body, names, session.value,
                                               str(session.path), session.line)  # fmt: skip
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, f"{session.where}:\n" + "".join(output)


# ---------------------------------------------------------------- launch/README.md, section 1
def test_launch_first_run(tmp_path):
    """The first command of launch/README.md, as written, from a scratch directory that links
    ``launch/`` and ``ds_configs/``: it prints the block shown after it (the accuracy within one
    point), and ``tvlars-plot`` plots its run under the three names the doc uses."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip('accelerate is not installed: pip install -e ".[recipes]"')
    for name in ("launch", "ds_configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    argv = command("launch-cpu-2proc")
    env = {**plain_env(), "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    out = run(accelerate_launch(argv, free_port()), env, cwd=tmp_path)
    accuracy = re.compile(r"^test accuracy: ([\d.]+)% (.*)$")
    for line in block("launch-cpu-2proc-output")[1].splitlines():
        documented = accuracy.match(line)
        if not documented:  # "..." in the shown output stands for any text
            pattern = re.compile(".*".join(map(re.escape, line.split("..."))))
            assert any(map(pattern.fullmatch, out.splitlines())), (
                f"{line!r} not printed:\n{out[-2000:]}"
            )
            continue
        (got,) = [m for m in map(accuracy.match, out.splitlines()) if m]
        assert got.group(2) == documented.group(2), got.group(0)
        # 1 image = 0.34 points; deterministic on one machine (seeded, one thread per rank),
        # another CPU's float rounding may move an image or two.
        assert abs(float(got.group(1)) - float(documented.group(1))) <= 1.0, (
            f"the run printed {got.group(0)!r}; launch/README.md says {line!r}"
        )
    # tvlars-plot, as written, over the run linked under the doc's three names
    plot = command("launch-plot")
    run_dirs = [a for a in plot if a.startswith("runs/") and a != "runs/"]
    (made,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    for name in run_dirs:
        (tmp_path / name).symlink_to(made)
    tool = shutil.which("tvlars-plot", path=str(Path(sys.executable).parent))
    assert tool, "tvlars-plot is not installed next to this interpreter"
    run([tool, *plot[1:]], {**env, "MPLBACKEND": "Agg"}, cwd=tmp_path)
    out_dir = tmp_path / plot[plot.index("--out") + 1]
    assert (out_dir / "loss.png").is_file(), sorted(out_dir.iterdir())
