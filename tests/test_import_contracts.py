"""The import-linter contracts' names say what they enforce (pyproject.toml).

`lint-imports` reports a broken contract by its name, and docs/architecture.md describes
the rules by them, so a name that lags behind its contract misleads both: the operator's
layers contract once named three of its six layers. These checks tie each name to the
contract's own lists; lint-imports (scripts/test) checks the imports themselves.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS: list[dict[str, Any]] = tomllib.loads(
    (ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def of_type(kind: str) -> list[dict[str, Any]]:
    found = [c for c in CONTRACTS if c["type"] == kind]
    assert found, f"no {kind} contract in pyproject.toml"
    return found


@pytest.mark.parametrize("contract", of_type("layers"), ids=lambda c: c["name"][:40])
def test_a_layers_contract_is_named_by_its_layers_top_down(contract: dict[str, Any]) -> None:
    _, _, named = contract["name"].partition(": ")
    assert named == " > ".join(contract["layers"]), \
        f"name {contract['name']!r} does not list the layers {contract['layers']}"


@pytest.mark.parametrize("contract", of_type("protected"), ids=lambda c: c["name"][:40])
def test_a_protected_contract_names_what_it_protects(contract: dict[str, Any]) -> None:
    missing = [m for m in contract["protected_modules"] if m not in contract["name"]]
    assert not missing, f"name {contract['name']!r} does not mention {missing}"


@pytest.mark.parametrize("contract", [c for c in of_type("forbidden")
                                      if len(c["source_modules"]) == 1],
                         ids=lambda c: c["name"][:40])
def test_a_single_module_forbidden_contract_names_its_module(contract: dict[str, Any]) -> None:
    (source,) = contract["source_modules"]
    assert source in contract["name"], f"name {contract['name']!r} does not mention {source}"


def test_names_are_unique() -> None:
    names = [c["name"] for c in CONTRACTS]
    assert len(names) == len(set(names)), names
