"""Smoke tests of the launch scripts on 2 CPU processes, offline data (digits), a few steps.

Each launch runs 8 optimizer steps with a checkpoint after step 4; a second launch resumes from
it. Checked: the loss is finite and goes down, the metrics files carry their fields, the resumed
run continues the step count (and the optimizer's own step count) and reproduces the
uninterrupted run's losses, and sharded engines reproduce the DDP losses.

Engines: DDP (``accelerate launch`` with launch/configs/cpu_2proc.yaml), DeepSpeed ZeRO-0 and
ZeRO-2 with ``"optimizer": {"type": "TVLARS"}`` in the JSON (``accelerate launch
--use_deepspeed``), FSDP2 (torchrun + ``--fsdp2``; accelerate's FSDP plugin does not run on CPU).

Two "nodes" on localhost: two launchers, each started as on its own machine (``--machine_rank`` /
``--node_rank`` 0 and 1, rendezvous at 127.0.0.1), for DDP (``accelerate launch`` with
launch/configs/ddp_multinode.yaml, one process per node: the same world as the one-node DDP run,
so the same losses) and HSDP (torchrun ``--nnodes 2``, 2 processes per node, ``--fsdp2
--fsdp2-replicate 2``: shards within a node, replicas across nodes), classification under both
and Barlow Twins under HSDP. Each checkpoints once per job (each step's records appear once; the
replicas' shards are not written twice) and resumes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT = 8, 4
TINY = [
    "--global-batch-size", "64", "--train-subset", "256", "--test-subset", "64",
    "--max-steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT), "--keep-checkpoints", "3",
    "--log-every", "1", "--telemetry-every", "2", "--eval-every", "4", "--lr", "8",
    "--no-progress", "--no-plots",
]  # fmt: skip
TRAIN_FIELDS = {
    "kind",
    "step",
    "epoch",
    "loss",
    "lr",
    "opt_step",
    "phi",
    "samples",
    "time",
    "samples_per_s",
}
EVAL_FIELDS = {"kind", "step", "epoch", "test_acc", "test_loss", "test_samples"}
LAYER_FIELDS = {"lwn", "lgn", "lnr", "trust_ratio", "scale"}


def _env() -> dict[str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _launch(prefix: list[str], script: str, run_dir: Path, *extra: str):
    cmd = [*prefix, str(ROOT / "launch" / script), *TINY, "--output-dir", str(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
DDP = [*ACCELERATE, "--config_file", str(ROOT / "launch/configs/cpu_2proc.yaml")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _deepspeed(tmp_path: Path, stage: int) -> list[str]:
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "TVLARS",
            "params": {
                "lr": "auto",
                "weight_decay": "auto",
                "lmbda": "auto",
                "delay_steps": "auto",
            },
        },
        "bf16": {"enabled": False},
    }
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return [*ACCELERATE, "--use_deepspeed", "--deepspeed_config_file", str(path),
            "--num_processes", "2", "--main_process_port", "0"]  # fmt: skip


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _check_run(run_dir: Path, first_step: int = 1, classification: bool = True) -> list[float]:
    train = _records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(first_step, STEPS + 1))
    for r in train:
        assert set(r) >= TRAIN_FIELDS, set(r)
        assert math.isfinite(r["loss"])
    # TVLARS' own counter (group["step"], in the optimizer state) moves with the run's.
    assert [r["opt_step"] for r in train] == [float(r["step"]) for r in train]
    if classification:
        evals = _records(run_dir, "eval")
        assert evals and all(set(r) >= EVAL_FIELDS for r in evals)
        assert all(r["test_samples"] == 64 for r in evals)  # the whole test set, once
    layers = [json.loads(line) for line in (run_dir / "layers.jsonl").read_text().splitlines()]
    assert layers and all(set(row) >= LAYER_FIELDS for r in layers for row in r["layers"].values())
    assert (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "train_state.json").is_file()
    _check_loads_weights_only(run_dir / "checkpoints" / f"step_{STEPS:07d}")
    return [r["loss"] for r in train]


def _check_loads_weights_only(folder: Path) -> None:
    """Every pickle file of a checkpoint loads with torch.load(weights_only=True): a shared
    checkpoint cannot run code. accelerate's random_states_N.pkl holds numpy arrays (numpy's
    array reconstruction allowed, as accelerate's own loader does); DeepSpeed's ZeRO files pickle
    DeepSpeed objects, DeepSpeed's format (docs/integrations.md): nothing else may appear."""
    import codecs

    import numpy as np
    import torch

    numpy_arrays = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    numpy_arrays += [type(np.dtype(np.uint32))]
    files = [f for f in folder.rglob("*") if f.suffix in (".pt", ".bin", ".pkl")]
    assert files
    for f in files:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        if unsafe and all(name.startswith("deepspeed.") for name in unsafe):
            continue
        with torch.serialization.safe_globals(numpy_arrays if f.suffix == ".pkl" else []):
            torch.load(f, weights_only=True)


def _assert_decreasing(losses: list[float]) -> None:
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def _resume_and_compare(prefix, script, tmp_path, full_dir, full_losses, *extra, launch=None):
    """``launch(prefix, ...)`` (default ``_launch``) as for the run that wrote ``full_dir``."""
    resumed = tmp_path / f"{full_dir.name}-resumed"
    checkpoint = full_dir / "checkpoints" / f"step_{CHECKPOINT:07d}"
    output = (launch or _launch)(prefix, script, resumed, "--resume", str(checkpoint), *extra)
    assert f"resumed from {checkpoint} at step {CHECKPOINT}" in output
    losses = _check_run(resumed, CHECKPOINT + 1, classification=script == "train_classification.py")
    # Same data, augmentation, LR, phi(t) and momentum after the restart: the same losses
    # (bit-identical here; 1e-6 leaves room for nondeterministic kernels elsewhere).
    assert losses == pytest.approx(full_losses[CHECKPOINT:], rel=1e-6)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ddp") / "classification"
    output = _launch(DDP, "train_classification.py", run_dir)
    assert "test accuracy:" in output
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and "MULTI_CPU" in config["distributed_type"]
    return run_dir, _check_run(run_dir)


def test_classification_ddp(ddp_run, tmp_path):
    run_dir, losses = ddp_run
    _assert_decreasing(losses)
    _resume_and_compare(DDP, "train_classification.py", tmp_path, run_dir, losses)


def test_plot_from_a_real_run(ddp_run, tmp_path):
    from tvlars_scale.plotting import main

    run_dir, _ = ddp_run
    main([str(run_dir), str(run_dir), "--out", str(tmp_path / "plots")])
    for name in ("loss.png", "accuracy.png", "phi.png", "lnr.png", "lnr_layers.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("stage", [0, 2])
def test_classification_deepspeed(stage, ddp_run, tmp_path):
    """TVLARS built by DeepSpeed from its JSON (ZeRO-2: flat partitions, exact layer norms)."""
    prefix = _deepspeed(tmp_path, stage)
    run_dir = tmp_path / f"zero{stage}"
    _launch(prefix, "train_classification.py", run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distributed_type"] == "DistributedType.DEEPSPEED"
    losses = _check_run(run_dir)
    _assert_decreasing(losses)
    # Same global batch, same init: DeepSpeed matches DDP up to fp32 summation order (ZeRO-2
    # reduce-scatters flat buckets; ~1e-7 relative per step, amplified over 8 steps).
    assert losses == pytest.approx(ddp_run[1], rel=1e-4)
    _resume_and_compare(prefix, "train_classification.py", tmp_path, run_dir, losses)


def test_classification_fsdp2_torchrun(ddp_run, tmp_path):
    run_dir = tmp_path / "fsdp2"
    _launch(TORCHRUN, "train_classification.py", run_dir, "--fsdp2")
    losses = _check_run(run_dir)
    _assert_decreasing(losses)
    # Sharded parameters, exact cross-rank norms: the DDP losses up to fp32 summation order.
    assert losses == pytest.approx(ddp_run[1], rel=1e-4)
    _resume_and_compare(TORCHRUN, "train_classification.py", tmp_path, run_dir, losses, "--fsdp2")


BARLOW_TWINS = ["--projector", "64-64", "--linear-epochs", "2", "--linear-batch-size", "64"]


def _check_barlow_twins(run_dir: Path, output: str) -> list[float]:
    """Pre-training ran and its loss went down; the linear classifier trained and was evaluated
    on the whole test set. Returns the pre-training losses."""
    assert "linear-eval test accuracy:" in output
    losses = _check_run(run_dir, classification=False)
    _assert_decreasing(losses)
    linear = _records(run_dir, "linear")
    assert linear and all(math.isfinite(r["loss"]) for r in linear)
    assert linear[-1]["loss"] < linear[0]["loss"]
    (final,) = _records(run_dir, "linear_eval")
    assert set(final) >= EVAL_FIELDS and final["test_samples"] == 64
    return losses


def test_barlow_twins_and_linear_eval_ddp(tmp_path):
    run_dir = tmp_path / "bt"
    output = _launch(DDP, "train_barlow_twins.py", run_dir, *BARLOW_TWINS)
    losses = _check_barlow_twins(run_dir, output)
    _resume_and_compare(DDP, "train_barlow_twins.py", tmp_path, run_dir, losses, *BARLOW_TWINS)


def test_gradient_accumulation_matches_data_parallel(ddp_run, tmp_path):
    """One process, 2 micro-batches of 32 accumulated = the DDP run's 2 ranks x 32: the same
    samples, augmentation and BatchNorm batches, and one optimizer step (one set of trust
    ratios) per global batch on the accumulated gradient, so the same training losses.
    (BatchNorm running statistics, and so test accuracy, legitimately differ.)"""
    run_dir = tmp_path / "accumulated"
    _launch([sys.executable], "train_classification.py", run_dir, "--per-device-batch-size", "32")
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["batch_plan"]["grad_accum"], config["num_processes"]) == (2, 1)
    losses = _check_run(run_dir)
    assert losses == pytest.approx(ddp_run[1], rel=1e-5)


def test_channels_last_matches_contiguous_ddp(ddp_run, tmp_path):
    """--channels-last under DDP trains as the contiguous run (the same losses up to the
    summation order of oneDNN's NHWC convolutions: 1e-7 measured, 1e-5 allowed), keeps the
    parameters channels-last (their momentum buffers, saved with their strides, show it), and
    resumes like any run."""
    import torch

    run_dir = tmp_path / "channels-last"
    _launch(DDP, "train_classification.py", run_dir, "--channels-last")
    losses = _check_run(run_dir)
    assert losses == pytest.approx(ddp_run[1], rel=1e-5)
    for folder, want in ((run_dir, True), (ddp_run[0], False)):
        saved = folder / "checkpoints" / f"step_{STEPS:07d}" / "optimizer.bin"
        state = torch.load(saved, weights_only=True)["state"].values()
        convs = [s["momentum_buffer"] for s in state if s["momentum_buffer"].ndim == 4]
        assert [t.is_contiguous() for t in convs if t.shape[1] > 1] == [not want] * 2
    _resume_and_compare(
        DDP, "train_classification.py", tmp_path, run_dir, losses, "--channels-last"
    )


def test_channels_last_is_refused_under_deepspeed(tmp_path):
    """DeepSpeed flattens parameters into contiguous partitions, where --channels-last would do
    nothing: the recipe refuses it in one line before building the model."""
    cmd = [*_deepspeed(tmp_path, 2), str(ROOT / "launch" / "train_classification.py"), *TINY]
    cmd += ["--output-dir", str(tmp_path / "run"), "--channels-last"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert (
        "error: --channels-last is supported in one process and under DDP, not with "
        "accelerate's DEEPSPEED" in proc.stderr
    ), proc.stderr[-3000:]
    # (accelerate's launcher prints its own traceback when a rank exits with an error)
    assert "ConfigError" not in proc.stderr and not (tmp_path / "run" / "config.json").exists()


# ----------------------------------------------------------------------------- two "nodes"
def _ddp_node(rank: int, port: int) -> list[str]:
    return [*ACCELERATE, "--config_file", str(ROOT / "launch/configs/ddp_multinode.yaml"),
            "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--mixed_precision", "no"]  # fmt: skip


def _torchrun_node(rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
            "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port",
            str(port)]  # fmt: skip


def _launch_two_nodes(node: Callable[[int, int], list[str]], script: str, run_dir: Path, *extra):
    """Start the launchers of node 0 and node 1 as two machines would, and wait for both. Their
    output goes to files: a full pipe would block one node while the other waits for it."""
    port = free_port()
    logs = [run_dir.parent / f"{run_dir.name}-node{rank}.log" for rank in (0, 1)]
    cmd = [str(ROOT / "launch" / script), *TINY, "--output-dir", str(run_dir), *extra]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            procs.append(
                subprocess.Popen(
                    [*node(rank, port), *cmd],
                    cwd=ROOT,
                    env=_env(),
                    stdout=out,
                    stderr=out,
                    start_new_session=True,  # a process group per node, to end its workers
                )
            )
    deadline = time.monotonic() + 600
    try:  # a node that fails leaves the other waiting in the rendezvous: stop it at once
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(code is not None for code in codes) or any(codes):
                break
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, "\n".join(
        f"node {rank} (exit code {procs[rank].returncode}):\n{logs[rank].read_text()[-4000:]}"
        for rank in failed
    )
    return logs[0].read_text()


@pytest.fixture(scope="module")
def two_node_ddp(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_nodes") / "ddp"
    _launch_two_nodes(_ddp_node, "train_classification.py", run_dir)
    return run_dir, _check_run(run_dir)


def test_two_nodes_ddp_match_one_node(two_node_ddp, ddp_run, tmp_path):
    run_dir, losses = two_node_ddp
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 2 and "MULTI_CPU" in config["distributed_type"]
    # Ranks 0 and 1 of the same world, on two "machines": the one-node run, step for step.
    assert losses == pytest.approx(ddp_run[1], rel=1e-6)
    _resume_and_compare(
        _ddp_node, "train_classification.py", tmp_path, run_dir, losses, launch=_launch_two_nodes
    )


def test_two_nodes_hsdp(two_node_ddp, tmp_path):
    run_dir = tmp_path / "hsdp"
    extra = ["--fsdp2", "--fsdp2-replicate", "2"]
    _launch_two_nodes(_torchrun_node, "train_classification.py", run_dir, *extra)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_processes"] == 4
    losses = _check_run(run_dir)
    _assert_decreasing(losses)
    # Every rank writes its shard; a replica's identical shards are written once, so the
    # checkpoint is about the size of the DDP one (model + optimizer), not twice it.
    checkpoint = run_dir / "checkpoints" / f"step_{CHECKPOINT:07d}"
    sharded = sum(f.stat().st_size for f in checkpoint.glob("*.distcp"))
    ddp = two_node_ddp[0] / "checkpoints" / f"step_{CHECKPOINT:07d}"
    whole = sum((ddp / name).stat().st_size for name in ("model.safetensors", "optimizer.bin"))
    assert 0.9 * whole < sharded < 1.5 * whole, (sharded, whole)
    _resume_and_compare(
        _torchrun_node,
        "train_classification.py",
        tmp_path,
        run_dir,
        losses,
        *extra,
        launch=_launch_two_nodes,
    )


def test_two_nodes_barlow_twins_hsdp(tmp_path):
    """Barlow Twins + linear evaluation on two "nodes", HSDP with the replicas across them (the
    cross-rank sums of the Barlow Twins loss span both nodes); resumes to the same losses."""
    run_dir = tmp_path / "bt-hsdp"
    extra = [*BARLOW_TWINS, "--fsdp2", "--fsdp2-replicate", "2"]
    output = _launch_two_nodes(_torchrun_node, "train_barlow_twins.py", run_dir, *extra)
    assert json.loads((run_dir / "config.json").read_text())["num_processes"] == 4
    losses = _check_barlow_twins(run_dir, output)
    _resume_and_compare(
        _torchrun_node,
        "train_barlow_twins.py",
        tmp_path,
        run_dir,
        losses,
        *extra,
        launch=_launch_two_nodes,
    )
