"""Large-batch accuracy study: TVLARS against WA-LARS, NOWA-LARS and LAMB on Fashion-MNIST.

    python benchmarks/accuracy_study.py                      # the study in benchmarks/RESULTS.md
    python benchmarks/accuracy_study.py --device cuda --epochs 30 --image-size 28 --train-subset 0 \
        --full-grid-batches --out benchmarks/results/accuracy_gpu

Every run is one ``launch/train_classification.py`` process (the recipe users run), so the study
measures the shipped code path. Three phases:

1. the LR grid on seed 0: for each global batch size and optimizer, three LRs around the
   square-root rule (the LARS family: the paper's set for that batch size; LAMB: see ``lamb_lrs``);
2. the TVLARS lambda ablation at the largest batch size (seed 0, the TVLARS LR chosen in phase 1);
3. the remaining seeds at the LR chosen on seed 0 (selection on seed 0, confirmation on the rest).

A run writes ``summary.json`` when it finishes; a rerun skips every run that has one and restarts
the others from scratch, so the study is resumable. ``--aggregate-only`` rebuilds the tables and
plots from whatever has finished.

Outputs (``--out``): ``runs/<tag>/`` (the recipe's run folders; not committed), ``accuracy.json``
(every run's settings, final accuracy and test-accuracy curve), ``accuracy.csv`` (the table),
``accuracy_curves.png`` and ``lnr_16k.png`` (per-layer LNR of TVLARS vs WA-LARS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train_classification.py"
OPTIMIZERS = ("tvlars", "wa-lars", "nowa-lars", "lamb")
#: The paper's LR sets (section 6.1), by global batch size.
PAPER_LRS = {
    512: (1.0, 2.0, 3.0),
    1024: (2.0, 3.0, 4.0),
    2048: (5.0, 6.0, 7.0),
    4096: (8.0, 9.0, 10.0),
    8192: (10.0, 12.0, 15.0),
    16384: (15.0, 17.0, 19.0),
}


def lars_lrs(batch: int) -> tuple[float, ...]:
    """The paper's set for ``batch``, or the 1K set sqrt-scaled (for the tiny smoke batches)."""
    if batch in PAPER_LRS:
        return PAPER_LRS[batch]
    return tuple(round(x * math.sqrt(batch / 1024), 4) for x in PAPER_LRS[1024])


def lamb_lrs(batch: int, eta: float = 1e-3, momentum: float = 0.9) -> tuple[float, ...]:
    """LAMB's grid: the same per-layer relative step as LARS at the middle of the paper's set.

    LAMB's trust ratio makes ``lr`` the relative change of a layer per step (||dw|| / ||w||).
    LARS' is ``eta * lr`` per step, and its momentum buffer sums ~1/(1 - momentum) of them, while
    LAMB's first moment is an average. So LARS at lr ~ LAMB at ``eta * lr / (1 - momentum)``:
    0.03 at 1K, 0.09 at 4K, 0.17 at 16K. The paper's LAMB used LR 1-19 (a 100-1900% change per
    step), which is why it collapses in their Table 1; we do not repeat that. The grid spans a
    factor 4 (x0.5, x1, x2) because this mapping is an estimate, unlike the paper's LARS sets.
    """
    mid = lars_lrs(batch)[1] * eta / (1 - momentum)
    return tuple(round(mid * f, 4) for f in (0.5, 1.0, 2.0))


@dataclass(frozen=True)
class RunSpec:
    optimizer: str
    batch: int
    lr: float
    seed: int
    lmbda: float | None = None  # TVLARS only
    phase: str = "grid"

    @property
    def tag(self) -> str:
        lam = f"-lam{self.lmbda:g}" if self.lmbda is not None else ""
        return f"b{self.batch}-{self.optimizer}-lr{self.lr:g}{lam}-s{self.seed}"


@dataclass
class Study:
    out: Path
    batches: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: float
    train_subset: int
    test_subset: int
    image_size: int
    delay_epochs: float
    warmup_epochs: float
    lambda_end: float
    ablation: tuple[float, ...]
    threads: int
    device: str
    micro_batch: int
    optimizers: tuple[str, ...] = OPTIMIZERS
    grid_size: int = 3
    full_grid_batches: tuple[int, ...] | None = None  # None = every batch gets grid_size LRs
    extra: list[str] = field(default_factory=list)

    # ------------------------------------------------------------ settings
    def steps_per_epoch(self, batch: int) -> int:
        return self.train_subset // batch

    def tvlars_lambda(self, batch: int) -> float:
        """lambda (per step) so that phi falls to 1/(1 + e^lambda_end) by the last step.

        The recipe's lambda is per optimizer step, as in the paper, so a fixed lambda decays
        16x more per epoch at 1K than at 16K. With a short epoch budget the paper's lambdas
        (1e-6..1e-2) would leave phi ~constant; we instead end the decay at the same point of
        the budget for every batch size (phi(T) = 1/(1 + e^lambda_end), 0.047 for 3).
        """
        spe = self.steps_per_epoch(batch)
        decay_steps = max(1.0, (self.epochs - self.delay_epochs) * spe)
        return round(self.lambda_end / decay_steps, 6)

    def lrs(self, optimizer: str, batch: int) -> tuple[float, ...]:
        lrs = lamb_lrs(batch) if optimizer == "lamb" else lars_lrs(batch)
        full = self.full_grid_batches is None or batch in self.full_grid_batches
        return lrs if self.grid_size == 3 and full else lrs[1:2]  # else the middle LR only

    def command(self, spec: RunSpec) -> list[str]:
        cmd = [
            sys.executable,
            str(TRAIN),
            "--dataset=fashion-mnist",
            f"--global-batch-size={spec.batch}",
            f"--max-per-device-batch-size={self.micro_batch}",
            f"--optimizer={spec.optimizer}",
            f"--lr={spec.lr:g}",
            f"--seed={spec.seed}",
            f"--epochs={self.epochs:g}",
            f"--delay-epochs={self.delay_epochs:g}",
            f"--warmup-epochs={self.warmup_epochs:g}",
            f"--output-dir={self.run_dir(spec)}",
            "--no-progress",
            "--no-plots",
            "--no-final-checkpoint",
            "--log-every=1000000",
            f"--telemetry-every={max(1, self.steps_per_epoch(spec.batch) // 4)}",
        ]
        if spec.optimizer == "tvlars":
            lam = spec.lmbda if spec.lmbda is not None else self.tvlars_lambda(spec.batch)
            cmd.append(f"--lmbda={lam:g}")
        if self.train_subset:
            cmd.append(f"--train-subset={self.train_subset}")
        if self.test_subset:
            cmd.append(f"--test-subset={self.test_subset}")
        if self.image_size:
            cmd.append(f"--image-size={self.image_size}")
        return cmd + self.extra

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / "runs" / spec.tag

    # ------------------------------------------------------------ running
    def run(self, spec: RunSpec) -> dict | None:
        folder = self.run_dir(spec)
        summary = folder / "summary.json"
        if summary.exists():
            return json.loads(summary.read_text())
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished run restarts from scratch
        folder.mkdir(parents=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), PYTHONPATH=str(REPO))
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        start = time.time()
        with open(folder / "stdout.log", "w") as log:
            proc = subprocess.run(
                self.command(spec), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )
        took = time.time() - start
        if proc.returncode != 0 or not summary.exists():
            print(f"FAILED {spec.tag} (rc {proc.returncode}); see {folder / 'stdout.log'}")
            return None
        result = json.loads(summary.read_text())
        print(f"{spec.tag}: {100 * result['test_acc']:.2f}% ({took:.0f} s)", flush=True)
        return result

    def run_all(self, specs: Iterable[RunSpec], workers: int) -> None:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(self.run, specs))

    # ------------------------------------------------------------ phases
    def grid(self) -> list[RunSpec]:
        return [
            RunSpec(opt, b, lr, self.seeds[0])
            for b in self.batches
            for opt in self.optimizers
            for lr in self.lrs(opt, b)
        ]

    def best_lr(self, optimizer: str, batch: int) -> float | None:
        scores = {}
        for lr in self.lrs(optimizer, batch):
            res = self.result(RunSpec(optimizer, batch, lr, self.seeds[0]))
            if res is not None:
                scores[lr] = res["test_acc"]
        return max(scores, key=scores.get) if scores else None

    def ablation_specs(self) -> list[RunSpec]:
        batch = self.batches[-1]
        lr = self.best_lr("tvlars", batch)
        if lr is None:
            return []
        return [
            RunSpec("tvlars", batch, lr, self.seeds[0], lmbda=lam, phase="ablation")
            for lam in self.ablation
        ]

    def confirm_specs(self) -> list[RunSpec]:
        specs = []
        for b in self.batches:
            for opt in self.optimizers:
                lr = self.best_lr(opt, b)
                if lr is not None:
                    specs += [RunSpec(opt, b, lr, s, phase="confirm") for s in self.seeds[1:]]
        return specs

    def result(self, spec: RunSpec) -> dict | None:
        summary = self.run_dir(spec) / "summary.json"
        return json.loads(summary.read_text()) if summary.exists() else None

    # ------------------------------------------------------------ report
    def curves(self, spec: RunSpec) -> list[tuple[float, float]]:
        path = self.run_dir(spec) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(r["epoch"], r["test_acc"]) for r in rows if r.get("kind") == "eval"]

    def aggregate(self) -> dict:
        runs = []
        for spec in self.grid() + self.ablation_specs() + self.confirm_specs():
            res = self.result(spec)
            if res is None:
                continue
            cfg = json.loads((self.run_dir(spec) / "config.json").read_text())
            runs.append(
                asdict(spec)
                | {
                    "tag": spec.tag,
                    "lmbda_used": cfg["args"]["lmbda"] if spec.optimizer == "tvlars" else None,
                    "steps": res["step"],
                    "test_acc": res["test_acc"],
                    "train_time_s": res.get("time"),
                    "curve": self.curves(spec),
                }
            )
        table = []
        for b in self.batches:
            for opt in self.optimizers:
                lr = self.best_lr(opt, b)
                accs = [
                    r["test_acc"]
                    for r in runs
                    if (r["optimizer"], r["batch"], r["lr"], r["lmbda"]) == (opt, b, lr, None)
                ]
                if not accs:
                    continue
                grid = {
                    f"{r['lr']:g}": r["test_acc"]
                    for r in runs
                    if (r["optimizer"], r["batch"], r["phase"]) == (opt, b, "grid")
                }
                table.append(
                    {
                        "batch": b,
                        "optimizer": opt,
                        "lr": lr,
                        "lmbda": self.tvlars_lambda(b) if opt == "tvlars" else None,
                        "seeds": len(accs),
                        "mean": statistics.fmean(accs),
                        "spread": (max(accs) - min(accs)) / 2,
                        "accs": accs,
                        "grid_seed0": grid,
                    }
                )
        ablation = [
            {"lmbda": r["lmbda"], "lr": r["lr"], "test_acc": r["test_acc"]}
            for r in runs
            if r["phase"] == "ablation"
        ]
        report = {
            "settings": {k: v for k, v in asdict(self).items() if k not in ("out",)}
            | {
                "steps_per_epoch": {b: self.steps_per_epoch(b) for b in self.batches},
                "tvlars_lambda": {b: self.tvlars_lambda(b) for b in self.batches},
            },
            "table": table,
            "ablation": ablation,
            "runs": runs,
        }
        (self.out / "accuracy.json").write_text(json.dumps(report, indent=1, default=str))
        with open(self.out / "accuracy.csv", "w") as f:
            f.write("batch,optimizer,lr,lmbda,seeds,mean_acc,spread,grid_seed0\n")
            for row in table:
                grid = " ".join(f"{k}:{100 * v:.2f}" for k, v in row["grid_seed0"].items())
                f.write(
                    f"{row['batch']},{row['optimizer']},{row['lr']:g},{row['lmbda'] or ''},"
                    f"{row['seeds']},{100 * row['mean']:.2f},{100 * row['spread']:.2f},{grid}\n"
                )
        return report

    def markdown(self, report: dict) -> str:
        """The tables of RESULTS.md (also written to ``accuracy.md``)."""
        lines = [
            "| global batch | steps | optimizer | LR grid, seed 0 (test %) | chosen LR | "
            "test accuracy % (mean ± half-range, n seeds) |",
            "|---:|---:|---|---|---:|---|",
        ]
        for row in report["table"]:
            steps = round(self.epochs * self.steps_per_epoch(row["batch"]))
            grid = ", ".join(f"{k}: {100 * v:.1f}" for k, v in row["grid_seed0"].items())
            name = row["optimizer"] + (f" (λ={row['lmbda']:g})" if row["lmbda"] else "")
            lines.append(
                f"| {row['batch']} | {steps} | {name} | {grid} | {row['lr']:g} | "
                f"{100 * row['mean']:.2f} ± {100 * row['spread']:.2f} (n={row['seeds']}) |"
            )
        if report["ablation"]:
            b = self.batches[-1]
            default = self.tvlars_lambda(b)
            lines += ["", f"| TVLARS λ at batch {b} (per step) | test accuracy %, seed 0 |"]
            lines.append("|---:|---:|")
            rows = report["ablation"] + [
                {"lmbda": default, "test_acc": r["test_acc"]}
                for r in report["runs"]
                if (r["optimizer"], r["batch"], r["phase"], r["seed"], r["lr"])
                == ("tvlars", b, "grid", self.seeds[0], self.best_lr("tvlars", b))
            ]
            for r in sorted(rows, key=lambda r: r["lmbda"]):
                mark = " (study default)" if r["lmbda"] == default else ""
                lines.append(f"| {r['lmbda']:g}{mark} | {100 * r['test_acc']:.2f} |")
        text = "\n".join(lines) + "\n"
        (self.out / "accuracy.md").write_text(text)
        return text

    def plot(self, report: dict) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.batches), figsize=(4.2 * len(self.batches), 3.4))
        axes = [axes] if len(self.batches) == 1 else list(axes)
        for ax, b in zip(axes, self.batches, strict=True):
            for row in (r for r in report["table"] if r["batch"] == b):
                curves = [
                    r["curve"]
                    for r in report["runs"]
                    if (r["optimizer"], r["batch"], r["lr"], r["lmbda"])
                    == (row["optimizer"], b, row["lr"], None)
                ]
                n = min(len(c) for c in curves)
                xs = [curves[0][i][0] for i in range(n)]
                ys = [100 * statistics.fmean(c[i][1] for c in curves) for i in range(n)]
                ax.plot(xs, ys, marker="o", label=f"{row['optimizer']} lr {row['lr']:g}")
            ax.set_title(f"global batch {b}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.out / "accuracy_curves.png", dpi=110)
        plt.close(fig)
        self._plot_lnr(plt)

    def _plot_lnr(self, plt) -> None:
        b = self.batches[-1]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, opt in zip(axes, ("tvlars", "wa-lars"), strict=True):
            lr = self.best_lr(opt, b)
            if lr is None:
                continue
            path = self.run_dir(RunSpec(opt, b, lr, self.seeds[0])) / "layers.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            # Layers with a trust ratio (conv/linear weights); excluded 1-D params report 1.0.
            names = [
                n
                for n in (rows[0]["layers"] if rows else {})
                if any(r["layers"][n]["trust_ratio"] != 1.0 for r in rows)
            ]
            for name in names:
                ys = [r["layers"][name]["lnr"] for r in rows]
                ax.plot([r["step"] for r in rows], ys, label=name)
            ax.set_yscale("log")
            ax.set_title(f"{opt}, batch {b}, lr {lr:g}: LNR = ||w|| / ||g||")
            ax.set_xlabel("optimizer step")
        axes[0].set_ylabel("per-layer LNR")
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(self.out / "lnr_16k.png", dpi=110)
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "accuracy"))
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=float, default=2.0, help="fixed epoch budget of every run")
    p.add_argument(
        "--train-subset",
        type=int,
        default=49152,
        help="training images (49152 = 3 x 16K steps per epoch; 0 = all 60000)",
    )
    p.add_argument("--test-subset", type=int, default=0, help="test images (0 = all 10000)")
    p.add_argument("--image-size", type=int, default=14, help="0 = the native 28x28")
    p.add_argument("--delay-epochs", type=float, default=1.0, help="TVLARS d_e")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="WA-LARS / LAMB warm-up")
    p.add_argument(
        "--lambda-end",
        type=float,
        default=3.0,
        help="TVLARS lambda is set per batch so that lambda * (T - d_e) equals this",
    )
    p.add_argument(
        "--ablation",
        type=float,
        nargs="*",
        default=[1e-3, 2.0],
        help="extra TVLARS lambdas at the largest batch size (per step)",
    )
    p.add_argument("--workers", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--micro-batch", type=int, default=512, help="largest micro-batch")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--grid-size", type=int, default=3, choices=[1, 3], help="LRs per cell")
    p.add_argument(
        "--full-grid-batches",
        type=int,
        nargs="*",
        default=[1024, 16384],
        help="batch sizes that get the whole LR grid, the others run its middle LR (to fit ~1 h "
        "on 2 CPU cores); give the option with no value for the whole grid everywhere",
    )
    p.add_argument("--aggregate-only", action="store_true")
    args, extra = p.parse_known_args(argv)
    study = Study(
        out=Path(args.out),
        batches=tuple(args.batches),
        seeds=tuple(args.seeds),
        epochs=args.epochs,
        train_subset=args.train_subset or 60000,
        test_subset=args.test_subset,
        image_size=args.image_size,
        delay_epochs=args.delay_epochs,
        warmup_epochs=args.warmup_epochs,
        lambda_end=args.lambda_end,
        ablation=tuple(args.ablation),
        threads=args.threads,
        device=args.device,
        micro_batch=args.micro_batch,
        optimizers=tuple(args.optimizers),
        grid_size=args.grid_size,
        full_grid_batches=tuple(args.full_grid_batches) if args.full_grid_batches else None,
        extra=extra,  # passed through to the recipe
    )
    study.out.mkdir(parents=True, exist_ok=True)
    if not args.aggregate_only:
        start = time.time()
        study.run_all(study.grid(), args.workers)
        study.run_all(study.ablation_specs() + study.confirm_specs(), args.workers)
        print(f"study done in {time.time() - start:.0f} s", flush=True)
    report = study.aggregate()
    study.plot(report)
    print(study.markdown(report))


if __name__ == "__main__":
    main()
