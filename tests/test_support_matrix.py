"""docs/support.md cannot drift from the tests: every test it names exists (file, function, and
parametrised case), every row has a known status, and the README links it on its first screen.

Rows whose status is ``placeholder`` name test files being written; they are only checked once
the file exists.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = ROOT / "docs" / "support.md"
STATUSES = ("tested on CPU/gloo", "tested on CPU", "tested on GPU/NCCL", "untested", "placeholder")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+)(\[[^\]`]+\])?)?`")


def rows() -> list[list[str]]:
    """The body rows of every table in docs/support.md, as lists of cells."""
    found = []
    for line in SUPPORT.read_text().splitlines():
        if not line.startswith("| ") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == "route":  # a header
            continue
        found.append(cells)
    return found


def references() -> list[tuple[str, str | None, str | None, bool]]:
    """(file, function, parametrised id, placeholder) for every test the matrix names."""
    refs = []
    for cells in rows():
        placeholder = cells[-1] == "placeholder"
        for path, function, case in TEST_REF.findall(" ".join(cells)):
            refs.append((path, function or None, case or None, placeholder))
    return refs


def test_the_matrix_has_rows_and_known_statuses():
    table = rows()
    assert len(table) > 30
    for cells in table:
        assert len(cells) == 5, cells
        assert cells[-1].startswith(STATUSES), f"unknown status in {cells}"


def test_nothing_claims_a_gpu_run_yet():
    """The matrix says plainly that nothing has run on a GPU; a GPU row must change both."""
    text = SUPPORT.read_text()
    gpu_rows = [c for c in rows() if c[-1].startswith("tested on GPU/NCCL")]
    assert not gpu_rows or "Nothing in this repository has run on a GPU yet" not in text


def test_every_named_test_exists():
    missing = []
    for path, function, _, placeholder in references():
        file = ROOT / path
        if not file.is_file():
            if not placeholder:
                missing.append(path)
            continue
        if function is None:
            continue
        tree = ast.parse(file.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if function not in defined:
            missing.append(f"{path}::{function}")
    assert not missing, f"docs/support.md names tests that do not exist: {missing}"


def test_every_named_case_is_collected():
    """A ``file::test[id]`` is one of pytest's collected cases (files that collect nothing here,
    for a missing optional package, are left out)."""
    cases = [(p, f, c) for p, f, c, placeholder in references() if c and not placeholder]
    files = sorted({p for p, _, _ in cases})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:logging", "-q", "--collect-only", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    collected = set(proc.stdout.splitlines())
    if not collected:
        pytest.fail(f"collection failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    has_items = {p for p in files if any(c.startswith(p + "::") for c in collected)}
    missing = [f"{p}::{f}{c}" for p, f, c in cases if p in has_items and f"{p}::{f}{c}" not in
               collected]  # fmt: skip
    assert not missing, f"docs/support.md names cases pytest does not collect: {missing}"


def test_the_readme_links_the_matrix_on_its_first_screen():
    first_screen = (ROOT / "README.md").read_text().splitlines()[:25]
    assert any("(docs/support.md)" in line for line in first_screen)
