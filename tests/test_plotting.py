"""``tvlars-plot`` on small synthetic run directories: each figure is written and holds what it
claims (the phi plot's lines, the layer names in lnr.png's legend, the linear-evaluation curve
of a Barlow Twins run). A real run's plots: tests/test_recipes_launch.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from tvlars_scale import plotting

STEPS = 40
LAYERS = [f"features.{i}.weight" for i in range(14)]


def _write_run(
    folder: Path, optimizer: str, *, layers: list[str] = LAYERS, linear_epochs: int = 0
) -> Path:
    """A run directory as the recipes write it: train/eval (and linear-stage) records in
    metrics.jsonl, per-layer stats in layers.jsonl; layer i has LNR 10**(i / 4)."""
    folder.mkdir(parents=True)
    config = {"args": {"optimizer": optimizer}, "batch_plan": {"global_batch": 512}, "lr": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    metrics, telemetry = [], []
    for step in range(2, STEPS + 1, 2):
        phi = math.exp(-step / 20) if optimizer == "tvlars" else None
        metrics.append(
            {"kind": "train", "step": step, "epoch": step / 4, "loss": 2 / step, "lr": 2.0}
            | {"opt_step": float(step), "phi": phi}
        )
        if step % 4 == 0:
            metrics.append({"kind": "eval", "step": step, "epoch": step / 4, "test_acc": 0.5})
            rows = {
                name: {"lwn": 1.0, "lgn": 1.0, "lnr": 10 ** (i / 4), "trust_ratio": 0.5}
                for i, name in enumerate(layers)
            }
            telemetry.append({"step": step, "layers": rows})
    for epoch in range(1, linear_epochs + 1):
        kind = "linear_eval" if epoch == linear_epochs else "linear_epoch"
        metrics.append(
            {"kind": kind, "step": 5 * epoch, "epoch": float(epoch), "test_acc": 0.9 - 0.4 / epoch}
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (folder / "layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in telemetry))
    return folder


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures ``plot_runs`` saves, by file name (closing them is skipped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved: dict[str, object] = {}
    savefig, close = matplotlib.figure.Figure.savefig, plt.close

    def record(fig, name, *args, **kwargs):
        saved[Path(name).name] = fig
        return savefig(fig, name, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    yield saved
    close("all")


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_phi_and_effective_lr(tmp_path, figures):
    tvlars = _write_run(tmp_path / "tvlars", "tvlars")
    lamb = _write_run(tmp_path / "lamb", "lamb")
    written = plotting.plot_runs([tvlars, lamb], tmp_path / "plots")
    assert [p.name for p in written] == [
        "loss.png",
        "accuracy.png",
        "phi.png",
        "lnr.png",
        "lnr_layers.png",
    ]
    assert all(_is_png(p) for p in written)
    ax_phi, ax_lr = figures["phi.png"].axes
    phi_lines = {line.get_label(): line for line in ax_phi.get_lines()}
    assert set(phi_lines) == {"tvlars B=512 lr=2", "lamb B=512 lr=2"}
    steps = list(range(2, STEPS + 1, 2))
    assert list(phi_lines["tvlars B=512 lr=2"].get_xdata()) == steps
    assert list(phi_lines["tvlars B=512 lr=2"].get_ydata()) == pytest.approx(
        [math.exp(-s / 20) for s in steps]
    )
    assert set(phi_lines["lamb B=512 lr=2"].get_ydata()) == {1.0}  # no phi: LAMB's is 1
    # per run: the effective LR lr * phi(t) and the scheduled lr
    lr_lines = {line.get_label(): line for line in ax_lr.get_lines()}
    assert list(lr_lines["tvlars B=512 lr=2: lr * phi(t)"].get_ydata()) == pytest.approx(
        [2 * math.exp(-s / 20) for s in steps]
    )
    assert set(lr_lines["tvlars B=512 lr=2: lr"].get_ydata()) == {2.0}
    assert set(lr_lines["lamb B=512 lr=2: lr * phi(t)"].get_ydata()) == {2.0}
    assert ax_lr.get_xlabel() == "optimizer step" and ax_phi.get_ylabel() == "phi(t)"


def test_lnr_legend_names_layers(tmp_path, figures):
    few = _write_run(tmp_path / "few", "tvlars", layers=LAYERS[:4])
    many = _write_run(tmp_path / "many", "lamb")
    plotting.plot_runs([few, many], tmp_path / "plots")
    ax_few, ax_many = figures["lnr.png"].axes
    legend = [t.get_text() for t in ax_few.get_legend().get_texts()]
    assert legend == LAYERS[:4]  # every layer named, in depth order
    assert ax_few.get_ylabel().startswith("LNR = ||w|| / ||g + wd*w||")
    # 14 layers: the 5 highest and 5 lowest final LNR named (LNR grows with depth here)
    legend = [t.get_text() for t in ax_many.get_legend().get_texts()]
    assert legend == LAYERS[:5] + LAYERS[-5:]
    assert len(ax_many.get_lines()) == len(LAYERS)  # the others still drawn, unnamed
    assert ax_many.get_ylabel().startswith("LNR = ||w|| / ||u||")  # LAMB's denominator
    assert "top and bottom 5" in ax_many.get_title()
    assert ax_many.get_yscale() == "log" and ax_many.get_xlabel() == "optimizer step"


def test_barlow_twins_loss_and_linear_accuracy_per_epoch(tmp_path, figures):
    run = _write_run(tmp_path / "bt", "tvlars", linear_epochs=5)
    written = plotting.plot_runs([run], tmp_path / "plots")
    assert "barlow_twins.png" in [p.name for p in written]
    ax_loss, ax_acc = figures["barlow_twins.png"].axes
    (loss,) = ax_loss.get_lines()
    assert len(loss.get_xdata()) == STEPS // 2 and ax_loss.get_xlabel() == "pre-training epoch"
    (curve,) = ax_acc.get_lines()
    assert list(curve.get_xdata()) == [1, 2, 3, 4, 5]  # one point per linear epoch
    assert list(curve.get_ydata()) == pytest.approx([100 * (0.9 - 0.4 / e) for e in range(1, 6)])
    legend = [t.get_text() for t in ax_acc.get_legend().get_texts()]
    assert legend[-1].endswith("final 82.00%")  # the final evaluation, marked
    # a classification run has no linear stage: no barlow_twins.png
    assert "barlow_twins.png" not in [
        p.name for p in plotting.plot_runs([_write_run(tmp_path / "c", "lars")], tmp_path / "c_")
    ]
