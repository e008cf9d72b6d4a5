"""Print pip constraints that pin every dependency of pyproject.toml to its lower bound.

CI installs the package with them (``PIP_CONSTRAINT``, so the build backend's floor is used too) into
a fresh virtual environment and runs a smoke subset of the tests: the lower bounds are tested, not
guessed. tests/test_dependencies.py checks that every dependency has a lower and a major upper bound.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*>=\s*([^,;\s]+)[^;]*(;.*)?$")


def requirements(pyproject: Path) -> list[str]:
    doc = tomllib.loads(pyproject.read_text())
    found = list(doc["build-system"]["requires"]) + list(doc["project"]["dependencies"])
    for extra in doc["project"].get("optional-dependencies", {}).values():
        found += extra
    return found


def lowest(requirement: str) -> str:
    match = REQUIREMENT.match(requirement)
    if match is None:
        raise SystemExit(f"no lower bound in {requirement!r}")
    name, version, marker = match.groups()
    return f"{name}=={version}" + (f" {marker}" if marker else "")


def main() -> int:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    lines = sorted({lowest(requirement) for requirement in requirements(pyproject)})
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
