"""Every shipped accelerate config is loaded by accelerate's own config loader and checked.

The CPU ones run for real: ``cpu_2proc.yaml`` and ``ddp_multinode.yaml`` (two "nodes" on
localhost) in test_recipes_launch.py, and ``cpu_2proc.yaml`` here with a user's own script
(real DDP: gradients averaged over the two processes). The GPU ones cannot run here, so this
checks what would otherwise fail only on a cluster: accelerate accepts the file, the process
counts tile the machines (and the HSDP mesh), the DeepSpeed JSON it names exists and passes
``tvlars_scale.deepspeed.load_config``, the FSDP wrap classes exist, and a ``parallelism_config``
(``hsdp.yaml``, ``fsdp2_parallelism_gpu.yaml``) becomes, through accelerate's launcher, the
``ParallelismConfig`` that the recipes accept. Every config, DeepSpeed JSON and launch script that
the docs and scripts name exists.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import tvlars_scale.deepspeed as tds

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_consistent(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # refuses unknown keys and values
    assert config.num_processes % config.num_machines == 0, "processes per machine"
    if config.use_cpu:
        # accelerate's MULTI_CPU type starts its processes through mpirun, and ONE process
        # without it: several CPU processes need the torchrun launcher of MULTI_GPU.
        assert config.distributed_type == DistributedType.MULTI_GPU
        assert config.num_processes > 1
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port, (
            "multi-node needs node 0's address"
        )
    if config.distributed_type == DistributedType.DEEPSPEED:
        json_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert json_file.is_file(), json_file
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # the "auto" values that accelerate fills from the recipe's command line
            tds.load_config(
                json_file,
                lr=2.0,
                weight_decay=5e-4,
                train_micro_batch_size_per_gpu=256,
                gradient_accumulation_steps=1,
            )
        assert [str(w.message) for w in caught] == []  # e.g. no gradient_clipping set
    if config.distributed_type == DistributedType.FSDP:
        import torchvision.models.resnet

        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2
        for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
            assert hasattr(torchvision.models.resnet, name), name
    parallel = getattr(config, "parallelism_config", None) or {}
    if parallel:  # the HSDP mesh: replicas x shards (x TP x CP) = every process
        sizes = [v for k, v in parallel.items() if k.endswith("_size")]
        assert math.prod(sizes) == config.num_processes, parallel
        # A shard group (with its tp and cp ranks) stays on one machine's links; replicas span
        # the machines.
        group = math.prod(sizes) // parallel["parallelism_config_dp_replicate_size"]
        assert (config.num_processes // config.num_machines) % group == 0, parallel


#: Configs with accelerate's ParallelismConfig (FSDP2 only; accelerate refuses it on CPU).
PARALLELISM = [p for p in CONFIGS if "\nparallelism_config:" in p.read_text()]


@pytest.mark.parametrize("path", PARALLELISM, ids=lambda p: p.name)
def test_parallelism_config_is_one_the_recipes_accept(path, monkeypatch):
    """What the launched processes would build from the config: accelerate's launcher hands
    ``parallelism_config`` and ``fsdp_config`` on as environment variables, which
    ``ParallelismConfig()`` and the FSDP plugin read inside ``Accelerator()``. The recipes accept
    the config (and refuse tp > 1: their models have no TP plan); on CPU they stop with their own
    message before accelerate's. Only a GPU machine builds the Accelerator itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from tvlars_scale.recipes.config import ConfigError
    from tvlars_scale.recipes.distributed import check_parallelism, make_accelerator

    parsed = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(parsed)
    for key, value in prepare_multi_gpu_env(args).items():
        if key.startswith(("ACCELERATE_", "FSDP_", "PARALLELISM_CONFIG_")):
            monkeypatch.setenv(key, value)
    config = ParallelismConfig()
    assert config.total_size == args.num_processes
    assert config.fsdp_dim_names[-1] == "dp_shard_cp"  # what fully_shard gets: the mesh's tail
    assert FullyShardedDataParallelPlugin().fsdp_version == 2
    check_parallelism(config)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"does not run on CPU.*--fsdp2"):
            make_accelerator(None, 1, fsdp2=False)
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    with pytest.raises(ConfigError, match="tp_size=2: the recipes' models have no tensor-par"):
        check_parallelism(ParallelismConfig())


_REFERENCE = re.compile(
    r"\b(?:launch/configs/[\w.-]+\.yaml|ds_configs/[\w.-]+\.json|launch/[\w-]+\.(?:py|sbatch))\b"
)


def test_every_referenced_file_exists():
    sources = [ROOT / "README.md", *ROOT.glob("launch/*"), *ROOT.glob("launch/configs/*"),
               *ROOT.glob("docs/*.md"), *ROOT.glob("tvlars_scale/**/*.py")]  # fmt: skip
    missing = {
        (str(source.relative_to(ROOT)), ref)
        for source in sources
        if source.is_file()
        for ref in _REFERENCE.findall(source.read_text())
        if not (ROOT / ref).is_file()
    }
    assert not missing


def test_slurm_example_in_the_readme_is_the_file():
    script = (ROOT / "launch" / "slurm_16k.sbatch").read_text()
    assert f"```bash\n{script}```" in (ROOT / "launch" / "README.md").read_text()
    # The node rank must be expanded by each node's task, not once on the batch host.
    per_node = script.split("srun bash -c '", 1)[1].split("'", 1)[0]
    assert "--machine_rank $SLURM_NODEID" in per_node


#: A user's own accelerate script, as the comment of cpu_2proc.yaml says to write it: rank r
#: feeds x = r + 1 through w = 0, so its local gradient of sum(w x) is x, and the averaged one
#: is the mean over ranks.
USER_SCRIPT = """
import json, os, sys, warnings
import torch
from accelerate import Accelerator
import tvlars_scale

accelerator = Accelerator(cpu=not torch.cuda.is_available())
model = torch.nn.Linear(2, 1, bias=False)
torch.nn.init.zeros_(model.weight)
optimizer = tvlars_scale.TVLARS(model.parameters(), lr=1.0)
model, optimizer = accelerator.prepare(model, optimizer)
x = torch.full((1, 2), accelerator.process_index + 1.0, device=accelerator.device)
accelerator.backward(model(x).sum())
grad = accelerator.unwrap_model(model).weight.grad
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    optimizer.step()
record = {
    "rank": accelerator.process_index,
    "world": accelerator.num_processes,
    "type": accelerator.distributed_type.value,
    "grad": grad.flatten().tolist(),
    "warnings": [str(w.message) for w in caught],
}
with open(os.path.join(sys.argv[1], f"rank{accelerator.process_index}.json"), "w") as f:
    json.dump(record, f)
# Tear the gloo group down now: destroyed during interpreter shutdown, with DDP's reducer still
# alive, it can abort the process ("terminate called without an active exception").
del model, optimizer
accelerator.free_memory()
accelerator.end_training()
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU config, on a machine without GPUs")
def test_cpu_config_runs_a_user_script_as_ddp(tmp_path):
    """cpu_2proc.yaml with a script of one's own, no environment variable: two ranks of one
    DDP world over gloo, whose gradients are averaged (not two runs that each train alone)."""
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    config = ROOT / "launch" / "configs" / "cpu_2proc.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(records):
        assert (record["rank"], record["world"], record["type"]) == (rank, 2, "MULTI_CPU")
        assert record["grad"] == [1.5, 1.5]  # the mean of the ranks' 1 and 2
        assert record["warnings"] == []


def test_an_optimizer_in_a_launched_process_without_a_process_group_warns(monkeypatch):
    """What a plain ``Accelerator()`` gets under cpu_2proc.yaml without a GPU (distributed type
    NO, no process group, WORLD_SIZE=2): the first step says so."""
    import torch.distributed as dist

    import tvlars_scale

    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    model = torch.nn.Linear(2, 1)
    optimizer = tvlars_scale.TVLARS(model.parameters(), lr=1.0)
    model(torch.ones(1, 2)).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"WORLD_SIZE=2: a launcher started 2 processes.*"
                      r"Accelerator\(cpu=True\)"):  # fmt: skip
        optimizer.step()
