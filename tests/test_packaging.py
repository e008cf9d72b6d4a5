"""pyproject.toml as a newcomer's pip reads it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def test_the_setuptools_bound_admits_only_versions_that_read_the_license_string() -> None:
    """``license = "MIT"`` (an SPDX expression, PEP 639) needs setuptools 77: 76.1.0 fails to build the
    metadata ("project.license must be valid exactly by one definition"), 77.0.3 builds the wheel."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(doc["project"]["license"], str)
    [setuptools] = [r for r in map(Requirement, doc["build-system"]["requires"]) if r.name == "setuptools"]
    assert not setuptools.specifier.contains("76.1.0")
    assert setuptools.specifier.contains("77.0.3")
