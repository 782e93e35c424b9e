"""The version is written once (``tvlars_scale.__version__``): the installed distribution's
metadata (pyproject.toml reads it with setuptools' ``attr:``), ``CITATION.cff`` and
``CHANGELOG.md`` agree with it."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import tvlars_scale

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    installed = importlib.metadata.version("tvlars_scale")
    assert tvlars_scale.__version__ == installed, (
        f"tvlars_scale.__version__ is {tvlars_scale.__version__}, the installed metadata says "
        f"{installed}: reinstall (pip install -e .)"
    )


def test_citation_version_is_the_package_version():
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the recipes extra (accelerate)")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0"
    assert str(citation["version"]) == tvlars_scale.__version__
    assert citation["license"] == "MIT"


def test_changelog_has_the_package_version():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert tvlars_scale.__version__ in headings, headings
