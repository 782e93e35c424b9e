"""``Run``: what both recipes do around their model and loss.

From the parsed command line it plans the global batch, creates the ``Accelerator``, loads the
data, resolves the paper's defaults (LR per batch size, epochs), prepares model + optimizer for
the engine at hand (DDP, DeepSpeed with a JSON optimizer, accelerate FSDP, or ``--fsdp2``),
resumes from a checkpoint, runs the loop, and at the end writes ``summary.json`` and plots.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deepspeed import bind as bind_deepspeed
from ..optimizers import LayerwiseOptimizer
from .augment import Normalizer
from .batching import plan_global_batch
from .checkpoint import Checkpointer, TrainState, resolve_resume
from .config import ConfigError, check_count, check_number, default_lr
from .data import load_dataset
from .distributed import check_hsdp, launched_world_size, make_accelerator, shard_fsdp2
from .metrics import RunLogger
from .models import model_options
from .optim import (
    LRController,
    OptimizerConfig,
    build_optimizer,
    deepspeed_json_optimizer,
    fixed_over_run,
    lr_factor,
    lr_warnings,
)
from .training import LoopConfig, Task, train

__all__ = ["Run"]


class Run:
    def __init__(
        self,
        args: argparse.Namespace,
        kind: str,
        default_epochs: dict[str, float],
        default_model: str,
    ) -> None:
        from accelerate.utils import set_seed

        self.args = args
        self.plan = plan_global_batch(
            args.global_batch_size,
            launched_world_size(),
            args.per_device_batch_size,
            args.grad_accum,
            args.max_per_device_batch_size,
        )
        # Every option is checked before the accelerator, the data or the model exist.
        lr = args.lr if args.lr is not None else default_lr(self.plan.global_batch, args.optimizer)
        self.optimizer_cfg = OptimizerConfig(
            name=args.optimizer,
            lr=lr,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            eta=args.eta,
            lmbda=args.lmbda,
            delay_epochs=args.delay_epochs,
            final_factor=args.final_factor,
            alpha=args.alpha,
            gamma_min=args.gamma_min,
            schedule=args.schedule,
            warmup_epochs=args.warmup_epochs,
            poly_power=args.poly_power,
            trust_denominator=args.trust_denominator,
        )
        check_number("--val-fraction", args.val_fraction, low=0.0, high=1.0, high_open=True)
        if args.epochs is not None:
            check_number("--epochs", args.epochs, low=0.0, low_open=True)
        for option in ("--max-steps", "--image-size", "--train-subset", "--test-subset"):
            value = getattr(args, option[2:].replace("-", "_"))
            if value is not None:  # None: not given
                check_count(option, value, 1)
        for option, low in (
            ("--log-every", 1),
            ("--telemetry-every", 1),
            ("--eval-every", 0),
            ("--checkpoint-every", 0),
            ("--keep-checkpoints", 1),
            ("--num-workers", 0),
        ):
            check_count(option, getattr(args, option[2:].replace("-", "_")), low)
        if args.fsdp2:
            check_hsdp(args.fsdp2_replicate, self.plan.world_size)
        self.model_name = args.model or default_model
        self.run_dir = Path(
            args.output_dir
            or f"runs/{kind}-{args.dataset}-{self.model_name}-{args.optimizer}-b{self.plan.global_batch}"
        )
        _check_output_dir(self.run_dir)
        self.accelerator = make_accelerator(args.mixed_precision, self.plan.grad_accum, args.fsdp2)
        self._check_channels_last()
        set_seed(args.seed)
        with self.accelerator.main_process_first():  # one download, then the others read it
            self.data = load_dataset(
                args.dataset,
                args.data_dir,
                args.download,
                args.train_subset,
                args.test_subset,
                args.val_fraction,
            )
        self.steps_per_epoch = len(self.data.train) // self.plan.global_batch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"--global-batch-size={self.plan.global_batch} exceeds the {len(self.data.train)} "
                f"training images of {args.dataset}: use a smaller global batch or a larger dataset"
            )
        self.epochs = args.epochs if args.epochs is not None else default_epochs[args.dataset]
        self.total_steps = max(1, round(self.epochs * self.steps_per_epoch))
        self.stop_step = min(self.total_steps, args.max_steps or self.total_steps)
        # TVLARS' delay must lie inside the run: fail now, before the model exists.
        self.optimizer_cfg.kwargs(self.steps_per_epoch, self.total_steps)
        # What the checkpoint's weights are of: a resume of another recipe, network or dataset
        # is refused by name (a network whose shapes happen to match would load and train on).
        # A recipe adds the options that shape the rest of its model (Barlow Twins' projector).
        self.identity: dict[str, Any] = {
            "recipe": kind,
            "--dataset": args.dataset,
            **model_options(self.model_name, args.stem, args.width),
        }
        self.normalizer = Normalizer(
            self.data.mean, self.data.std, args.image_size, self.accelerator.device
        )
        self.is_main = self.accelerator.is_main_process
        self.logger: RunLogger | None = None
        self.config = {
            "kind": kind,
            "args": vars(args),
            "batch_plan": vars(self.plan) | {"description": self.plan.describe()},
            "lr": self.optimizer_cfg.lr,
            "schedule": self.optimizer_cfg.resolved_schedule,
            "model": self.model_name,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "train_samples": len(self.data.train),
            "test_samples": len(self.data.test),
            "val_samples": len(self.data.val) if self.data.val is not None else 0,
            "distributed_type": str(self.accelerator.distributed_type),
            "num_processes": self.accelerator.num_processes,
        }
        if self.is_main:
            for note in lr_warnings(self.optimizer_cfg, self.plan.global_batch):
                print(f"note: {note}", flush=True)
            val = f" / {len(self.data.val)} validation" if self.data.val is not None else ""
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps(self.config, indent=2, default=str)
            )
            print(
                f"{kind} on {args.dataset} ({len(self.data.train)} train / {len(self.data.test)} "
                f"test{val} images), {self.model_name}, {args.optimizer} lr {self.optimizer_cfg.lr:g}, "
                f"{self.plan.describe()}, {self.steps_per_epoch} steps/epoch, "
                f"{self.total_steps} steps, {self.accelerator.distributed_type}",
                flush=True,
            )

    def _check_channels_last(self) -> None:
        """--channels-last changes how parameters are laid out, which only engines that keep
        each parameter whole (one process, DDP) preserve: FSDP and DeepSpeed flatten them into
        contiguous shards, where the flag would do nothing."""
        from accelerate.utils import DistributedType

        engine = self.accelerator.distributed_type
        if self.args.channels_last and (
            self.args.fsdp2 or engine in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        ):
            name = "--fsdp2" if self.args.fsdp2 else f"accelerate's {engine.value}"
            raise ConfigError(
                f"--channels-last is supported in one process and under DDP, not with {name} "
                "(it flattens parameters into contiguous shards): drop --channels-last"
            )

    # ------------------------------------------------------------------ model + optimizer
    def _sync_bn(self, model: nn.Module) -> nn.Module:
        choice = self.args.sync_bn
        gpus = self.accelerator.device.type == "cuda"
        if choice == "on" and not gpus:
            raise ConfigError(
                "--sync-bn on: torch's SyncBatchNorm runs on GPUs only; use --sync-bn off"
            )
        if choice == "on" or (choice == "auto" and gpus and self.accelerator.num_processes > 1):
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def prepare(self, model: nn.Module):
        """Wrap ``model`` for the engine and build the optimizer; returns (model, optimizer)."""
        accelerator, cfg = self.accelerator, self.optimizer_cfg
        model = self._sync_bn(model)
        if self.args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.args.fsdp2:
            model = shard_fsdp2(model, self.args.fsdp2_replicate)
            optimizer = self._build_optimizer(model)
            return model, accelerator.prepare(optimizer)
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None:
            self._check_deepspeed_batch(plugin.deepspeed_config)
            self._deepspeed_buffer_dtype(plugin.deepspeed_config)
        notes = (
            deepspeed_json_optimizer(
                plugin.deepspeed_config, cfg, self.steps_per_epoch, self.total_steps
            )
            if plugin is not None
            else None
        )
        if notes is not None:
            from accelerate.utils import DummyOptim  # exported only when DeepSpeed is installed

            if self.is_main:
                for note in notes:
                    print(f"note: {note}", flush=True)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            # One group that carries the names, as torch.optim does for named parameters: they
            # label the per-layer telemetry of the optimizer DeepSpeed builds.
            groups = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
            optimizer = DummyOptim(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = self._build_optimizer(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        if plugin is not None and isinstance(
            getattr(model, "basic_optimizer", None), LayerwiseOptimizer
        ):
            # accelerate returns the DeepSpeedEngine as the model. Binding it names the wrapper
            # whose tensors the optimizer will hold; finding it among the callers of step()
            # stays only as the fallback for code that does not bind.
            bind_deepspeed(model)
        return model, optimizer

    def _build_optimizer(self, model: nn.Module) -> LayerwiseOptimizer:
        return build_optimizer(
            self.optimizer_cfg, model.named_parameters(), self.steps_per_epoch, self.total_steps
        )

    def _deepspeed_buffer_dtype(self, ds: dict[str, Any]) -> None:
        """16-bit DeepSpeed casts parameters but (since 0.19.6) not buffers, and BatchNorm then
        meets bf16 weights with fp32 running statistics ("expected scalar type BFloat16 but
        found Float"): cast the buffers too, as DeepSpeed used to, unless the JSON says."""
        mixed = self.accelerator.mixed_precision
        for key, dtype in (("bf16", "bf16"), ("fp16", "fp16")):
            enabled = ds.get(key, {}).get("enabled", False)
            if enabled is True or (enabled == "auto" and mixed == key):
                ds.setdefault("data_types", {}).setdefault("buffer_dtype", dtype)

    def _check_deepspeed_batch(self, ds: dict[str, Any]) -> None:
        expected = {
            "train_micro_batch_size_per_gpu": self.plan.per_device,
            "gradient_accumulation_steps": self.plan.grad_accum,
            "train_batch_size": self.plan.global_batch,
        }
        for key, value in expected.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
            elif ds[key] != value:
                raise ConfigError(
                    f"DeepSpeed config {key}={ds[key]} contradicts {self.plan.describe()}; set it "
                    'to "auto" or change --global-batch-size/--per-device-batch-size/--grad-accum'
                )

    # ------------------------------------------------------------------ the loop
    def fit(
        self, model: nn.Module, optimizer, task: Task, evaluate_fn=None, description="train"
    ) -> dict[str, Any]:
        args, accelerator = self.args, self.accelerator
        state = TrainState()
        lr = LRController(
            optimizer, lr_factor(self.optimizer_cfg, self.steps_per_epoch, self.total_steps)
        )
        checkpointer = Checkpointer(
            accelerator,
            self.run_dir,
            model,
            optimizer,
            state,
            keep=args.keep_checkpoints,
            run={
                "model": self.identity,
                "seed": args.seed,
                "global_batch": self.plan.global_batch,
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "optimizer": fixed_over_run(
                    self.optimizer_cfg, self.steps_per_epoch, self.total_steps, self.epochs
                ),
            },
        )
        resume = resolve_resume(args.resume, self.run_dir)
        if resume is not None:
            notes = checkpointer.load(resume)
            if self.is_main:
                for note in notes:
                    print(f"note: {note}", flush=True)
                print(f"resumed from {resume} at step {state.step}", flush=True)
        self.logger = RunLogger(
            self.run_dir,
            self.is_main,
            total_steps=self.stop_step,
            start_step=state.step,
            progress=not args.no_progress,
            description=description,
            rewind_to=checkpointer.telemetry_cursor(resume),
        )
        loop = LoopConfig(
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            stop_step=self.stop_step,
            seed=args.seed,
            log_every=args.log_every,
            telemetry_every=args.telemetry_every,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            save_final=not args.no_final_checkpoint,
            num_workers=args.num_workers,
        )
        return train(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            task=task,
            train_set=self.data.train,
            plan=self.plan,
            loop=loop,
            lr=lr,
            logger=self.logger,
            checkpointer=checkpointer,
            state=state,
            evaluate_fn=evaluate_fn,
        )

    def finish(self, summary: dict[str, Any], headline: str) -> None:
        """Write summary.json and the plots; print the headline and where the plots are.

        Call it after dropping the references to the prepared model and optimizer: they hold
        the process group (DDP's reducer, FSDP, DeepSpeed), which must be torn down here, while
        the interpreter is alive; a gloo group destroyed during interpreter shutdown can abort
        the process ("terminate called without an active exception").
        """
        self.accelerator.free_memory()  # accelerate's own references to the engine objects
        gc.collect()
        if self.logger is not None:
            self.logger.close()
        self.accelerator.wait_for_everyone()
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            print(headline, flush=True)
            if not self.args.no_plots:
                from ..plotting import plot_runs

                written = plot_runs([self.run_dir], self.run_dir / "plots")
                print(f"plots: {', '.join(str(p) for p in written)}", flush=True)
            print(f"metrics: {self.run_dir / 'metrics.jsonl'}", flush=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def _check_output_dir(path: Path) -> None:
    """``--output-dir`` must be a directory or creatable as one, checked on every rank before
    anything runs (the main process creates it later, after the data is loaded)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "a file" if existing == path else f"{existing} is a file"
        raise ConfigError(
            f"invalid --output-dir={str(path)!r} ({where}); expected a directory, or a path "
            "where one can be created"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"invalid --output-dir={str(path)!r}: {existing} is not writable; expected a "
            "directory this user can write to"
        )
