"""Every shipped accelerate config is loaded by accelerate's own config loader and checked.

The CPU ones run for real: ``cpu_2proc.yaml`` and ``ddp_multinode.yaml`` (two "nodes" on
localhost) in test_recipes_launch.py. The GPU ones cannot run here, so this checks what would
otherwise fail only on a cluster: accelerate accepts the file, the process counts tile the
machines (and the HSDP mesh), the DeepSpeed JSON it names exists and passes
``tvlars_scale.deepspeed.load_config``, the FSDP wrap classes exist. Every config, DeepSpeed
JSON and launch script that the docs and scripts name exists.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest

import tvlars_scale.deepspeed as tds

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_consistent(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # refuses unknown keys and values
    assert config.num_processes % config.num_machines == 0, "processes per machine"
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
        assert parallel["parallelism_config_dp_replicate_size"] == config.num_machines


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
