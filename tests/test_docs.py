"""The module maps in the docs name every module there is.

README.md's "Architecture" tree and docs/architecture.md's "Where each concept lives" table
are how a reader finds code; both had fallen behind the package (`conditions`, `signals`,
`operator/config`, the test proxies were missing). The pure core's list in
docs/architecture.md is the import-linter contract's, so it is checked against it.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kubemr_async"
#: Packages whose modules the docs describe one by one; kube/ is described as a whole.
DESCRIBED_BY_MODULE = ("operator", "state", "storage", "testing")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _top_level() -> list[str]:
    """Top-level modules (``spec.py``) and packages (``kube/``) of kubemr_async."""
    modules = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    packages = [p.name + "/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    return sorted(modules + packages)


def test_the_readme_architecture_tree_names_every_module() -> None:
    tree = _section((ROOT / "README.md").read_text(), "## Architecture")
    missing = [name for name in _top_level()
               if not re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", tree)]
    assert not missing, f"README.md's Architecture tree does not name {missing}"


def test_the_architecture_table_names_every_module() -> None:
    table = _section((ROOT / "docs" / "architecture.md").read_text(),
                     "## Where each concept lives")
    named = set(re.findall(r"`([\w/]+)`", table))
    wanted = [name.removesuffix(".py").removesuffix("/") for name in _top_level()
              if name.removesuffix("/") not in DESCRIBED_BY_MODULE]
    wanted += [f"{package}/{p.stem}" for package in DESCRIBED_BY_MODULE
               for p in (PACKAGE / package).glob("*.py") if p.name != "__init__.py"]
    missing = sorted(set(wanted) - named)
    assert not missing, f"docs/architecture.md's module table does not name {missing}"


def test_the_pure_core_named_in_the_docs_is_the_contracts() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (core,) = [c for c in contracts["contracts"] if c["name"].startswith("The pure core")]
    text = (ROOT / "docs" / "architecture.md").read_text()
    bullet = text[text.index("- **The core imports no edge module.**"):]
    bullet = bullet[:bullet.index(" import only each other")]
    assert sorted(re.findall(r"`(\w+)`", bullet)) == sorted(
        m.removeprefix("kubemr_async.") for m in core["source_modules"])
