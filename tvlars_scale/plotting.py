"""``tvlars-plot``: PNG plots of one or more run directories, runs overlaid.

    tvlars-plot runs/a runs/b --out plots/

Reads each run's ``metrics.jsonl``, ``layers.jsonl`` and ``config.json`` (written by the
recipes) and writes:

- ``loss.png``: training loss over optimizer steps;
- ``accuracy.png``: test accuracy over steps (and the linear-evaluation accuracy of Barlow
  Twins runs as markers);
- ``lnr.png``: per-layer LNR = ||w|| / ||g|| over steps, one panel per run, one line per layer
  coloured by depth (the paper's Figure 3); by default the layers with a trust ratio (not the
  biases and norm gains), ``--layers REGEX`` to choose;
- ``lnr_layers.png`` (several runs): a few layers (first, middle, last), runs overlaid.
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
                label=f"{run.label}: linear eval",
            )
    ax.set(xlabel="optimizer step", ylabel="test accuracy (%)", title="Test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "accuracy.png")

    with_layers = [run for run in runs if run.layers]
    if with_layers:
        fig, axes = plt.subplots(
            len(with_layers), 1, figsize=(8, 3.8 * len(with_layers)), squeeze=False
        )
        for ax, run in zip(axes[:, 0], with_layers, strict=True):
            names = _layer_names(run, layers)
            colors = plt.get_cmap("viridis")
            for i, name in enumerate(names):
                steps = [r["step"] for r in run.layers]
                values = [_number(r["layers"][name]["lnr"]) for r in run.layers]
                ax.plot(steps, values, color=colors(i / max(1, len(names) - 1)), lw=1)
            ax.set(
                xlabel="optimizer step",
                ylabel="LNR = ||w|| / ||g||",
                yscale="log",
                title=f"Per-layer LNR: {run.label} ({len(names)} layers, dark = input side)",
            )
            ax.grid(alpha=0.3)
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
            ax.set(xlabel="optimizer step", ylabel="LNR", yscale="log", title=name)
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
