"""A small, pure RFC 6902 (JSON Patch) applier for the operations the task protocol uses.

The protocol expresses every state change as a JSON Patch whose ``test`` operations guard
the write (the original kubemr's lock). The Kubernetes backend sends the patch to the API
server as is; embedded backends apply it here, inside a transaction, so both backends share
one definition of "the write only happens if the tests hold".
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

JSONPatch = Sequence[Mapping[str, Any]]


class PatchTestFailed(Exception):
    """A ``test`` operation did not hold: the caller lost a race (not an error)."""


def _split(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON Patch path must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: dict[str, Any], parts: list[str], path: str) -> dict[str, Any]:
    node: Any = doc
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            raise PatchTestFailed(f"path {path} does not exist")
        node = node[part]
    if not isinstance(node, dict):
        raise PatchTestFailed(f"path {path} does not name an object member")
    return node


def apply_patch(doc: Mapping[str, Any], ops: JSONPatch) -> dict[str, Any]:
    """Return a patched deep copy of ``doc``; raise PatchTestFailed if any test fails.

    Like the API server, a failed test rejects the whole patch: nothing is applied.
    """
    result: dict[str, Any] = copy.deepcopy(dict(doc))
    for op in ops:
        kind, path = op["op"], op["path"]
        parts = _split(path)
        parent = _parent(result, parts, path)
        leaf = parts[-1]
        if kind == "test":
            if leaf not in parent or parent[leaf] != op["value"]:
                raise PatchTestFailed(f"test {path} == {op['value']!r} failed")
        elif kind == "add":
            parent[leaf] = copy.deepcopy(op["value"])
        elif kind == "replace":
            if leaf not in parent:
                raise PatchTestFailed(f"replace of missing path {path}")
            parent[leaf] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if leaf not in parent:
                raise PatchTestFailed(f"remove of missing path {path}")
            del parent[leaf]
        else:
            raise ValueError(f"unsupported JSON Patch op {kind!r}")
    return result


def writes_hold(doc: Mapping[str, Any], ops: JSONPatch) -> bool:
    """Whether ``doc`` shows every write of ``ops`` (its ``test`` operations aside): each
    added or replaced path holds the op's value, each removed one is gone.

    How a client tells whether a patch whose answer it never got was applied: the
    protocol's writes all bump ``seq`` under a ``test`` of it, so a record whose fields
    (``seq`` included) are what the patch wrote is the patch having landed.
    """
    for op in ops:
        kind, path = op["op"], op["path"]
        if kind == "test":
            continue
        parts = _split(path)
        try:
            parent = _parent(dict(doc), parts, path)
        except PatchTestFailed:
            return False
        if kind == "remove":
            if parts[-1] in parent:
                return False
        elif parts[-1] not in parent or parent[parts[-1]] != op["value"]:
            return False
    return True
