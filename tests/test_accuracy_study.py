"""The accuracy study's v3 logic and its written claims (benchmarks/accuracy_study.py).

The prose of benchmarks/RESULTS.md and README.md quotes the study's numbers; after each
``<!-- claims: ... -->`` comment every "METHOD mean ± half-range" and every "A trails B by D" is
recomputed from the committed results.jsonl, and README's table is regenerated, so text and
tables cannot drift apart. The decay phases are checked on synthetic results.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "accuracy_v2"


@pytest.fixture(scope="module")
def study_module():
    spec = importlib.util.spec_from_file_location(
        "accuracy_study", REPO / "benchmarks" / "accuracy_study.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_study"] = module  # its dataclasses look themselves up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("accuracy_study", None)


@pytest.fixture(scope="module")
def study(study_module):
    return study_module.Study(out=RESULTS)


@pytest.mark.parametrize(("doc", "claims"), [("benchmarks/RESULTS.md", 30), ("README.md", 5)])
def test_prose_numbers_match_the_results(study_module, study, doc, claims):
    checked, errors = study_module.check_prose(study, (REPO / doc).read_text())
    assert not errors, "\n".join(errors)
    assert checked >= claims, f"{doc}: {checked} claims found under '<!-- claims: -->' comments"


def test_readme_table_is_the_generated_one(study_module, study):
    text = (REPO / "README.md").read_text()
    begin, end = study_module.SUMMARY_MARKERS
    written = text[text.index(begin) + len(begin) : text.index(end)].strip()
    assert written == study_module.summary_table(study), (
        "README.md's accuracy table differs from results.jsonl: run "
        "`python benchmarks/accuracy_study.py --report --results-md benchmarks/RESULTS.md "
        "--readme README.md`"
    )


def test_prose_check_catches_a_wrong_number(study_module, study):
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    _, errors = study_module.check_prose(study, text)
    assert not errors
    claim = next(study_module._MEAN.finditer(text[text.index("<!-- claims:") :]))
    mean = float(claim[2])
    wrong = text.replace(claim[0], claim[0].replace(claim[2], f"{mean + 0.1:.1f}", 1), 1)
    assert study_module.check_prose(study, wrong)[1]
    gap = next(study_module._GAP.finditer(text))
    wrong = text.replace(gap[0], gap[0].replace(gap[3], f"{float(gap[3]) + 0.1:.1f}"), 1)
    assert study_module.check_prose(study, wrong)[1]
    stray = text.replace("<!-- claims:", "a number 1.0 ± 2.0 nobody checks\n<!-- claims:", 2)
    assert any("not in a checked claim" in e for e in study_module.check_prose(study, stray)[1])


def test_decay_phases(study_module, tmp_path):
    """TVLARS' decay: final_factor runs at the two best grid LRs, the winner chosen on seed 0's
    validation accuracy runs on the later seeds; rechecks rerun a finished run beside it."""
    Run = study_module.RunSpec
    study = study_module.Study(out=tmp_path, max_extend=0, rechecks=("cls-b1024-tvlars-lr3-s0",))
    results = tmp_path / "results.jsonl"

    def finish(spec, val_acc: float) -> None:
        row = {f: getattr(spec, f) for f in ("kind", "optimizer", "batch", "lr", "seed", "phase")}
        row |= {"final_factor": spec.final_factor, "tag": spec.tag, "val_acc": val_acc}
        row |= {"test_acc": val_acc, "finished": "2026-12-06T00:00:00+00:00"}
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")

    phases = {p.name: p for p in study.phases()}
    decay, winner = phases["cls tvlars decay"], phases["cls tvlars decay winner"]
    assert study.specs(decay) == [None] * 4  # the grid is not finished
    for lr, acc in ((1.5, 0.80), (3.0, 0.85), (6.0, 0.83)):
        finish(Run("cls", "tvlars", 1024, lr, 0, "grid"), acc)
    runs = study.specs(decay)
    assert [(r.lr, r.final_factor) for r in runs] == [
        (3.0, 0.25),
        (3.0, 0.45),
        (6.0, 0.25),
        (6.0, 0.45),
    ]
    assert "--final-factor=0.25" in study.command(runs[0])
    assert runs[0].tag == "cls-b1024-tvlars-lr3-s0-ff0.25"
    assert study.specs(winner) == [None, None]
    for run, acc in zip(runs, (0.84, 0.86, 0.82, 0.81), strict=True):
        finish(run, acc)
    assert study.decay_winner("cls", 1024) == (3.0, 0.45)
    assert [(r.lr, r.final_factor, r.seed) for r in study.specs(winner)] == [
        (3.0, 0.45, 1),
        (3.0, 0.45, 2),
    ]
    (recheck,) = study.specs(phases["recheck"])
    assert recheck.tag == "cls-b1024-tvlars-lr3-s0-recheck"
    original = study.command(Run("cls", "tvlars", 1024, 3.0, 0, "grid"))
    differ = [(a, b) for a, b in zip(study.command(recheck), original, strict=True) if a != b]
    assert [a.split("=")[0] for a, _ in differ] == ["--output-dir"]  # the same run, beside it
    # a rerun is not a seed of its cell
    finish(recheck, 0.5)
    assert [
        r["val_acc"] for r in study_module.runs_at(study.results(), "cls", 1024, "tvlars", 3.0)
    ] == [0.85]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr-grid", "sgd=1"], "--lr-grid 'sgd=1': expected OPT=LR[,LR...]"),
        (["--lr-grid", "tvlars=0,1"], "and positive LRs"),
        (["--phases", "cls grid"], "--phases: no phase ['cls grid']"),
    ],
)
def test_bad_options_are_refused(study_module, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        study_module.main(["--out", str(tmp_path), *argv])
    assert stop.value.code != 0
    assert message in capsys.readouterr().err + str(stop.value.code)
