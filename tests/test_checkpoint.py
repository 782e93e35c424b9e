"""Checkpoint bookkeeping without a launch: which folders count as complete, what --resume
accepts, and the telemetry cursor of RunLogger."""

from __future__ import annotations

import json

import pytest

from tvlars_scale.recipes.checkpoint import latest_checkpoint, resolve_resume
from tvlars_scale.recipes.metrics import RunLogger


def _folder(run_dir, name, complete=True):
    path = run_dir / "checkpoints" / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    if complete:
        (path / "train_state.json").write_text(json.dumps({"step": int(name[5:12])}))
    return path


def test_resume_auto_takes_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    _folder(tmp_path, "step_0000004")
    newest = _folder(tmp_path, "step_0000008")
    _folder(tmp_path, "step_0000012", complete=False)  # crashed before train_state.json
    _folder(tmp_path, "step_0000016.partial")  # crashed before the rename
    _folder(tmp_path, "step_0000020.stale")  # replaced by a re-save of step 20
    assert latest_checkpoint(tmp_path) == newest
    assert resolve_resume("auto", tmp_path) == newest
    assert resolve_resume(str(tmp_path), tmp_path) == newest  # a run directory


def test_resume_refuses_an_incomplete_checkpoint(tmp_path):
    incomplete = _folder(tmp_path, "step_0000012", complete=False)
    partial = _folder(tmp_path, "step_0000016.partial")
    for path in (incomplete, partial, tmp_path / "nope"):
        with pytest.raises(ValueError, match="no complete checkpoint there"):
            resolve_resume(str(path), tmp_path)


def test_telemetry_cursor_rewinds_what_a_crashed_attempt_wrote(tmp_path):
    logger = RunLogger(tmp_path, True, total_steps=4, progress=False, tensorboard=False)
    logger.log("train", 1, loss=1.0)
    logger.layers(1, {"fc": {"lnr": 0.1}})
    cursor = logger.cursor()  # saved with the checkpoint of step 1
    logger.log("train", 2, loss=0.5)  # written, then the run dies
    logger.layers(2, {"fc": {"lnr": 0.2}})
    logger.close()

    resumed = RunLogger(tmp_path, True, 4, 1, progress=False, tensorboard=False, rewind_to=cursor)
    resumed.log("train", 2, loss=0.5)
    resumed.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    layers = (tmp_path / "layers.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in layers] == [1]

    fresh = RunLogger(tmp_path, True, 4, progress=False, tensorboard=False, rewind_to={})
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
