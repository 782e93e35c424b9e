"""Tiny invocations of every benchmark script, so that they do not rot.

Each runs the script as a user would (a subprocess, with this checkout on PYTHONPATH) with the
smallest settings that still go through all of its code paths, and checks the table it prints.
No numbers are asserted: these are not benchmarks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
_RUN_LINE = re.compile(r"^b\d+-\S+: [\d.]+% \(\d+ s\)$", re.MULTILINE)  # a run that trained


def _run(script: str, *args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_step_time_smoke():
    out = _run(
        "step_time.py",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--malloc",
        "default",
        "--clock",
        "cpu",
        "--optimizers",
        "SGD(foreach)",
        "AdamW(foreach)",
        "TVLARS",
        "LAMB",
    )
    assert "| TVLARS |" in out and "x AdamW(foreach)" in out


def test_sharded_step_smoke():
    out = _run(
        "sharded_step.py",
        "--model",
        "resnet18",
        "--repeats",
        "2",
        "--profile",
        "--top",
        "3",
        "--optimizers",
        "SGD(foreach)",
        "TVLARS",
        "LAMB",
    )
    assert "| LAMB |" in out and "LAMB, one step on rank 0" in out


def test_comm_bytes_smoke(tmp_path):
    out_json = tmp_path / "comm.json"
    out = _run(
        "comm_bytes.py",
        "--model",
        "resnet18",
        "--engines",
        "fsdp2",
        "--world-sizes",
        "2",
        "--steps",
        "1",
        "--no-size-table",
        "--out",
        str(out_json),
    )
    measured = json.loads(out_json.read_text())["measured"]["fsdp2_2ranks"]
    # The core's promise, in the benchmark's own counting: one all-reduce of 2L+1 floats.
    assert measured["TVLARS"]["calls"] == 1
    assert measured["TVLARS"]["bytes"] == (2 * measured["layers"] + 1) * 4
    assert measured["per-param all-reduce"]["calls"] == measured["layers"]
    assert "| gather full params |" in out


@pytest.mark.dataset("fashion-mnist")
def test_accuracy_study_smoke(tmp_path, dataset_dir):
    args = [
        "accuracy_study.py",
        "--data-dir",  # passed through to the recipe
        dataset_dir,
        "--out",
        str(tmp_path),
        "--batches",
        "256",
        "--train-subset",
        "512",
        "--test-subset",
        "128",
        "--epochs",
        "2",
        "--delay-epochs",
        "1",
        "--optimizers",
        "tvlars",
        "--grid-size",
        "1",
        "--ablation",
        "0.1",
    ]
    out = _run(*args)
    assert len(_RUN_LINE.findall(out)) == 3  # grid (seed 0), ablation, confirm (seed 1)
    assert "| 0.1 |" in out  # the ablation table
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert report["table"][0]["seeds"] == 2
    assert (tmp_path / "accuracy_curves.png").exists() and (tmp_path / "lnr_16k.png").exists()
    assert not _RUN_LINE.findall(_run(*args))  # a rerun skips every finished run


@pytest.mark.skipif(not (BENCH / "soak.py").exists(), reason="benchmarks/soak.py not merged yet")
def test_soak_smoke():
    _run("soak.py", "--help")
