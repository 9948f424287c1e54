"""The JSON Patch applier embedded backends use (the API server is the reference)."""

import pytest

from kubemr_async import protocol
from kubemr_async.patch import PatchTestFailed, apply_patch, writes_hold


def test_test_and_replace_applies_when_tests_hold() -> None:
    doc = {"worker": "", "seq": 1, "nested": {"a": 1}}
    out = apply_patch(doc, [
        {"op": "test", "path": "/worker", "value": ""},
        {"op": "replace", "path": "/worker", "value": "w1"},
        {"op": "add", "path": "/nested/b", "value": [1]},
    ])
    assert out == {"worker": "w1", "seq": 1, "nested": {"a": 1, "b": [1]}}
    assert doc["worker"] == "", "the input document must not be modified"


def test_failed_test_rejects_the_whole_patch() -> None:
    doc = {"worker": "w0", "seq": 1}
    with pytest.raises(PatchTestFailed):
        apply_patch(doc, [
            {"op": "replace", "path": "/seq", "value": 2},
            {"op": "test", "path": "/worker", "value": ""},
        ])
    assert doc == {"worker": "w0", "seq": 1}


def test_escaped_paths_and_remove() -> None:
    out = apply_patch({"a/b": 1, "m~n": 2}, [
        {"op": "remove", "path": "/a~1b"},
        {"op": "replace", "path": "/m~0n", "value": 3},
    ])
    assert out == {"m~n": 3}


@pytest.mark.parametrize("ops", [
    [{"op": "replace", "path": "/missing", "value": 1}],
    [{"op": "test", "path": "/missing", "value": None}],
    [{"op": "remove", "path": "/missing"}],
])
def test_missing_paths_fail_like_the_api_server(ops: list[dict[str, object]]) -> None:
    with pytest.raises(PatchTestFailed):
        apply_patch({"a": 1}, ops)


def test_unknown_op_and_bad_path_are_errors() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        apply_patch({}, [{"op": "move", "path": "/a", "from": "/b"}])
    with pytest.raises(ValueError, match="must start with"):
        apply_patch({}, [{"op": "add", "path": "a", "value": 1}])


def test_writes_hold_tells_a_landed_write_from_one_that_did_not_land() -> None:
    """How a client whose answer was lost learns whether its guarded write was applied."""
    body = protocol.new_task(protocol.TaskKind.MAP, 0, "in")
    claim = protocol.claim(body, "w1", 0.0, 10.0, 3)
    landed = apply_patch(body, claim.ops)
    assert writes_hold(landed, claim.ops)
    assert not writes_hold(body, claim.ops)  # not applied
    rival = apply_patch(body, protocol.claim(body, "w2", 0.0, 10.0, 3).ops)
    assert not writes_hold(rival, claim.ops)  # another claimant won the same seq
    later = apply_patch(landed, protocol.renew(landed, "w1", 5.0, 10.0).ops)
    assert not writes_hold(later, claim.ops)  # moved on since: cannot tell, so no
    removal = [{"op": "remove", "path": "/error"}]
    assert writes_hold(apply_patch(body, removal), removal)
    assert not writes_hold(body, removal)
    assert not writes_hold(body, [{"op": "replace", "path": "/no/such", "value": 1}])
