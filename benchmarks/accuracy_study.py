"""Large-batch accuracy study (v2): TVLARS against WA-LARS, NOWA-LARS and LAMB on Fashion-MNIST.

    # the study in benchmarks/RESULTS.md: resumable, niced, meant to span sessions
    nohup nice -n 19 python benchmarks/accuracy_study.py --cpu-budget-hours 2 \\
        >> benchmarks/results/accuracy_v2/study.log 2>&1 &
    python benchmarks/accuracy_study.py --status     # what is finished, running, missing
    python benchmarks/accuracy_study.py --report     # tables and plots from what has finished

What it runs (every run is one process of the shipped recipe, ``launch/train_classification.py``
or ``launch/train_barlow_twins.py``, so the study measures the code users run):

- **Data**: Fashion-MNIST at 28x28 (Debian ``dataset-fashion-mnist``), the full 60,000 training
  images with a seeded 10% held out as the validation split (``--val-fraction``): 54,000 train,
  6,000 validation, and the 10,000 test images. LRs are chosen on validation accuracy only; the
  test set is reported, never used to choose.
- **Model**: ``small-cnn-s2`` of width 16 (24k parameters; stride-2 first convolution), whose
  epoch costs ~15 CPU-seconds at 28x28 (``--model``/``--width`` to change).
- **Classification**: 18 epochs at global batch 1K, 4K and 16K (936, 234 and 54 optimizer
  steps; micro-batch 512), for TVLARS (the recipe's default decay: centred at 10% of the run,
  phi = 0.05 at its end, the same at every batch size), WA-LARS (warm-up over 10% of the run,
  then cosine), NOWA-LARS (polynomial decay) and LAMB (warm-up 10%, cosine).
- **Barlow Twins**: 15 pre-training epochs at 1K and 4K (the loss over the whole global batch:
  micro-batch = global batch), then 10 epochs of linear evaluation (SGD, cosine; the recipe's
  defaults), for TVLARS, WA-LARS and LAMB; with ``--channels-last`` (1.4x faster on CPU at
  batch 4096, the same arithmetic up to summation order).
- **LRs**: a grid of 3 per method and batch on seed 0, then the other seeds at the LR with the
  best final validation accuracy. The LARS family's grid is x0.5, x1, x2 the recipes' default
  (the middle of the paper's set, ``recipes.config.default_lr``); LAMB's is the same relative
  step per layer (x eta / (1 - momentum)); Barlow Twins uses x1/3, x1, x3. While the best LR
  sits on an edge of its grid, the grid grows by one step beyond it (at most ``--max-extend``
  = 2 per side), so that a chosen LR is an optimum of the grid, not its edge.

Order (most informative first): the classification grid at the two largest batches, their second
seed, the Barlow Twins grid and second seed, the classification grid at the other batches and
their second seed, then the third seed everywhere. Each finished run appends one JSON line to
``results.jsonl`` (a rerun skips it); an interrupted run resumes from its last checkpoint
(``--resume auto``). With
``--cpu-budget-hours`` no new run starts once the runs started by this invocation have used that
much CPU. ``sessions.jsonl`` records every invocation (command, date, machine, CPU used).

Outputs (``--out``): ``results.jsonl``, ``sessions.jsonl``, ``report.md`` (the tables of
RESULTS.md), ``curves.png`` (classification accuracy per epoch), ``bt_curves.png`` (the Barlow
Twins loss per epoch), ``plots/<kind>-b<batch>/`` (``tvlars-plot`` of one run per method: loss,
accuracy, per-layer LNR), ``runs/<tag>/`` (run folders, not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tvlars_scale.recipes.config import default_lr  # noqa: E402
from tvlars_scale.recipes.data import FASHION_MNIST_DIR  # noqa: E402
from tvlars_scale.recipes.optim import OPTIMIZERS as RECIPE_OPTIMIZERS  # noqa: E402
from tvlars_scale.schedules import TVLARSPhi  # noqa: E402

DEFAULT_FINAL_FACTOR = TVLARSPhi.DEFAULT_FINAL_FACTOR

SCRIPTS = {
    "cls": REPO / "launch" / "train_classification.py",
    "bt": REPO / "launch" / "train_barlow_twins.py",
}
OPTIMIZERS = ("tvlars", "wa-lars", "nowa-lars", "lamb")
BT_OPTIMIZERS = ("tvlars", "wa-lars", "lamb")
KIND_NAMES = {"cls": "classification", "bt": "Barlow Twins + linear evaluation"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _round(x: float) -> float:
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class RunSpec:
    kind: str  # "cls" or "bt"
    optimizer: str
    batch: int
    lr: float
    seed: int
    phase: str
    final_factor: float | None = None  # TVLARS' phi at the last step; None: the recipe's

    @property
    def tag(self) -> str:
        tag = f"{self.kind}-b{self.batch}-{self.optimizer}-lr{self.lr:g}-s{self.seed}"
        if self.final_factor is not None:
            tag += f"-ff{self.final_factor:g}"
        # A recheck reruns a finished run's command on today's code, beside the original.
        return tag + "-recheck" if self.phase == "recheck" else tag


@dataclass
class Study:
    out: Path
    batches: tuple[int, ...] = (16384, 4096, 1024)
    bt_batches: tuple[int, ...] = (4096, 1024)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: float = 18
    bt_epochs: float = 15
    linear_epochs: float = 10
    val_fraction: float = 0.1
    warmup_fraction: float = 0.1
    model: str = "small-cnn-s2"
    width: int = 16
    micro_batch: int = 512
    optimizers: tuple[str, ...] = OPTIMIZERS
    bt_optimizers: tuple[str, ...] = BT_OPTIMIZERS
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    bt_lr_factors: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    max_extend: int = 3
    eta: float = 1e-3
    momentum: float = 0.9
    # Study v3: TVLARS' decay as a hyperparameter at these batches (phi at the last step, at the
    # two best LRs of the default decay), and earlier runs rerun on today's code.
    decay_batches: tuple[int, ...] = (1024,)
    final_factors: tuple[float, ...] = (0.25, 0.45)
    rechecks: tuple[str, ...] = ("cls-b16384-tvlars-lr34-s0", "cls-b4096-lamb-lr0.09-s0")
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)  # replaces the base grid
    seed_optimizers: tuple[str, ...] | None = None  # run on the other seeds; None: all
    train_subset: int = 0
    test_subset: int = 0
    threads: int = 1
    device: str = "cpu"
    plots: bool = True  # with each report
    extra: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ settings
    @property
    def results_file(self) -> Path:
        return self.out / "results.jsonl"

    def lrs(self, kind: str, optimizer: str, batch: int) -> tuple[float, ...]:
        """The base grid: the recipes' default LR for the batch (LAMB: the same per-layer
        relative step, lr * eta / (1 - momentum)) times the kind's factors."""
        if optimizer in self.lr_grid:
            return self.lr_grid[optimizer]
        mid = default_lr(batch)
        if optimizer == "lamb":
            mid *= self.eta / (1 - self.momentum)
        return tuple(_round(mid * f) for f in self.factors(kind))

    def factors(self, kind: str) -> tuple[float, ...]:
        return self.lr_factors if kind == "cls" else self.bt_lr_factors

    def grid(self, kind: str, optimizer: str, batch: int) -> tuple[list[float], bool]:
        """(LRs to try on seed 0, settled). The base grid, extended one grid step beyond an
        edge while the best validation accuracy sits on that edge (at most ``max_extend``
        times per side): a best LR on the edge of its grid says little. Settled when every
        LR has finished and the best is inside, or the extension is used up."""
        done = self.results()
        factors = sorted(self.factors(kind))
        ratio = factors[-1] / factors[-2] if len(factors) > 1 else 1.0
        tried = sorted(self.lrs(kind, optimizer, batch))
        for _ in range(2 * self.max_extend + 1):
            scores = [self._val(done, kind, optimizer, batch, lr) for lr in tried]
            if None in scores or ratio == 1.0:
                return tried, None not in scores
            best = tried[scores.index(max(scores))]
            up = sum(lr > max(self.lrs(kind, optimizer, batch)) for lr in tried)
            down = sum(lr < min(self.lrs(kind, optimizer, batch)) for lr in tried)
            if best == tried[-1] and up < self.max_extend:
                tried.append(_round(tried[-1] * ratio))
            elif best == tried[0] and down < self.max_extend:
                tried.insert(0, _round(tried[0] / ratio))
            else:
                return tried, True
        return tried, True

    def shown_lr(self, kind: str, batch: int, optimizer: str) -> tuple[float, bool] | None:
        """(LR, settled) for figures: the chosen LR, or while the grid is open the best one on
        validation so far; None before any grid run has finished."""
        tried, _ = self.grid(kind, optimizer, batch)
        done = self.results()
        scored = [lr for lr in tried if self._val(done, kind, optimizer, batch, lr) is not None]
        if not scored:
            return None
        chosen = self.chosen_lr(kind, batch, optimizer)
        best = max(scored, key=lambda lr: self._val(done, kind, optimizer, batch, lr))
        return (chosen, True) if chosen is not None else (best, False)

    def _val(self, done: dict, kind: str, optimizer: str, batch: int, lr: float) -> float | None:
        row = done.get(RunSpec(kind, optimizer, batch, lr, self.seeds[0], "grid").tag)
        return None if row is None else row["val_acc"]

    def steps_per_epoch(self, batch: int) -> int:
        train = self.train_subset or round(60_000 * (1 - self.val_fraction))
        return max(1, train // batch)

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.tag

    def command(self, spec: RunSpec) -> list[str]:
        epochs = self.epochs if spec.kind == "cls" else self.bt_epochs
        micro = self.micro_batch if spec.kind == "cls" else spec.batch
        cmd = [
            sys.executable,
            str(SCRIPTS[spec.kind]),
            "--dataset=fashion-mnist",
            f"--val-fraction={self.val_fraction:g}",
            f"--model={self.model}",
            f"--global-batch-size={spec.batch}",
            f"--max-per-device-batch-size={micro}",
            f"--optimizer={spec.optimizer}",
            f"--lr={spec.lr:g}",
            f"--seed={spec.seed}",
            f"--epochs={epochs:g}",
            f"--output-dir={self.run_dir(spec)}",
            "--resume=auto",  # an interrupted run continues from its last checkpoint
            f"--checkpoint-every={2 * self.steps_per_epoch(spec.batch)}",
            "--keep-checkpoints=1",
            "--no-final-checkpoint",
            "--no-progress",
            "--no-plots",
            "--log-every=1",
            f"--telemetry-every={max(1, round(epochs * self.steps_per_epoch(spec.batch)) // 60)}",
        ]
        # Only where the optimizer's schedule warms up: the recipes refuse an ignored option.
        if RECIPE_OPTIMIZERS[spec.optimizer][1] == "warmup-cosine":
            cmd.append(f"--warmup-epochs={self.warmup_fraction * epochs:g}")
        if spec.final_factor is not None:
            cmd.append(f"--final-factor={spec.final_factor:g}")
        if self.width:
            cmd.append(f"--width={self.width}")
        if spec.kind == "bt":
            cmd += [f"--linear-epochs={self.linear_epochs:g}", "--channels-last"]
        if self.train_subset:
            cmd.append(f"--train-subset={self.train_subset}")
        if self.test_subset:
            cmd.append(f"--test-subset={self.test_subset}")
        return cmd + self.extra

    # ------------------------------------------------------------------ results
    def results(self) -> dict[str, dict]:
        if not self.results_file.exists():
            return {}
        rows = [json.loads(x) for x in self.results_file.read_text().splitlines() if x.strip()]
        return {r["tag"]: r for r in rows}

    def chosen_lr(self, kind: str, batch: int, optimizer: str) -> float | None:
        """The grid LR with the best final validation accuracy on seed 0; None until the grid
        of that cell is settled (``grid``)."""
        tried, settled = self.grid(kind, optimizer, batch)
        if not settled:
            return None
        done = self.results()
        return max(tried, key=lambda lr: self._val(done, kind, optimizer, batch, lr))

    # ------------------------------------------------------------------ phases
    def phases(self) -> list[Phase]:
        """The study's phases, in the order they run."""
        large, rest = self.batches[:2], self.batches[2:]
        second, others = self.seeds[1:2], self.seeds[2:]
        decay_cls = tuple(b for b in self.decay_batches if b in self.batches)
        decay_bt = tuple(b for b in self.decay_batches if b in self.bt_batches)
        return [
            Phase("cls grid, largest batches", "cls", large, None),
            Phase("cls 2nd seed, largest batches", "cls", large, second),
            Phase("bt grid", "bt", self.bt_batches, None),
            Phase("bt 2nd seed", "bt", self.bt_batches, second),
            Phase("cls grid, other batches", "cls", rest, None),
            Phase("cls 2nd seed, other batches", "cls", rest, second),
            Phase("cls more seeds", "cls", self.batches, others),
            Phase("bt more seeds", "bt", self.bt_batches, others),
            # study v3
            Phase("recheck", "cls", self.batches, None, rule="recheck"),
            Phase("cls tvlars decay", "cls", decay_cls, None, rule="decay"),
            Phase("bt tvlars decay", "bt", decay_bt, None, rule="decay"),
            Phase("cls tvlars decay winner", "cls", decay_cls, self.seeds[1:], "decay winner"),
            Phase("bt tvlars decay winner", "bt", decay_bt, self.seeds[1:], "decay winner"),
            Phase("bt more seeds, decay batches", "bt", decay_bt, others),
        ]

    def specs(self, phase: Phase) -> list[RunSpec | None]:
        """The phase's runs; None for a run whose LR is not chosen yet (its grid, or the
        decay runs it is chosen from, are not finished)."""
        if phase.rule == "recheck":
            done = self.results()
            return [
                RunSpec(**_spec_fields(done[tag]) | {"phase": "recheck"})
                for tag in self.rechecks
                if tag in done
            ]
        if phase.rule in ("decay", "decay winner"):
            return [s for b in phase.batches for s in self._decay_specs(phase, b)]
        opts = self.optimizers if phase.kind == "cls" else self.bt_optimizers
        if phase.seeds is not None and self.seed_optimizers is not None:
            opts = tuple(o for o in opts if o in self.seed_optimizers)
        specs: list[RunSpec | None] = []
        for b in phase.batches:
            for opt in opts:
                if phase.seeds is None:
                    lrs, _ = self.grid(phase.kind, opt, b)
                    specs += [RunSpec(phase.kind, opt, b, lr, self.seeds[0], "grid") for lr in lrs]
                    continue
                lr = self.chosen_lr(phase.kind, b, opt)
                specs += [
                    RunSpec(phase.kind, opt, b, lr, s, "seed") if lr is not None else None
                    for s in phase.seeds
                ]
        return specs

    def decay_lrs(self, kind: str, batch: int) -> list[float] | None:
        """TVLARS' two best grid LRs on validation (default decay, seed 0), best first; None
        until its grid is settled."""
        tried, settled = self.grid(kind, "tvlars", batch)
        if not settled:
            return None
        done = self.results()
        return sorted(tried, key=lambda lr: -self._val(done, kind, "tvlars", batch, lr))[:2]

    def decay_cells(self, kind: str, batch: int) -> list[tuple[float, float | None]]:
        """The (LR, final_factor) pairs TVLARS' decay is chosen from: the two best LRs, each
        with the default decay (None) and every ``final_factors``."""
        lrs = self.decay_lrs(kind, batch) or []
        return [(lr, ff) for lr in lrs for ff in (None, *self.final_factors)]

    def decay_winner(self, kind: str, batch: int) -> tuple[float, float | None] | None:
        """The (LR, final_factor) with the best validation accuracy on seed 0 among
        ``decay_cells``; None until all of them have finished."""
        done, cells = self.results(), self.decay_cells(kind, batch)
        seed = self.seeds[0]
        vals = [done.get(self._decay_spec(kind, batch, lr, ff, seed).tag) for lr, ff in cells]
        if not cells or None in vals:
            return None
        return max(zip(cells, vals, strict=True), key=lambda cv: cv[1]["val_acc"])[0]

    def _decay_spec(self, kind: str, batch: int, lr: float, ff: float | None, seed: int) -> RunSpec:
        phase = "grid" if ff is None and seed == self.seeds[0] else "decay"
        return RunSpec(kind, "tvlars", batch, lr, seed, phase, ff)

    def _decay_specs(self, phase: Phase, batch: int) -> list[RunSpec | None]:
        kind = phase.kind
        if phase.rule == "decay":
            if self.decay_lrs(kind, batch) is None:
                return [None] * 2 * len(self.final_factors)
            cells = [(lr, ff) for lr, ff in self.decay_cells(kind, batch) if ff is not None]
            return [self._decay_spec(kind, batch, lr, ff, self.seeds[0]) for lr, ff in cells]
        winner = self.decay_winner(kind, batch)
        if winner is None:
            return [None] * len(phase.seeds)
        return [self._decay_spec(kind, batch, *winner, seed) for seed in phase.seeds]


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str
    batches: tuple[int, ...]
    seeds: tuple[int, ...] | None  # None: on the first seed only
    rule: str = "lr"  # lr: the LR grid or the chosen LR; decay, decay winner, recheck: v3


class Runner:
    """Runs specs in a thread pool (one recipe process each), appending finished runs."""

    def __init__(self, study: Study, workers: int, cpu_budget_s: float | None) -> None:
        self.study, self.workers, self.cpu_budget_s = study, workers, cpu_budget_s
        self.cpu_used = 0.0  # CPU seconds of the runs this invocation started
        self.lock = threading.Lock()
        self.stopped = False

    def run(self, spec: RunSpec) -> dict | None:
        study = self.study
        if spec.tag in study.results():
            return None
        with self.lock:
            if self.cpu_budget_s is not None and self.cpu_used >= self.cpu_budget_s:
                self.stopped = True
                return None
        folder = study.run_dir(spec)
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(study.threads),
            PYTHONPATH=str(REPO),
            PYTHONUNBUFFERED="1",
        )
        if study.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = study.command(spec)
        print(f"{_now()} start {spec.tag} ({spec.phase})", flush=True)
        start = time.time()
        with open(folder / "stdout.log", "a") as log:
            log.write(f"\n# {_now()} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)  # with this child's own CPU time
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - start
        cpu = usage.ru_utime + usage.ru_stime
        with self.lock:
            self.cpu_used += cpu
        summary = folder / "summary.json"
        if proc.returncode != 0 or not summary.exists():
            print(
                f"{_now()} FAILED {spec.tag} (rc {proc.returncode}); see {folder}/stdout.log",
                flush=True,
            )
            return None
        record = self.record(spec, folder, wall, cpu, " ".join(cmd))
        with self.lock:
            with open(study.results_file, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
            (study.out / "report.md").write_text(report_text(study))
        print(
            f"{_now()} done {spec.tag}: val {100 * record['val_acc']:.2f}% test "
            f"{100 * record['test_acc']:.2f}% ({wall:.0f} s wall, {cpu:.0f} s CPU)",
            flush=True,
        )
        return record

    def record(self, spec: RunSpec, folder: Path, wall: float, cpu: float, cmd: str) -> dict:
        summary = json.loads((folder / "summary.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        metrics = _read_jsonl(folder / "metrics.jsonl")
        evals = {r["step"]: r for r in metrics if r["kind"] == "eval"}  # a resume may repeat
        train = list({r["step"]: r for r in metrics if r["kind"] == "train"}.values())
        final = {r["step"]: r for r in metrics if r["kind"] == "linear_eval"} or evals
        last = final[max(final)]
        return asdict(spec) | {
            "tag": spec.tag,
            "epochs": self.study.epochs if spec.kind == "cls" else self.study.bt_epochs,
            "steps": summary["step"],
            "steps_per_epoch": config["steps_per_epoch"],
            "train_samples": config["train_samples"],
            "val_samples": config["val_samples"],
            "val_acc": last["val_acc"],
            "test_acc": last["test_acc"],
            "val_loss": last["val_loss"],
            "test_loss": last["test_loss"],
            "final_train_loss": train[-1]["loss"] if train else None,
            "final_phi": train[-1].get("phi") if train else None,
            "curve": [
                [r["epoch"], r.get("val_acc"), r["test_acc"]]
                for _, r in sorted(evals.items())
                if spec.kind == "cls"
            ],
            "loss_curve": [[r["epoch"], r["loss"]] for r in train[:: max(1, len(train) // 60)]],
            "wall_s": round(wall, 1),  # of the last attempt (an interrupted run resumes)
            "cpu_s": round(cpu, 1),
            "attempts": _attempts(folder),
            "train_s": summary.get("time"),
            "finished": _now(),
            "host": platform.node(),
            "command": cmd,
        }

    def run_phases(self, only: list[str] | None = None) -> str:
        """Run the study's phases in order, or only the phases named in ``only`` (checked by
        ``main``), in its order."""
        study = self.study
        phases = {p.name: p for p in study.phases()}
        for phase in [phases[name] for name in only] if only else phases.values():
            while True:  # a grid grows beyond an edge as its results come in
                done = study.results()
                todo = [s for s in study.specs(phase) if s is not None and s.tag not in done]
                if not todo:
                    break
                print(f"{_now()} phase '{phase.name}': {len(todo)} runs", flush=True)
                with ThreadPoolExecutor(self.workers) as pool:
                    finished = [r for r in pool.map(self.run, todo) if r is not None]
                report(study)
                if self.stopped:
                    return "cpu budget"
                if not finished:  # every run failed: rerun the study to retry them
                    return "failures"
        return "done"


# ---------------------------------------------------------------------- report
def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _spec_fields(row: dict) -> dict:
    fields = {k: row[k] for k in ("kind", "optimizer", "batch", "lr", "seed", "phase")}
    return fields | {"final_factor": row.get("final_factor")}  # absent before study v3


def runs_at(
    done: dict, kind: str, batch: int, optimizer: str, lr: float | None, final_factor=None
) -> list[dict]:
    """The finished runs of one cell, one per seed (a recheck's rerun is not one of them)."""
    cell = (kind, batch, optimizer, lr, final_factor)
    return [
        r
        for r in done.values()
        if (r["kind"], r["batch"], r["optimizer"], r["lr"], r.get("final_factor")) == cell
        and r["phase"] != "recheck"
    ]


def _attempts(folder: Path) -> int:
    """How many times the run was started (``Runner.run`` heads stdout.log with the command)."""
    log = folder / "stdout.log"
    return (
        sum(line.startswith("# ") for line in log.read_text().splitlines()) if log.exists() else 1
    )


def _pct(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    spread = 100 * (max(values) - min(values)) / 2
    return f"{mean:.2f} ± {spread:.2f} (n={len(values)})"


def tables(study: Study) -> str:
    done = study.results()
    lines = []
    for kind, batches, opts in (
        ("cls", study.batches, study.optimizers),
        ("bt", study.bt_batches, study.bt_optimizers),
    ):
        epochs = study.epochs if kind == "cls" else study.bt_epochs
        acc = "test accuracy" if kind == "cls" else "linear-eval test accuracy"
        lines += [
            f"**{KIND_NAMES[kind]}**, {epochs:g} epochs",
            "",
            f"| global batch (steps) | method | LR grid: val % (seed 0) | chosen LR | {acc} % "
            "(mean ± half-range) | val % (mean) | wall min / run (CPU min) |",
            "|---|---|---|---:|---|---:|---|",
        ]
        for b in batches:
            for opt in opts:
                grid = []
                for lr in study.grid(kind, opt, b)[0]:
                    row = done.get(RunSpec(kind, opt, b, lr, study.seeds[0], "grid").tag)
                    grid.append(f"{lr:g}: {100 * row['val_acc']:.1f}" if row else f"{lr:g}: -")
                lr = study.chosen_lr(kind, b, opt)
                rows = runs_at(done, kind, b, opt, lr)
                steps = round(epochs * study.steps_per_epoch(b))
                # Cost of the runs that ran in one go (a resumed run's last attempt is partial).
                whole = [
                    r
                    for r in rows
                    if r.get("attempts", _attempts(study.run_dir(RunSpec(**_spec_fields(r))))) == 1
                ]
                if whole:
                    wall = statistics.fmean(r["wall_s"] for r in whole) / 60
                    cpu = statistics.fmean(r["cpu_s"] for r in whole) / 60
                    cost = f"{wall:.1f} ({cpu:.1f})"
                else:
                    cost = "-"
                if rows:
                    test = _pct([r["test_acc"] for r in rows])
                    val = f"{100 * statistics.fmean(r['val_acc'] for r in rows):.2f}"
                else:
                    test = val = "-"
                lines.append(
                    f"| {b} ({steps}) | {opt} | {', '.join(grid)} | "
                    f"{f'{lr:g}' if lr is not None else '-'} | {test} | {val} | {cost} |"
                )
        lines.append("")
    return "\n".join(lines)


def status(study: Study) -> str:
    done = study.results()
    lines = ["| phase | finished | planned |", "|---|---:|---:|"]
    for phase in study.phases():
        specs = study.specs(phase)
        finished = sum(1 for s in specs if s is not None and s.tag in done)
        lines.append(f"| {phase.name} | {finished} | {len(specs)} |")
    running = [
        p.name
        for p in sorted((study.out / "runs").glob("*"))
        if p.is_dir() and p.name not in done and (p / "metrics.jsonl").exists()
    ]
    lines += ["", f"started but not finished: {', '.join(running) or 'none'}"]
    return "\n".join(lines)


def plot(study: Study) -> list[Path]:
    """curves.png, and tvlars-plot's figures of one run per method for each kind and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tvlars_scale.plotting import plot_runs

    done = study.results()
    written = []
    fig, axes = plt.subplots(1, len(study.batches), figsize=(4.3 * len(study.batches), 3.6))
    axes = [axes] if len(study.batches) == 1 else list(axes)
    for ax, b in zip(axes, study.batches, strict=True):
        for opt in study.optimizers:
            lr = study.chosen_lr("cls", b, opt)
            rows = runs_at(done, "cls", b, opt, lr)
            if not rows:
                continue
            n = min(len(r["curve"]) for r in rows)
            xs = [rows[0]["curve"][i][0] for i in range(n)]
            ys = [100 * statistics.fmean(r["curve"][i][2] for r in rows) for i in range(n)]
            ax.plot(xs, ys, marker="o", ms=2.5, label=f"{opt} lr {lr:g} (n={len(rows)})")
        ax.set(title=f"global batch {b}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(study.out / "curves.png", dpi=110)
    plt.close(fig)
    written.append(study.out / "curves.png")
    if study.bt_batches:
        written.append(_plot_bt_losses(study, done, plt))
    for kind, batches, opts in (
        ("cls", study.batches, study.optimizers),
        ("bt", study.bt_batches, study.bt_optimizers),
    ):
        for b in batches:
            dirs = []
            for opt in opts:
                lr = study.chosen_lr(kind, b, opt)
                spec = RunSpec(kind, opt, b, lr or 0.0, study.seeds[0], "grid")
                if lr is not None and spec.tag in done and study.run_dir(spec).is_dir():
                    dirs.append(study.run_dir(spec))
            if dirs:
                written += plot_runs(dirs, study.out / "plots" / f"{kind}-b{b}")
    return written


def _plot_bt_losses(study: Study, done: dict, plt) -> Path:
    """bt_curves.png: the Barlow Twins loss over pre-training per method and batch, at the
    chosen LR (mean over seeds), or while a grid is open at its best LR so far (seed 0)."""
    batches = study.bt_batches
    fig, axes = plt.subplots(1, len(batches), figsize=(4.3 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        for opt in study.bt_optimizers:
            shown = study.shown_lr("bt", b, opt)
            if shown is None:
                continue
            lr, settled = shown
            rows = [
                r for r in runs_at(done, "bt", b, opt, lr) if settled or r["seed"] == study.seeds[0]
            ]
            n = min(len(r["loss_curve"]) for r in rows)
            xs = [rows[0]["loss_curve"][i][0] for i in range(n)]
            ys = [statistics.fmean(r["loss_curve"][i][1] for r in rows) for i in range(n)]
            state = f"n={len(rows)}" if settled else "grid open"
            ax.plot(xs, ys, label=f"{opt} lr {lr:g} ({state})")
        ax.set(title=f"Barlow Twins, global batch {b}", xlabel="epoch", ylabel="loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = study.out / "bt_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ff(final_factor: float | None) -> str:
    return f"{DEFAULT_FINAL_FACTOR:g} (default)" if final_factor is None else f"{final_factor:g}"


def decay_tables(study: Study) -> str:
    """TVLARS' decay as a hyperparameter: validation accuracy on seed 0 at its two best LRs
    for each final_factor, and the test accuracy of the winner on the later seeds."""
    done, lines = study.results(), []
    for kind, batches in (("cls", study.batches), ("bt", study.bt_batches)):
        for b in (b for b in study.decay_batches if b in batches):
            cells, winner = study.decay_cells(kind, b), study.decay_winner(kind, b)
            if not cells:
                continue
            factors = [None, *study.final_factors]
            lines += [
                f"**TVLARS' decay, {KIND_NAMES[kind]} at {b}**: validation % on seed "
                f"{study.seeds[0]} (test %) by phi at the last step (`--final-factor`); "
                f"the winner (bold) on seeds {', '.join(map(str, study.seeds[1:]))}: "
                "test % mean ± half-range",
                "",
                "| LR | " + " | ".join(f"final_factor {_ff(ff)}" for ff in factors) + " |",
                "|---:|" + "---|" * len(factors),
            ]
            for lr in sorted({lr for lr, _ in cells}):
                row = []
                for ff in factors:
                    r = done.get(study._decay_spec(kind, b, lr, ff, study.seeds[0]).tag)
                    text = f"{100 * r['val_acc']:.1f} ({100 * r['test_acc']:.1f})" if r else "-"
                    if (lr, ff) == winner:
                        later = [
                            r
                            for r in runs_at(done, kind, b, "tvlars", lr, ff)
                            if r["seed"] != study.seeds[0]
                        ]
                        text = f"**{text}**" + (
                            f"; {_pct([r['test_acc'] for r in later])}" if later else ""
                        )
                    row.append(text)
                lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
            lines.append("")
    return "\n".join(lines)


def later_seeds_table(study: Study) -> str:
    """Each method at its configuration chosen on seed 0, judged on the other seeds only
    (the seeds not used for choosing), at the decay batches."""
    done, lines = study.results(), []
    later = study.seeds[1:]
    for kind, batches, opts in (
        ("cls", study.batches, study.optimizers),
        ("bt", study.bt_batches, study.bt_optimizers),
    ):
        for b in (b for b in study.decay_batches if b in batches):
            configs = [(opt, study.chosen_lr(kind, b, opt), None) for opt in opts]
            winner = study.decay_winner(kind, b)
            if winner is not None and winner[1] is not None:
                configs.insert(1, ("tvlars", *winner))
            lines += [
                f"**{KIND_NAMES[kind]} at {b}, judged on seeds {', '.join(map(str, later))}** "
                "(not used for choosing): test % mean ± half-range",
                "",
                "| method | LR | final_factor | test % |",
                "|---|---:|---|---|",
            ]
            for opt, lr, ff in configs:
                rows = [r for r in runs_at(done, kind, b, opt, lr, ff) if r["seed"] in later]
                test = _pct([r["test_acc"] for r in rows]) if rows else "-"
                lr_text = "-" if lr is None else f"{lr:g}"
                ff_text = _ff(ff) if opt == "tvlars" else ""
                lines.append(f"| {opt} | {lr_text} | {ff_text} | {test} |")
            lines.append("")
    return "\n".join(lines)


def recheck_table(study: Study) -> str:
    """Runs rerun with their original command and seed on today's code, against the seed
    spread of their cell (the run-to-run noise they must stay within)."""
    done = study.results()
    rows = [r for r in done.values() if r["phase"] == "recheck"]
    if not rows:
        return ""
    lines = [
        "**Rechecks** (the same command and seed on today's code): val % / test %",
        "",
        "| run | first run (code) | rerun (code) | difference | seed range of its cell |",
        "|---|---|---|---|---|",
    ]
    sessions = [x for x in _read_jsonl(study.out / "sessions.jsonl") if x["event"] == "start"]

    def code(row: dict) -> str:  # the commit of the invocation that finished the run
        started = [x["code"] for x in sessions if x["started"] <= row["finished"]]
        return started[-1][:7] if started else "?"

    for r in rows:
        spec = RunSpec(**_spec_fields(r) | {"phase": "grid"})
        first = done[spec.tag]
        cell = runs_at(done, r["kind"], r["batch"], r["optimizer"], r["lr"], r.get("final_factor"))
        tests = [c["test_acc"] for c in cell]
        vals = [c["val_acc"] for c in cell]
        lines.append(
            f"| {spec.tag} | {100 * first['val_acc']:.2f} / {100 * first['test_acc']:.2f} "
            f"({code(first)}) | {100 * r['val_acc']:.2f} / "
            f"{100 * r['test_acc']:.2f} ({code(r)}) | "
            f"{100 * (r['val_acc'] - first['val_acc']):+.2f} / "
            f"{100 * (r['test_acc'] - first['test_acc']):+.2f} | "
            f"{100 * (max(vals) - min(vals)):.2f} / {100 * (max(tests) - min(tests)):.2f} "
            f"(n={len(cell)}) |"
        )
    return "\n".join(lines) + "\n"


def report_text(study: Study) -> str:
    return (
        f"Generated {_now()} from {study.results_file.name} by `benchmarks/accuracy_study.py`.\n\n"
        + tables(study)
        + "\n"
        + "\n".join(t for t in (decay_tables(study), later_seeds_table(study)) if t)
        + "\n"
        + recheck_table(study)
        + "\n"
        + status(study)
        + "\n"
    )


MARKERS = ("<!-- accuracy_study.py report: begin -->", "<!-- accuracy_study.py report: end -->")
SUMMARY_MARKERS = (
    "<!-- accuracy_study.py summary: begin -->",
    "<!-- accuracy_study.py summary: end -->",
)
METHOD_NAMES = {"tvlars": "TVLARS", "wa-lars": "WA-LARS", "nowa-lars": "NOWA-LARS", "lamb": "LAMB"}
METHOD_KEYS = {name: key for key, name in METHOD_NAMES.items()}  # "WA-LARS" -> "wa-lars"


def splice(path: Path, text: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replace what lies between the two ``markers`` lines of ``path`` by ``text``."""
    lines = path.read_text().split("\n")
    try:
        start, end = (lines.index(marker) for marker in markers)
    except ValueError:
        raise SystemExit(f"{path}: no lines {markers[0]!r} ... {markers[1]!r}") from None
    path.write_text("\n".join([*lines[: start + 1], text.strip(), *lines[end:]]))


def _short(batch: int) -> str:
    return f"{batch // 1024}K" if batch % 1024 == 0 else str(batch)


def cell_accs(
    study: Study, kind: str, batch: int, optimizer: str, seeds=None, decay: bool = False
) -> list[float]:
    """Test accuracies of one method at its chosen configuration, one per seed (``seeds``:
    only those); ``decay``: TVLARS at its decay winner instead of the default decay."""
    lr, ff = study.chosen_lr(kind, batch, optimizer), None
    if decay and optimizer == "tvlars":
        lr, ff = study.decay_winner(kind, batch) or (None, None)
    rows = runs_at(study.results(), kind, batch, optimizer, lr, ff)
    return [r["test_acc"] for r in rows if seeds is None or r["seed"] in seeds]


def summary_table(study: Study) -> str:
    """The README's table: test % at the chosen LR per method and batch, mean ± half-range;
    bold where the range overlaps the best method's."""
    opts = study.optimizers
    lines = [
        "| global batch (steps) | " + " | ".join(METHOD_NAMES[o] for o in opts) + " |",
        "|---|" + "---:|" * len(opts),
    ]
    for kind, batches in (("cls", study.batches), ("bt", study.bt_batches)):
        epochs = study.epochs if kind == "cls" else study.bt_epochs
        for b in batches:
            accs = {o: cell_accs(study, kind, b, o) for o in opts}
            ranges = {
                o: (statistics.fmean(a) - (max(a) - min(a)) / 2, statistics.fmean(a))
                for o, a in accs.items()
                if a
            }
            best = max(ranges, key=lambda o: ranges[o][1], default=None)
            cells = []
            for o in opts:
                a = accs[o]
                if not a:
                    cells.append("-")
                    continue
                mean, half = 100 * statistics.fmean(a), 100 * (max(a) - min(a)) / 2
                text = f"{mean:.1f} ± {half:.1f}"
                if mean / 100 + (max(a) - min(a)) / 2 >= ranges[best][0]:
                    text = f"**{text}**"
                cells.append(text + (f" ({len(a)})" if len(a) != len(study.seeds) else ""))
            name = "classification" if kind == "cls" else "Barlow Twins"
            suffix = "" if kind == "cls" else ", linear eval"
            steps = round(epochs * study.steps_per_epoch(b))
            lines.append(f"| {name} {_short(b)} ({steps}){suffix} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- prose
#: Sets the context of the claims that follow it in prose, e.g.
#: ``<!-- claims: bt 1024 seeds=1,2 tvlars=decay -->``: kind and batch, optionally only some
#: seeds, and TVLARS at its decay winner instead of its default decay.
CLAIMS = re.compile(r"<!-- claims: (cls|bt) (\d+)((?: \w+=[\w,]+)*) -->")
_METHOD = r"(TVLARS|WA-LARS|NOWA-LARS|LAMB)"
_MEAN = re.compile(_METHOD + r"[\s(]{0,5}(\d+\.\d) ± (\d+\.\d)")
_GAP = re.compile(
    _METHOD
    + r" (?:trails|leads) "
    + _METHOD
    + r" by (\d+\.\d)(?: points)?(?: and "
    + _METHOD
    + r" by (\d+\.\d))?"
)


_DROP = re.compile(_METHOD + r" seed (\d+)[^.]*? (\d+\.\d) points from epoch (\d+) to (\d+)")


def _drop(study: Study, kind: str, batch: int, method: str, seed: int, a: int, b: int):
    """The test % one seed's run at its method's chosen LR lost from epoch ``a`` to ``b``."""
    key = METHOD_KEYS[method]
    lr = study.chosen_lr(kind, batch, key)
    rows = [r for r in runs_at(study.results(), kind, batch, key, lr) if r["seed"] == seed]
    curve = {round(e): test for e, _, test in rows[0]["curve"]} if rows else {}
    return 100 * (curve[a] - curve[b]) if a in curve and b in curve else None


def _mean_pct(study: Study, kind: str, batch: int, method: str, seeds, decay: bool):
    """(mean, half-range) of a method's test % in one cell, or None without runs."""
    a = cell_accs(study, kind, batch, METHOD_KEYS[method], seeds, decay)
    return (100 * statistics.fmean(a), 50 * (max(a) - min(a))) if a else None


def check_prose(study: Study, text: str) -> tuple[int, list[str]]:
    """Check the numbers of ``text``'s prose against results.jsonl: (claims checked, errors).

    After a ``CLAIMS`` comment, every "METHOD mean ± half-range" (test %, one decimal) and
    every "A trails/leads B by D [points and C by E]" (differences of the means) and every
    "METHOD seed S ... D points from epoch A to B" (a drop in one run's test curve) must equal
    what the results give; a "±" that no claim accounts for is an error too, so no number
    escapes the check."""
    checked, errors = 0, []
    parts = CLAIMS.split(text)
    for i in range(1, len(parts), 4):
        kind, batch, options, body = parts[i], int(parts[i + 1]), parts[i + 2], parts[i + 3]
        opts = dict(o.split("=") for o in options.split())
        seeds = tuple(int(x) for x in opts["seeds"].split(",")) if "seeds" in opts else None
        cell = (study, kind, batch)
        decay = opts.get("tvlars") == "decay"
        where = f"claims {kind} {batch}{options}"
        means = list(_MEAN.finditer(body))
        for m in means:
            got = _mean_pct(*cell, m[1], seeds, decay)
            if got is None or f"{got[0]:.1f} ± {got[1]:.1f}" != f"{m[2]} ± {m[3]}":
                said = f"{got[0]:.2f} ± {got[1]:.2f}" if got else "no runs"
                errors.append(f"{where}: {m[0]!r}, the results give {said}")
        gaps = [
            (m[1], other, said, m[0])
            for m in _GAP.finditer(body)
            for other, said in ((m[2], m[3]), (m[4], m[5]))
            if other
        ]
        for method, other, said, claim in gaps:
            a, b = _mean_pct(*cell, method, seeds, decay), _mean_pct(*cell, other, seeds, decay)
            gap = None if a is None or b is None else abs(a[0] - b[0])
            if gap is None or f"{gap:.1f}" != said:
                errors.append(f"{where}: {claim!r} ({other} by {said}), the results give {gap}")
        drops = list(_DROP.finditer(body))
        for m in drops:
            got = _drop(*cell, m[1], int(m[2]), int(m[4]), int(m[5]))
            if got is None or f"{got:.1f}" != m[3]:
                errors.append(f"{where}: {m[0]!r}, the results give {got}")
        checked += len(drops)
        if body.count("±") > len(means):
            errors.append(f"{where}: {body.count('±') - len(means)} '±' not in a checked claim")
        checked += len(means) + len(gaps)
    return checked, errors


def report(study: Study) -> str:
    """Write report.md and the plots; returns the report."""
    text = report_text(study)
    (study.out / "report.md").write_text(text)
    if not study.plots:
        return text
    try:
        plot(study)
    except Exception as exc:  # a report must not stop the study
        print(f"{_now()} plots failed: {exc!r}", flush=True)
    return text


# ---------------------------------------------------------------------- main
def _code_version() -> str:
    """The commit the runs use: ``git rev-parse HEAD``, or the ``.study_commit`` file of a
    snapshot made with ``git archive`` (run the study from one so that later edits of the
    checkout cannot reach a study in progress)."""
    marker = REPO / ".study_commit"
    if marker.is_file():
        return marker.read_text().strip()
    try:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "tvlars_scale",
                "launch",
                "benchmarks",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:  # no git (a copy of the checkout on another machine)
        return "?"
    return proc.stdout.strip() + (" (modified)" if dirty else "") if proc.returncode == 0 else "?"


def _data_dir(extra: list[str]) -> str:
    """The dataset folder the recipes will read: their ``--data-dir`` among the options passed
    through, else the Debian package's."""
    for i, arg in enumerate(extra):
        if arg.startswith("--data-dir="):
            return arg.partition("=")[2]
        if arg == "--data-dir" and i + 1 < len(extra):
            return extra[i + 1]
    return FASHION_MNIST_DIR


def _lr_grid(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, tuple[float, ...]]:
    grid = {}
    for item in items:
        opt, _, lrs = item.partition("=")
        try:
            values = tuple(sorted(float(x) for x in lrs.split(",")))
        except ValueError:
            values = ()
        if opt not in OPTIMIZERS or not values or min(values) <= 0:
            parser.error(
                f"--lr-grid {item!r}: expected OPT=LR[,LR...] with OPT one of "
                f"{', '.join(OPTIMIZERS)} and positive LRs"
            )
        grid[opt] = values
    return grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy_v2"))
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=list(Study.batches),
        help="classification global batches, largest first (the first two run first)",
    )
    p.add_argument("--bt-batches", type=int, nargs="*", default=list(Study.bt_batches))
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(Study.seeds),
        help="the first is the grid's; the others run at the chosen LR",
    )
    p.add_argument("--epochs", type=float, default=Study.epochs)
    p.add_argument("--bt-epochs", type=float, default=Study.bt_epochs)
    p.add_argument("--linear-epochs", type=float, default=Study.linear_epochs)
    p.add_argument("--model", default=Study.model)
    p.add_argument("--width", type=int, default=Study.width, help="0: the model's own")
    p.add_argument("--micro-batch", type=int, default=Study.micro_batch)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--bt-optimizers", nargs="*", default=list(BT_OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--lr-factors", type=float, nargs="+", default=list(Study.lr_factors))
    p.add_argument(
        "--max-extend",
        type=int,
        default=Study.max_extend,
        help="grid steps added beyond an edge of the grid while the best LR sits on it",
    )
    p.add_argument("--bt-lr-factors", type=float, nargs="+", default=list(Study.bt_lr_factors))
    p.add_argument(
        "--lr-grid",
        nargs="+",
        default=[],
        metavar="OPT=LR,LR",
        help="the base LR grid of an optimizer, at every batch (replaces the factors)",
    )
    p.add_argument(
        "--seed-optimizers",
        nargs="+",
        default=None,
        choices=OPTIMIZERS,
        help="the optimizers run on the seeds after the first (default: all)",
    )
    p.add_argument("--train-subset", type=int, default=0, help="0: all training images")
    p.add_argument("--test-subset", type=int, default=0, help="0: all test images")
    p.add_argument("--workers", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--cpu-budget-hours",
        type=float,
        default=None,
        help="start no new run once this invocation's runs used this much CPU",
    )
    p.add_argument("--report", action="store_true", help="only rebuild report.md and the plots")
    p.add_argument(
        "--results-md",
        default=None,
        metavar="PATH",
        help="with --report: also put the tables into PATH (benchmarks/RESULTS.md) "
        f"between the lines {MARKERS[0]!r} and {MARKERS[1]!r}",
    )
    p.add_argument(
        "--readme",
        default=None,
        metavar="PATH",
        help="with --report: also put the summary table into PATH (README.md) between the "
        f"lines {SUMMARY_MARKERS[0]!r} and {SUMMARY_MARKERS[1]!r}",
    )
    p.add_argument(
        "--check-prose",
        nargs="+",
        default=None,
        metavar="PATH",
        help="check the numbers of the prose in these files against results.jsonl "
        "(after each '<!-- claims: KIND BATCH ... -->' comment); exit 1 on a mismatch",
    )
    p.add_argument(
        "--no-plots", action="store_true", help="write report.md only, without the figures"
    )
    p.add_argument("--status", action="store_true", help="only print what is finished")
    p.add_argument(
        "--phases",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these phases, in this order (names as --status prints them)",
    )
    args, extra = p.parse_known_args(argv)
    study = Study(
        out=Path(args.out),
        batches=tuple(args.batches),
        bt_batches=tuple(args.bt_batches),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        bt_epochs=args.bt_epochs,
        linear_epochs=args.linear_epochs,
        model=args.model,
        width=args.width,
        micro_batch=args.micro_batch,
        optimizers=tuple(args.optimizers),
        bt_optimizers=tuple(args.bt_optimizers),
        lr_factors=tuple(args.lr_factors),
        max_extend=args.max_extend,
        bt_lr_factors=tuple(args.bt_lr_factors),
        lr_grid=_lr_grid(p, args.lr_grid),
        seed_optimizers=args.seed_optimizers and tuple(args.seed_optimizers),
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        threads=args.threads,
        device=args.device,
        plots=not args.no_plots,
        extra=extra,  # passed through to the recipes
    )
    unknown = sorted(set(args.phases or ()) - {phase.name for phase in study.phases()})
    if unknown:
        names = ", ".join(repr(phase.name) for phase in study.phases())
        p.error(f"--phases: no phase {unknown}; the phases: {names}")
    study.out.mkdir(parents=True, exist_ok=True)
    if args.status:
        print(status(study))
        return
    if args.check_prose:
        failed = False
        for path in args.check_prose:
            checked, errors = check_prose(study, Path(path).read_text())
            print(f"{path}: {checked} claims checked, {len(errors)} wrong")
            print("".join(f"  {e}\n" for e in errors), end="")
            failed |= bool(errors)
        raise SystemExit(1 if failed else 0)
    if args.report:
        text = report(study)
        if args.results_md:
            splice(Path(args.results_md), text)
        if args.readme:
            splice(Path(args.readme), summary_table(study), SUMMARY_MARKERS)
        print(text)
        return
    data = _data_dir(extra)
    if not Path(data, "train-images-idx3-ubyte.gz").is_file():
        p.exit(2, f"Fashion-MNIST not found in {data}: apt-get install dataset-fashion-mnist\n")
    session = {
        "event": "start",
        "started": _now(),
        "argv": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": platform.node(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "loadavg": os.getloadavg(),
        "nice": os.nice(0),
        "python": platform.python_version(),
        "code": _code_version(),
        "settings": {k: v for k, v in asdict(study).items() if k != "out"},
    }
    import torch

    session["torch"] = torch.__version__
    _append(study.out / "sessions.jsonl", session)
    runner = Runner(study, args.workers, args.cpu_budget_hours and args.cpu_budget_hours * 3600)
    start_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    outcome = runner.run_phases(args.phases)
    end_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = end_cpu.ru_utime + end_cpu.ru_stime - start_cpu.ru_utime - start_cpu.ru_stime
    _append(
        study.out / "sessions.jsonl",
        {
            "event": "end",
            "started": session["started"],
            "ended": _now(),
            "outcome": outcome,
            "cpu_s": round(cpu, 1),
            "runs_finished": len(study.results()),
        },
    )
    print(report(study))
    print(f"{_now()} study {outcome}", flush=True)


if __name__ == "__main__":
    main()
