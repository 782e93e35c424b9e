"""Classification with TVLARS (or LARS/LAMB baselines) at any global batch size.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        launch/train_classification.py                       # digits, 2 CPU processes
    accelerate launch --config_file launch/configs/ddp_1node_8gpu.yaml \
        launch/train_classification.py --dataset cifar10 --global-batch-size 4096

See launch/README.md for DeepSpeed, FSDP2, multi-node and SLURM. The work is done by
``tvlars_scale.recipes.classification``.
"""

from __future__ import annotations

import argparse

from tvlars_scale.recipes.classification import run_classification
from tvlars_scale.recipes.cli import RecipeParser, add_common_args, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = RecipeParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(
        parser,
        default_model_help="network (default: resnet18 for cifar10, resnet34 for tiny-imagenet, "
        "small-cnn otherwise)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), run_classification, argv)


if __name__ == "__main__":
    main()
