"""constraints.txt, the locked versions every checkout installs and every image ships.

scripts/lock writes it; scripts/bootstrap and the Dockerfile install with ``-c`` it. These
check that it stays a lock of what pyproject.toml asks for, and that the environment
running the tests is that lock (so CI tests the versions the image is built at).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def pins() -> dict[str, str]:
    """Canonical name -> version; every line that is not a comment must be a pin."""
    out: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"constraints.txt:{number}: not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in out, f"constraints.txt:{number}: {name} pinned twice"
        out[name] = match.group(2)
    return out


def declared(*extras: str) -> list[Requirement]:
    """The package's requirements and those of ``extras`` (every extra if none is named)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    lists = [project["dependencies"], *(optional[e] for e in extras or optional)]
    return [Requirement(text) for group in lists for text in group]


def test_every_declared_requirement_is_pinned_within_its_range() -> None:
    locked = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement}: not in constraints.txt (run scripts/lock)"
        assert requirement.specifier.contains(locked[name], prereleases=True), \
            f"{requirement}: constraints.txt pins {locked[name]} (run scripts/lock)"


def test_the_environment_running_the_tests_is_the_lock() -> None:
    """What scripts/bootstrap installed (the package and its test extra) is what
    constraints.txt says: a pin edited without a reinstall, or an install that ignored the
    constraints, shows here. The bench extra's pins are not installed for the tests."""
    locked = pins()
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions()}
    missing = [str(r) for r in declared("test") if canonicalize_name(r.name) not in installed]
    assert not missing, f"declared but not installed: {missing}"
    differing = {name: f"{installed[name]} installed, {version} locked"
                 for name, version in locked.items()
                 if name in installed and installed[name] != version}
    assert not differing, f"installed versions differ from constraints.txt: {differing}"
