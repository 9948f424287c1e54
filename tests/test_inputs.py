"""Input expansion and line-aligned splits, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemr_async.errors import UsageError
from kubemr_async.inputs import expand_inputs, expand_local, plan_splits, read_split
from kubemr_async.storage.fs import FileBlobStore


def test_expand_paths_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.txt", "d/sub/c.log", "d/.hidden"]:
        (tmp_path / name).write_bytes(b"x\n")
    names = [Path(p).name for p, _ in expand_local(str(tmp_path / "d"))]
    assert names == ["a.txt", "b.txt", "c.log"]
    assert [Path(p).name for p, _ in expand_local(str(tmp_path / "d" / "*.txt"))] == \
        ["a.txt", "b.txt"]
    assert [Path(p).name for p, _ in expand_local(str(tmp_path / "d/**/*.log"))] == ["c.log"]
    assert expand_local(str(tmp_path / "d" / "a.txt"))[0][1] == 2


@pytest.mark.parametrize(("setup", "pattern", "message"), [
    (None, "missing.txt", "does not exist"),
    (None, "*.nothing", "matches no files"),
    ("emptydir", "emptydir", "contains no files"),
])
def test_bad_inputs_name_the_problem(tmp_path: Path, setup: str | None, pattern: str,
                                     message: str) -> None:
    if setup:
        (tmp_path / setup).mkdir()
    with pytest.raises(UsageError, match=message):
        expand_local(str(tmp_path / pattern))


def test_unreadable_input_is_rejected(tmp_path: Path) -> None:
    import os

    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a dangling symlink instead
        path = tmp_path / "dangling.txt"
        path.symlink_to(tmp_path / "gone")
        with pytest.raises(UsageError, match="does not exist"):
            expand_local(str(path))
    else:
        with pytest.raises(UsageError, match="not readable"):
            expand_local(str(path))


def test_plan_splits_cuts_by_chunk_size() -> None:
    splits = plan_splits([("a", 10), ("b", 0), ("c", 4)], 4)
    assert splits == [("a", (0, 4)), ("a", (4, 8)), ("a", (8, 10)), ("b", (0, 0)), ("c", (0, 4))]


@pytest.mark.anyio
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400).map(lambda b: b.replace(b"\r", b"\n")),
       chunk=st.integers(1, 64))
async def test_splits_cover_every_line_exactly_once(tmp_path: Path, data: bytes,
                                                    chunk: int) -> None:
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    store = FileBlobStore("/")
    key = str(path)[1:]
    pieces = [await read_split(store, key, start, end, len(data))
              for _, (start, end) in plan_splits([(str(path), len(data))], chunk)]  # type: ignore[misc]
    assert b"".join(pieces) == data
    consumed = 0
    for piece in pieces:  # only the piece that reaches EOF may end without a newline
        consumed += len(piece)
        assert piece == b"" or piece.endswith(b"\n") or consumed == len(data)


@pytest.mark.anyio
async def test_long_lines_cross_the_read_window(tmp_path: Path) -> None:
    data = b"a" * 200_000 + b"\n" + b"b" * 10 + b"\n" + b"c" * 150_000
    path = tmp_path / "long.txt"
    path.write_bytes(data)
    store = FileBlobStore("/")
    splits = plan_splits(await expand_inputs([str(path)]), 1000)
    pieces = [await read_split(store, str(path)[1:], s, e, len(data))
              for _, (s, e) in splits]  # type: ignore[misc]
    assert b"".join(pieces) == data
    # Lines belong to the split they begin in: b and c both begin in [200000, 201000).
    assert [p for p in pieces if p] == [b"a" * 200_000 + b"\n",
                                        b"b" * 10 + b"\n" + b"c" * 150_000]
