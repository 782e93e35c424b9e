"""A rank dies mid-run (SIGKILL); torchrun's elastic agent restarts the job, which resumes with
``--resume auto`` from the newest complete checkpoint and must end exactly where an
uninterrupted run ends: same final parameters, same per-step losses, and metrics.jsonl holding
each step once (the telemetry cursor cut off what the dead attempt wrote after its checkpoint).

The classification recipe on digits, 2 CPU processes, gloo, under DDP and under DeepSpeed ZeRO-2
with ``"optimizer": {"type": "TVLARS"}`` in the JSON. Rank 1 kills itself after step KILL_AT on
the first attempt only (``TVLARS_FAULT_KILL``, see ``tvlars_scale.recipes.faults``). Both runs
also get a NaN loss on rank 1 in step NAN_AT (``TVLARS_FAULT_NAN``): every rank skips that step,
metrics.jsonl counts it (``skipped_steps``), and the count survives the restart (it is in the
optimizer state). Every run is deterministic on CPU, so "equal" means bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AT = 8, 3, 5  # checkpoints at 3, 6, 8; the kill falls between 3 and 6
NAN_AT = 2
ARGS = [
    "--global-batch-size", "64", "--train-subset", "256", "--test-subset", "64",
    "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--keep-checkpoints", "5",
    "--log-every", "1", "--telemetry-every", "1", "--eval-every", str(STEPS), "--lr", "8",
    "--no-progress", "--no-plots", "--resume", "auto",
]  # fmt: skip
DEEPSPEED_ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": 0.0,
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "TVLARS", "params": {"lr": "auto", "weight_decay": "auto"}},
    "bf16": {"enabled": False},
}


def _torchrun(run_dir: Path, env_extra: dict[str, str]) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "--max-restarts", "1", "--monitor-interval", "0.2",
        str(ROOT / "launch" / "train_classification.py"), *ARGS, "--output-dir", str(run_dir),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env.pop("ACCELERATE_USE_CPU", None)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out:\n{exc.stdout}\n{exc.stderr}") from None
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    if (folder / "model.safetensors").is_file():  # accelerate's save_state of a DDP model
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    # DeepSpeed's engine.save_checkpoint: the module's weights in the model-states file.
    states = torch.load(folder / "pytorch_model" / "mp_rank_00_model_states.pt", weights_only=False)
    return states["module"]


def _train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.parametrize("engine", ["ddp", "deepspeed-zero2"])
def test_a_killed_rank_restarts_and_ends_where_an_uninterrupted_run_ends(engine, tmp_path):
    env = {"TVLARS_FAULT_NAN": f"1:{NAN_AT}"}
    if engine.startswith("deepspeed"):
        config = tmp_path / "zero2.json"
        config.write_text(json.dumps(DEEPSPEED_ZERO2))
        env |= {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _torchrun(clean, env)
    output = _torchrun(killed, env | {"TVLARS_FAULT_KILL": f"1:{KILL_AT}"})

    # The first attempt died (SIGKILL on rank 1), the second resumed from step 3.
    assert "failed (exitcode: -9) local_rank: 1" in output, output[-3000:]
    assert f"step_{EVERY:07d} at step {EVERY}" in output
    if engine.startswith("deepspeed"):
        config = json.loads((killed / "config.json").read_text())
        assert "DEEPSPEED" in config["distributed_type"]
    want, got = _final_params(clean), _final_params(killed)
    assert want.keys() == got.keys() and want
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # Each step logged once, with the uninterrupted run's losses and optimizer step counts.
    records, reference = _train_records(killed), _train_records(clean)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "opt_step", "skipped_steps", "lr"):
        assert [r[key] for r in records] == [r[key] for r in reference], key
    # The NaN step: skipped on every rank, counted from then on, the counter restored on resume.
    assert [r["skipped_steps"] for r in records] == [int(s >= NAN_AT) for s in range(1, STEPS + 1)]
    assert [r["opt_step"] for r in records] == [s - (s >= NAN_AT) for s in range(1, STEPS + 1)]
    layers = [json.loads(x)["step"] for x in (killed / "layers.jsonl").read_text().splitlines()]
    assert layers == list(range(1, STEPS + 1))
    state = json.loads(
        (killed / "checkpoints" / f"step_{STEPS:07d}" / "train_state.json").read_text()
    )
    assert state["step"] == STEPS and state["world_size"] == 2
    assert (state["epoch"], state["step_in_epoch"]) == divmod(STEPS, 4)
    assert not list((killed / "checkpoints").glob("*.partial"))
