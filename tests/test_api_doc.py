"""docs/api.md is what docs/gen_api.py writes from the signatures and docstrings of today's code.

The generator fails when a constructor argument has no description in its class's ``Args:``, so
a new argument cannot reach the reference undocumented; this test fails when the committed file
differs from the generated one (a changed signature, default or docstring): rerun
``python docs/gen_api.py``. The examples in docs/api.md run in tests/test_doc_examples.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
from pathlib import Path

import tvlars_scale

ROOT = Path(__file__).resolve().parents[1]


def generator():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_md_is_generated_from_the_docstrings():
    committed = (ROOT / "docs" / "api.md").read_text()
    generated = generator().generate()
    diff = "\n".join(
        difflib.unified_diff(
            committed.splitlines(), generated.splitlines(), "docs/api.md", "generated", n=1
        )
    )
    assert committed == generated, f"docs/api.md is stale: run python docs/gen_api.py\n{diff}"


def test_every_constructor_argument_is_in_the_reference():
    text = (ROOT / "docs" / "api.md").read_text()
    for cls in (tvlars_scale.TVLARS, tvlars_scale.LARS, tvlars_scale.LAMB):
        section = text.split(f"### `tvlars_scale.{cls.__name__}`", 1)[1].split("\n### ", 1)[0]
        for name in inspect.signature(cls).parameters:
            assert f"| `{name}`" in section, (cls.__name__, name)


def test_the_reference_covers_the_public_api():
    text = (ROOT / "docs" / "api.md").read_text()
    names = [
        "tvlars_scale.TVLARS",
        "tvlars_scale.LARS",
        "tvlars_scale.LAMB",
        "tvlars_scale.TVLARSSchedule",
        "tvlars_scale.TVLARSPhi",
        "tvlars_scale.LayerStats",
        "tvlars_scale.LayerStats.to_dict",
        "tvlars_scale.fsdp.bind",
        "tvlars_scale.deepspeed.bind",
        "tvlars_scale.deepspeed.check_config",
        "tvlars_scale.deepspeed.load_config",
        "tvlars_scale.layouts.register_adapter",
        "tvlars_scale.layouts.LayoutAdapter",
        "tvlars_scale.layouts.GroupLayout",
        "tvlars_scale.layouts.Layer",
        "tvlars_scale.layouts.Segment",
    ]
    for name in names:
        assert f"### `{name}`" in text, name
    for key in ("lwn", "lgn", "trust_ratio", "scale", "lnr"):  # LayerStats.to_dict's keys
        assert f'"{key}"' in text, key
    for option in ("fused", "model_group", "decide_on_host"):
        assert f"| `{option}` |" in text, option


def test_the_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    gen = generator()
    stale = tmp_path / "api.md"
    stale.write_text("# API reference\n")
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 1
    assert "docs/api.md is stale" in capsys.readouterr().err
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
