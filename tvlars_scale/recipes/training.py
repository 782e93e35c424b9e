"""The training loop shared by the recipes, and evaluation over the whole test set.

One optimizer step = one global batch = ``grad_accum`` micro-batches per rank. Gradients of
the micro-batches are accumulated without synchronisation (accelerate's ``accumulate``: DDP
``no_sync``, DeepSpeed's accumulation boundary; FSDP2's ``set_requires_gradient_sync``), and the
optimizer steps once, so TVLARS computes its trust ratios once per global batch, on the
accumulated gradient.

Data comes from ``MicroBatches``: a dataset indexed by (step, micro-batch) that yields this
rank's uint8 images and labels, loaded in DataLoader workers if asked, moved to the device,
then augmented there by the task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from . import faults
from .augment import Normalizer, augment_generator
from .batching import BatchPlan, epoch_permutation, eval_shard, micro_batch_indices
from .checkpoint import Checkpointer, TrainState
from .data import ImageData, ImageSet
from .distributed import model_input_dtype, requires_gradient_sync
from .metrics import RunLogger
from .optim import LRController, current_phi, find_layerwise

__all__ = [
    "LoopConfig",
    "MicroBatches",
    "Task",
    "batch_loader",
    "evaluate",
    "evaluate_splits",
    "train",
]


class Task(Protocol):
    def loss(
        self, model: nn.Module, images: Tensor, labels: Tensor, gen: torch.Generator
    ) -> Tensor:
        """The loss of one micro-batch of uint8 ``images`` (already on the device)."""
        ...


@dataclass
class LoopConfig:
    steps_per_epoch: int
    total_steps: int  # the run's length (schedules are defined over it)
    stop_step: int  # where this invocation stops (``--max-steps``)
    seed: int = 0
    log_every: int = 10
    telemetry_every: int = 10
    eval_every: int = 0  # steps; 0 = at the end of every epoch
    checkpoint_every: int = 0  # steps; 0 = only the final checkpoint
    save_final: bool = True
    num_workers: int = 0


class MicroBatches(Dataset):
    """Key ``(step, micro)`` -> this rank's (uint8 images, labels); see ``batching``."""

    def __init__(
        self, images: ImageSet, plan: BatchPlan, rank: int, seed: int, steps_per_epoch: int
    ):
        self.images, self.plan, self.rank, self.seed = images, plan, rank, seed
        self.steps_per_epoch = steps_per_epoch
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.steps_per_epoch * self.plan.grad_accum

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        step, micro = key
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(len(self.images), self.seed, epoch)
        index = micro_batch_indices(self._perm, self.plan, step_in_epoch, micro, self.rank)
        return self.images.load(index), self.images.labels[index]


class _Indexed(Dataset):
    """Key -> ``load(key)``, so that DataLoader workers can run any batch loader."""

    def __init__(self, load: Callable[[Any], Any]) -> None:
        self.load = load

    def __getitem__(self, key):
        return self.load(key)


def batch_loader(dataset: Dataset, keys: list, num_workers: int) -> DataLoader:
    """Each key of ``keys`` is one item of ``dataset`` (a whole batch), loaded in order."""
    return DataLoader(
        dataset,
        sampler=keys,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test: ImageSet,
    normalizer: Normalizer,
    accelerator,
    batch_size: int = 256,
    num_workers: int = 0,
    split: str = "test",
) -> dict[str, float]:
    """Accuracy and loss over the whole split: each sample once, summed over ranks. Keys are
    prefixed with ``split`` (``test_acc``, ``test_loss``, ``test_samples``)."""
    device, dtype = accelerator.device, model_input_dtype(model)
    shard = eval_shard(len(test), accelerator.process_index, accelerator.num_processes, batch_size)

    def load(i: int):
        index, valid = shard[i]
        return test.load(index), test.labels[index], valid

    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for images, labels, valid in batch_loader(_Indexed(load), list(range(len(shard))), num_workers):
        images, labels, valid = (t.to(device, non_blocking=True) for t in (images, labels, valid))
        with accelerator.autocast():
            logits = model(normalizer(images).to(dtype)).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        totals[0] += ((logits.argmax(1) == labels) & valid).sum()
        totals[1] += (loss * valid).sum()
        totals[2] += valid.sum()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    correct, loss_sum, count = totals.tolist()
    return {
        f"{split}_acc": correct / count,
        f"{split}_loss": loss_sum / count,
        f"{split}_samples": int(count),
    }


def evaluate_splits(
    model: nn.Module,
    data: ImageData,
    normalizer: Normalizer,
    accelerator,
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """``evaluate`` on the test split, and on the validation split when the data has one."""
    metrics = evaluate(model, data.test, normalizer, accelerator, batch_size, num_workers)
    if data.val is not None:
        metrics |= evaluate(
            model, data.val, normalizer, accelerator, batch_size, num_workers, split="val"
        )
    return metrics


def train(
    *,
    accelerator,
    model: nn.Module,
    optimizer,
    task: Task,
    train_set: ImageSet,
    plan: BatchPlan,
    loop: LoopConfig,
    lr: LRController,
    logger: RunLogger,
    checkpointer: Checkpointer,
    state: TrainState,
    evaluate_fn: Callable[[], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Run optimizer steps ``state.step`` .. ``loop.stop_step``; returns the last metrics."""
    layerwise = find_layerwise(optimizer)
    device = accelerator.device
    micro = MicroBatches(
        train_set, plan, accelerator.process_index, loop.seed, loop.steps_per_epoch
    )
    keys = [(s, a) for s in range(state.step, loop.stop_step) for a in range(plan.grad_accum)]
    batches = iter(batch_loader(micro, keys, loop.num_workers))
    eval_every = loop.eval_every or loop.steps_per_epoch
    last: dict[str, Any] = {}
    start_time, start_step = time.perf_counter(), state.step
    model.train()

    while state.step < loop.stop_step:
        step = state.step
        current_lr = lr.apply(step)
        loss_sum = torch.zeros((), device=device)
        for a in range(plan.grad_accum):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            # Keyed by the micro-batch's place in the global batch, not by (micro, rank): the
            # same global batch is augmented the same way however it is split.
            slot = a * plan.world_size + accelerator.process_index
            gen = augment_generator(device, loop.seed, step, slot)
            last_micro = a == plan.grad_accum - 1
            with accelerator.accumulate(model), requires_gradient_sync(model, last_micro):
                loss = faults.poisoned(
                    task.loss(model, images, labels, gen), step + 1, accelerator.process_index
                )
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        done = state.step == loop.stop_step

        if state.step % loop.log_every == 0 or done:
            mean_loss = accelerator.reduce(loss_sum / plan.grad_accum, reduction="mean").item()
            elapsed = time.perf_counter() - start_time
            record: dict[str, Any] = dict(
                epoch=state.step / loop.steps_per_epoch,
                loss=mean_loss,
                lr=current_lr,
                samples=state.step * plan.global_batch,
                time=round(elapsed, 3),
                samples_per_s=(state.step - start_step) * plan.global_batch / max(elapsed, 1e-9),
            )
            if layerwise is not None:
                group = layerwise.param_groups[0]  # every group steps (or skips) together
                record.update(
                    opt_step=float(group["step"]),
                    phi=current_phi(layerwise),
                    # DeepSpeed's ZeRO wrappers skip a non-finite step before our optimizer
                    # runs, and count it in the engine (saved in its checkpoints).
                    skipped_steps=int(group["skipped_steps"]) + getattr(model, "skipped_steps", 0),
                )
            logger.log("train", state.step, **record)
            last.update(record)
            logger.advance(0, loss=f"{mean_loss:.4f}", lr=f"{current_lr:.3g}")
        telemetry = state.step % loop.telemetry_every == 0 or done
        if layerwise is not None and telemetry and accelerator.is_main_process:
            logger.layers(state.step, layerwise.layer_stats().to_dict())
        if evaluate_fn is not None and (state.step % eval_every == 0 or done):
            metrics = evaluate_fn()
            logger.log("eval", state.step, epoch=state.step / loop.steps_per_epoch, **metrics)
            last.update(metrics)
        if (loop.checkpoint_every and state.step % loop.checkpoint_every == 0) or (
            done and loop.save_final
        ):
            checkpointer.save(logger.cursor())
        logger.advance(1)
        faults.after_step(state.step, accelerator.process_index)
    last["step"] = state.step
    return last
