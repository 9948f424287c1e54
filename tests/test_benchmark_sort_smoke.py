"""Smoke test for the sort benchmark: corpus properties, and every peer's output validates.

No timing assertions: this only guards the benchmark's correctness machinery.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import sort as bench  # noqa: E402


def test_corpus_is_deterministic_cached_and_well_formed(tmp_path: Path) -> None:
    c = bench.ensure_sort_corpus(tmp_path, 100_050, 3, seed=3)
    assert c.generated and c.spec.records == 1000
    assert [p.stat().st_size for p in c.paths] == [33_400, 33_300, 33_300]
    assert sorted(c.directory.iterdir()) == c.paths  # the directory is a clean --input
    data = b"".join(p.read_bytes() for p in c.paths)
    rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, 100)
    assert (rows[:, 99] == ord("\n")).all()
    assert ((rows[:, :99] >= 0x20) & (rows[:, :99] < 0x7F)).all()  # no TAB, no newline
    assert len({bytes(r[12:44]) for r in rows}) == 1000  # ordinals make records unique
    assert not bench.ensure_sort_corpus(tmp_path, 100_050, 3, seed=3).generated
    other = bench.ensure_sort_corpus(tmp_path / "o", 100_050, 3, seed=3)
    assert b"".join(p.read_bytes() for p in other.paths) == data
    skewed = bench.ensure_sort_corpus(tmp_path, 100_000, 2, seed=3, skew=0.5)
    keys = [bytes(r[:10]) for p in skewed.paths
            for r in np.frombuffer(p.read_bytes(), np.uint8).reshape(-1, 100)]
    assert len(set(keys)) < 600  # half the records share 4 keys


def test_parse_size() -> None:
    assert bench.parse_size("1GiB") == 2**30
    assert bench.parse_size("2MB") == 2_000_000
    assert bench.parse_size("512") == 512


def test_every_peer_validates_on_a_tiny_corpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peers = ["kubemr"]
    if shutil.which("sort"):
        peers.append("gnu-sort")
    peers += [p for p in ("duckdb", "polars") if importlib.util.find_spec(p)]
    status = bench.main(["--sizes", "200kB", "--files", "2", "--reducers", "3",
                         "--skew", "0.3", "--only", ",".join(peers),
                         "--duckdb-memory", "64MB", "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0, out
    for peer in peers:
        assert f"| {peer} " in out
    assert "FAIL" not in out and "ERROR" not in out
    # Every process is reported by name: kubemr's parent and each worker.
    kubemr_line = next(ln for ln in out.splitlines() if "kubemr processes" in ln)
    assert "kubemr run" in kubemr_line and kubemr_line.count("kubemr worker") == 2
