"""``tvlars-plot``: PNG plots of one or more run directories, runs overlaid.

    tvlars-plot runs/a runs/b --out plots/

Reads each run's ``metrics.jsonl``, ``layers.jsonl`` and ``config.json`` (written by the
recipes) and writes:

- ``loss.png``: training loss over optimizer steps;
- ``accuracy.png``: test accuracy over steps (and the final linear-evaluation accuracy of
  Barlow Twins runs as a star at the last pre-training step);
- ``phi.png``: TVLARS' factor phi(t) and the effective LR = lr * phi(t) over optimizer steps,
  with the scheduled LR dashed (phi = 1 for LARS and LAMB: the effective LR is the schedule);
- ``barlow_twins.png`` (runs with a linear-evaluation stage): the Barlow Twins loss over
  pre-training epochs, and the linear classifier's test accuracy per linear-stage epoch, the
  final evaluation marked with a star;
- ``lnr.png``: per-layer LNR = LWN / LGN over steps, one panel per run, one line per layer
  coloured by depth (the paper's Figure 3), the legend naming the layers (all of them up to
  10; else the top and bottom 5 by final LNR); by default the layers with a trust ratio (not
  the biases and norm gains), ``--layers REGEX`` to choose;
- ``lnr_layers.png`` (several runs): a few layers (first, middle, last), runs overlaid.

LGN is the norm in the trust ratio's denominator (``tvlars_scale.telemetry``): ||g + wd*w||
for LARS and TVLARS (||g|| with ``--trust-denominator sum``), ||u|| (the Adam direction plus
weight decay) for LAMB.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .compat import require_extra

__all__ = ["RunRecords", "load_run", "main", "plot_runs"]


@dataclass
class RunRecords:
    path: Path
    label: str
    metrics: dict[str, list[dict]] = field(default_factory=dict)  # kind -> records
    layers: list[dict] = field(default_factory=list)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _label(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        return path.name
    config = json.loads(config_file.read_text())
    args = config.get("args", {})
    return f"{args.get('optimizer', '?')} B={config.get('batch_plan', {}).get('global_batch', '?')} lr={config.get('lr', 0):g}"


def load_run(path: str | Path) -> RunRecords:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{path}: no metrics.jsonl; expected a run directory written by the recipes"
        )
    records = RunRecords(path, _label(path))
    for record in _read_jsonl(path / "metrics.jsonl"):
        records.metrics.setdefault(record.get("kind", "train"), []).append(record)
    records.layers = _read_jsonl(path / "layers.jsonl")
    return records


def _number(value) -> float:
    return float(value) if not isinstance(value, str) else float("nan")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = sorted(
        {r["step"]: r for r in records if key in r}.items()
    )  # a resumed run may repeat steps
    return [s for s, _ in rows], [_number(r[key]) for _, r in rows]


def _unique_labels(runs: list[RunRecords]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({run.path.name})"


def _layer_names(run: RunRecords, pattern: str | None) -> list[str]:
    """Layers matching ``pattern``; by default the adapted ones (trust ratio ever != 1),
    i.e. without the biases and norm gains that LARS leaves alone."""
    names = list(run.layers[0]["layers"]) if run.layers else []
    if pattern is not None:
        return [n for n in names if re.search(pattern, n)]
    adapted = [n for n in names if any(r["layers"][n]["trust_ratio"] != 1.0 for r in run.layers)]
    return adapted or names


#: lnr.png names every layer up to this many, else the top and bottom half of it by LNR.
LEGEND_LAYERS = 10


def _legend_layers(run: RunRecords, names: list[str]) -> list[str]:
    """The layers lnr.png names: all of ``names``, or the ``LEGEND_LAYERS // 2`` with the
    highest and the lowest LNR at the last telemetry step (in depth order)."""
    if len(names) <= LEGEND_LAYERS:
        return names
    last = run.layers[-1]["layers"]

    def final_lnr(name: str) -> float:
        value = _number(last[name]["lnr"]) if name in last else float("nan")
        return value if value == value else float("-inf")  # nan last

    ranked = sorted(names, key=final_lnr, reverse=True)
    k = LEGEND_LAYERS // 2
    picked = set(ranked[:k] + ranked[-k:])
    return [n for n in names if n in picked]


def _optimizer(run: RunRecords) -> tuple[str, str | None]:
    """(optimizer, trust denominator) from the run's config.json ("?" when unknown)."""
    config_file = run.path / "config.json"
    args = json.loads(config_file.read_text()).get("args", {}) if config_file.is_file() else {}
    return str(args.get("optimizer") or "?"), args.get("trust_denominator")


def _lnr_label(run: RunRecords) -> str:
    optimizer, denominator = _optimizer(run)
    if optimizer == "lamb":
        return "LNR = ||w|| / ||u||  (u: Adam step + wd*w)"
    if denominator == "sum":
        return "LNR = ||w|| / ||g||"
    if optimizer == "?":
        return "LNR = LWN / LGN"
    return "LNR = ||w|| / ||g + wd*w||"


def _phi_series(run: RunRecords) -> tuple[list[float], list[float], list[float]]:
    """(optimizer step, lr, phi) of the train records; phi = 1 where the run has none
    (LARS, LAMB: ``phi`` is null), the run's step where ``opt_step`` is missing."""
    rows = {r["step"]: r for r in run.metrics.get("train", []) if "lr" in r}
    steps, lrs, phis = [], [], []
    for step, r in sorted(rows.items()):
        steps.append(_number(r.get("opt_step", step)))
        lrs.append(_number(r["lr"]))
        phis.append(1.0 if r.get("phi") is None else _number(r["phi"]))
    return steps, lrs, phis


def plot_runs(
    run_dirs: list[str | Path], out_dir: str | Path, layers: str | None = None
) -> list[Path]:
    """Write the PNGs for ``run_dirs`` into ``out_dir``; returns the files written."""
    require_extra("recipes", "matplotlib", what="tvlars-plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(p) for p in run_dirs]
    _unique_labels(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot(*_series(run.metrics.get("train", []), "loss"), label=run.label)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        steps, acc = _series(run.metrics.get("eval", []), "test_acc")
        line = ax.plot(steps, [100 * a for a in acc], marker="o", ms=3, label=run.label)[0]
        for record in run.metrics.get("linear_eval", []):
            ax.scatter(
                [run.metrics["train"][-1]["step"] if run.metrics.get("train") else 0],
                [100 * record["test_acc"]],
                marker="*",
                s=120,
                color=line.get_color(),
                label=f"{run.label}: linear eval (final)",
            )
    ax.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "accuracy.png")

    with_phi = [run for run in runs if _phi_series(run)[0]]
    if with_phi:
        fig, (ax_phi, ax_lr) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
        for run in with_phi:
            steps, lrs, phis = _phi_series(run)
            color = ax_phi.plot(steps, phis, label=run.label)[0].get_color()
            ax_lr.plot(
                steps,
                [lr * phi for lr, phi in zip(lrs, phis, strict=True)],
                color=color,
                label=f"{run.label}: lr * phi(t)",
            )
            ax_lr.plot(steps, lrs, color=color, ls="--", lw=1, alpha=0.6, label=f"{run.label}: lr")
        ax_phi.set(
            ylabel="phi(t)",
            ylim=(0, None),
            title="TVLARS' time-varying factor phi(t)  (LARS, LAMB: phi = 1)",
        )
        ax_lr.set(
            xlabel="optimizer step",
            ylabel="learning rate",
            title="Effective LR = lr * phi(t) (solid) and scheduled lr (dashed)",
        )
        for ax in (ax_phi, ax_lr):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "phi.png")

    with_linear = [run for run in runs if run.metrics.get("linear_eval")]
    if with_linear:
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5))
        for run in with_linear:
            train = run.metrics.get("train", [])
            rows = sorted({r["step"]: r for r in train if "loss" in r}.items())
            color = ax_loss.plot(
                [_number(r["epoch"]) for _, r in rows],
                [_number(r["loss"]) for _, r in rows],
                label=run.label,
            )[0].get_color()
            final = run.metrics["linear_eval"][-1]
            points = sorted(
                {r["step"]: r for r in [*run.metrics.get("linear_epoch", []), final]}.items()
            )
            ax_acc.plot(
                [_number(r["epoch"]) for _, r in points],
                [100 * _number(r["test_acc"]) for _, r in points],
                color=color,
                marker="o",
                ms=3,
                label=f"{run.label}: per epoch",
            )
            acc = 100 * _number(final["test_acc"])
            ax_acc.scatter(
                [_number(final["epoch"])],
                [acc],
                marker="*",
                s=160,
                color=color,
                zorder=3,
                label=f"{run.label}: final {acc:.2f}%",
            )
        ax_loss.set(
            xlabel="pre-training epoch",
            ylabel="Barlow Twins loss",
            title="Barlow Twins pre-training loss",
        )
        ax_acc.set(
            xlabel="linear-evaluation epoch",
            ylabel="test accuracy (%)",
            title="Linear evaluation (frozen backbone): test accuracy",
        )
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "barlow_twins.png")

    with_layers = [run for run in runs if run.layers]
    if with_layers:
        fig, axes = plt.subplots(
            len(with_layers), 1, figsize=(10, 4.2 * len(with_layers)), squeeze=False
        )
        for ax, run in zip(axes[:, 0], with_layers, strict=True):
            names = _layer_names(run, layers)
            named = set(_legend_layers(run, names))
            colors = plt.get_cmap("viridis")
            for i, name in enumerate(names):
                rows = [r for r in run.layers if name in r["layers"]]
                ax.plot(
                    [r["step"] for r in rows],
                    [_number(r["layers"][name]["lnr"]) for r in rows],
                    color=colors(i / max(1, len(names) - 1)),
                    lw=1.3 if name in named else 0.6,
                    alpha=1.0 if name in named else 0.5,
                    label=name if name in named else None,
                )
            shown = (
                f"{len(names)} layers"
                if len(named) == len(names)
                else f"{len(names)} layers; legend: top and bottom {len(named) // 2} by final LNR"
            )
            ax.set(
                xlabel="optimizer step",
                ylabel=f"{_lnr_label(run)}  (log)",
                yscale="log",
                title=f"Per-layer LNR: {run.label}\n({shown}; colour: input side dark, output side light)",
            )
            ax.grid(alpha=0.3)
            ax.legend(
                fontsize=7,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                title="layer (input first)",
            )
        save(fig, "lnr.png")

    if len(with_layers) > 1:
        names = _layer_names(with_layers[0], layers)
        picked = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]])) if names else []
        fig, axes = plt.subplots(
            1, max(1, len(picked)), figsize=(5 * max(1, len(picked)), 4), squeeze=False
        )
        for ax, name in zip(axes[0], picked, strict=False):
            for run in with_layers:
                rows = [r for r in run.layers if name in r["layers"]]
                ax.plot(
                    [r["step"] for r in rows],
                    [_number(r["layers"][name]["lnr"]) for r in rows],
                    label=run.label,
                )
            ax.set(xlabel="optimizer step", ylabel="LNR = LWN / LGN", yscale="log", title=name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "lnr_layers.png")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tvlars-plot",
        description="Plot loss, accuracy and per-layer LNR of recipe runs (runs overlaid).",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    parser.add_argument(
        "--layers", default=None, metavar="REGEX", help="only layers whose name matches"
    )
    args = parser.parse_args(argv)
    try:
        written = plot_runs(args.runs, args.out, args.layers)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
