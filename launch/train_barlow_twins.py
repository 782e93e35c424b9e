"""Barlow Twins pre-training with TVLARS (or LARS/LAMB), then linear evaluation.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        launch/train_barlow_twins.py --global-batch-size 256    # digits, 2 CPU processes
    accelerate launch --config_file launch/configs/ddp_1node_8gpu.yaml \
        launch/train_barlow_twins.py --dataset cifar10 --global-batch-size 4096

See launch/README.md. The work is done by ``tvlars_scale.recipes.pretrain``.
"""

from __future__ import annotations

import argparse

from tvlars_scale.recipes.cli import RecipeParser, add_common_args, run_cli
from tvlars_scale.recipes.pretrain import run_barlow_twins


def build_parser() -> argparse.ArgumentParser:
    parser = RecipeParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_common_args(
        parser,
        default_model_help="backbone (default: resnet18 for cifar10, resnet34 for tiny-imagenet, "
        "small-cnn otherwise)",
    )
    bt = parser.add_argument_group("Barlow Twins")
    bt.add_argument(
        "--projector",
        default="auto",
        help="projector widths; auto = 4096-4096-4096 (the paper) on GPUs, 512-512-512 on CPU",
    )
    bt.add_argument(
        "--bt-lambda",
        type=float,
        default=0.005,
        help="weight of the off-diagonal term (authors' code: 0.005)",
    )
    lin = parser.add_argument_group("linear evaluation")
    lin.add_argument(
        "--linear-epochs",
        type=float,
        default=None,
        help="epochs of the linear stage (default: 100 for cifar10/tiny-imagenet, short "
        "otherwise; 0 skips it)",
    )
    lin.add_argument(
        "--linear-batch-size", type=int, default=256, help="global batch of the linear stage"
    )
    lin.add_argument("--linear-lr", type=float, default=0.3, help="SGD LR of the linear classifier")
    lin.add_argument(
        "--linear-weight-decay",
        type=float,
        default=5e-4,
        help="weight decay of the linear classifier",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser(), run_barlow_twins, argv)


if __name__ == "__main__":
    main()
