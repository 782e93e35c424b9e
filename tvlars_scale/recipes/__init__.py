"""Training recipes for the paper's experiments, used by the scripts in ``launch/``.

One module per concern; the launch scripts only parse arguments and call ``run_*``:

- ``config``: the paper's settings (LR table per global batch, default epochs per dataset).
- ``batching``: ``--global-batch-size`` split into per-device batch x accumulation x world size,
  and the deterministic, resumable order in which samples are drawn.
- ``data``: the datasets (offline ``digits``/``mnist5k``/``fashion-mnist``, ``cifar10``,
  ``tiny-imagenet``) as uint8 image tensors.
- ``augment``: batched, seeded augmentations that run on the training device.
- ``models``: torchvision ResNet-18/34 (ImageNet or CIFAR stem) and a small CNN.
- ``optim``: TVLARS / WA-LARS / NOWA-LARS / LAMB with their schedules, and DeepSpeed JSON optimizers.
- ``distributed``: the ``Accelerator`` for the launch at hand (GPU, CPU, DeepSpeed) and FSDP2
  ``fully_shard`` for torchrun launches.
- ``checkpoint``: save / resume that continues exactly (step, data position, optimizer, RNG).
- ``metrics``: progress bar, ``metrics.jsonl``, per-layer telemetry, TensorBoard.
- ``training``: the training loop (gradient accumulation, evaluation over the whole test set).
- ``barlow_twins``: projector, the Barlow Twins model and its cross-rank loss.
- ``linear_eval``: the linear evaluation stage on a frozen backbone.
- ``classification`` and ``pretrain``: the two end-to-end recipes.
"""

from ..compat import require_extra

require_extra("recipes", what="tvlars_scale.recipes")  # before any recipe module imports numpy
