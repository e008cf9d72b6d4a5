"""Every dependency in pyproject.toml (the build backend, the package's, every extra's) has a lower bound
and a major-version upper bound. The lower bounds are tested: CI installs them all with the pins
.ci/lowest.py derives from this file and runs a smoke subset of the tests on them (.ci/run)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = re.compile(r"([A-Za-z0-9._-]+)>=([0-9][0-9.]*),<([0-9]+)")


def lowest_module() -> object:
    spec = importlib.util.spec_from_file_location("lowest", ROOT / ".ci" / "lowest.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOWEST = lowest_module()
REQUIREMENTS: list[str] = LOWEST.requirements(ROOT / "pyproject.toml")  # type: ignore[attr-defined]


@pytest.mark.parametrize("requirement", REQUIREMENTS)
def test_each_dependency_has_a_lower_and_a_major_upper_bound(requirement: str) -> None:
    match = BOUNDS.fullmatch(requirement.partition(";")[0].replace(" ", ""))
    assert match, f"{requirement!r}: write it as name>=LOWEST,<MAJOR"
    _, lower, upper = match.groups()
    assert int(upper) > int(lower.split(".")[0]), f"{requirement!r}: the upper bound must be a later major version"


def test_the_ci_pins_each_dependency_at_its_lower_bound() -> None:
    pins = {line.split("==")[0]: line for line in (LOWEST.lowest(r) for r in REQUIREMENTS)}  # type: ignore[attr-defined]
    assert pins["aiohttp"].startswith("aiohttp==3.")
    names = {requirement.partition(">=")[0].strip() for requirement in REQUIREMENTS}
    assert set(pins) == names
    assert all("==" in pin for pin in pins.values())
