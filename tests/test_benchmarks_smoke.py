"""Tiny invocations of every benchmark script, so that they do not rot.

Each runs the script as a user would (a subprocess, with this checkout on PYTHONPATH) with the
smallest settings that still go through all of its code paths, and checks the table it prints.
No numbers are asserted: these are not benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
_RUN_LINE = re.compile(
    r"^\S+ done \S+: val [\d.]+% test [\d.]+%", re.MULTILINE
)  # a run that trained


def _output(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """The stdout of ``argv`` run from the repository root; the test fails on a non-zero exit."""
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _run(script: str, *args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return _output([sys.executable, str(BENCH / script), *args], env, timeout)


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
    assert "| LAMB |" in out and "LAMB, per step on rank 0" in out


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
        "--bt-batches",
        "256",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "2",
        "--bt-epochs",
        "1",
        "--linear-epochs",
        "1",
        "--optimizers",
        "tvlars",
        "--bt-optimizers",
        "tvlars",
        "--lr-factors",
        "0.5",
        "1",
        "--max-extend",
        "0",
        "--bt-lr-factors",
        "1",
        "--train-subset",
        "512",
        "--test-subset",
        "128",
    ]
    out = _run(*args, timeout=600)
    # grid (2 LRs, seed 0) and seed 1 at the chosen LR; Barlow Twins grid and seed 1
    assert len(_RUN_LINE.findall(out)) == 5, out
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    grid = [r for r in rows if r["kind"] == "cls" and r["phase"] == "grid"]
    chosen = max(grid, key=lambda r: r["val_acc"])["lr"]  # chosen on validation
    (seed,) = [r for r in rows if r["kind"] == "cls" and r["phase"] == "seed"]
    assert seed["lr"] == chosen and seed["seed"] == 1 and seed["val_samples"] == 6000
    assert all(0 <= r["test_acc"] <= 1 and r["curve"] for r in grid)
    assert "| 256 (4) | tvlars | 0.7071: " in (tmp_path / "report.md").read_text()
    assert (tmp_path / "curves.png").exists() and (tmp_path / "plots/cls-b256/lnr.png").exists()
    assert (tmp_path / "bt_curves.png").exists()
    assert not _RUN_LINE.findall(_run(*args))  # a rerun skips every finished run
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text(
        "before\n<!-- accuracy_study.py report: begin -->\nold\n"
        "<!-- accuracy_study.py report: end -->\nafter\n"
    )
    _run(*args, "--report", "--results-md", str(results_md))
    text = results_md.read_text()
    assert "old" not in text and "| 256 (4) | tvlars |" in text and text.endswith("after\n")


def test_accuracy_study_grid_grows_beyond_an_edge(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("accuracy_study", BENCH / "accuracy_study.py")
    study_module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "accuracy_study", study_module)  # for its dataclasses
    spec.loader.exec_module(study_module)
    study = study_module.Study(out=tmp_path, max_extend=2)
    results = tmp_path / "results.jsonl"

    def finish(lr: float, val_acc: float) -> None:
        run = study_module.RunSpec("cls", "tvlars", 1024, lr, 0, "grid")
        with open(results, "a") as f:
            f.write(json.dumps({"tag": run.tag, "val_acc": val_acc}) + "\n")

    assert study.grid("cls", "tvlars", 1024) == ([1.5, 3.0, 6.0], False)
    for lr, acc in ((1.5, 0.80), (3.0, 0.82), (6.0, 0.85)):
        finish(lr, acc)
    assert study.grid("cls", "tvlars", 1024) == ([1.5, 3.0, 6.0, 12.0], False)  # best on the edge
    assert study.chosen_lr("cls", 1024, "tvlars") is None
    finish(12.0, 0.86)
    finish(24.0, 0.87)
    # at most max_extend (2) steps beyond the edge: settled on 24 although it is the edge
    assert study.grid("cls", "tvlars", 1024) == ([1.5, 3.0, 6.0, 12.0, 24.0], True)
    assert study.chosen_lr("cls", 1024, "tvlars") == 24.0
    results.write_text("")
    for lr, acc in ((1.5, 0.85), (3.0, 0.82), (6.0, 0.80), (0.75, 0.84)):
        finish(lr, acc)
    assert study.grid("cls", "tvlars", 1024) == ([0.75, 1.5, 3.0, 6.0], True)  # best inside
    assert study.chosen_lr("cls", 1024, "tvlars") == 1.5


@pytest.mark.skipif(not (BENCH / "soak.py").exists(), reason="benchmarks/soak.py not merged yet")
def test_soak_smoke():
    _run("soak.py", "--help")


def _gpu_study(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    return _output(["bash", str(BENCH / "gpu_study.sh"), *args], env, timeout)


@pytest.mark.dataset("fashion-mnist")
def test_gpu_study_cpu_smoke(tmp_path, dataset_dir):
    """gpu_study.sh --cpu-smoke: the staged data, the run order, $OUT, resume and the budget."""
    data = tmp_path / "data" / "fashion-mnist"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_STUDY_")}
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        FASHION_MNIST_SRC=dataset_dir,
        GPU_STUDY_DATA=str(data),
        GPU_STUDY_DIR=str(tmp_path / "study"),
        OUT=str(tmp_path / "out"),
    )
    assert "staged" in _gpu_study("--stage-data", env=env)
    out = _gpu_study("--cpu-smoke", env=env)
    # the middle of the grid (1, 2) first, each run restricted to itself, reading the staged copy
    done = re.findall(r"^\S+ done (\S+):", out, re.MULTILINE)
    assert done == ["cls-b128-tvlars-lr2-s0", "cls-b128-tvlars-lr1-s0"], out
    rows = [json.loads(x) for x in (tmp_path / "study/results.jsonl").read_text().splitlines()]
    recipe_options = f"--data-dir={data} --stem=imagenet --mixed-precision=no --channels-last"
    assert all(recipe_options in r["command"] for r in rows)
    files = list((tmp_path / "out").iterdir())  # what the device returns: <= 8 plain files
    assert {"results.jsonl", "report.md", "study.log", "machine.log"} <= {p.name for p in files}
    assert len(files) <= 8 and all(p.is_file() for p in files)
    assert "| 128 (2) | tvlars | 1: " in (tmp_path / "out/report.md").read_text()
    # A rerun skips the finished runs; out of budget it starts none and names what is left:
    # seed 1 at the LR chosen on validation (the smaller LR on a tie, as accuracy_study does).
    chosen = max(sorted(rows, key=lambda r: r["lr"]), key=lambda r: r["val_acc"])["lr"]
    env.update(GPU_STUDY_SEEDS="0 1", GPU_STUDY_BUDGET_S="0", OUT=str(tmp_path / "out2"))
    out = _gpu_study("--cpu-smoke", env=env)
    assert not _RUN_LINE.findall(out)
    assert f"not started (1): cls-b128-tvlars-lr{chosen:g}-s1" in out
    assert len((tmp_path / "study/results.jsonl").read_text().splitlines()) == 2
