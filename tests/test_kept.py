"""A worker's kept shuffle objects: compact, checked once, and never evicted by a scan."""

from __future__ import annotations

import zlib

import pytest

from kubemr_async import shuffle
from kubemr_async.kept import KeptObjects

PARTITIONS = 500


def small_object(filled: dict[int, bytes]) -> tuple[bytes, bytes, int]:
    """A shuffle object of ``PARTITIONS`` slices, only ``filled`` ones holding bytes:
    (its blocks, its index, its size)."""
    blocks, entries = b"", []
    for partition in range(PARTITIONS):
        data = filled.get(partition, b"")
        entries.append(shuffle.SliceEntry(len(blocks), len(data), len(data),
                                          zlib.crc32(data) if data else 0))
        blocks += data
    index = shuffle.encode_index(entries, len(blocks))
    return blocks, index[:PARTITIONS * shuffle.SLICE_ENTRY.size], len(blocks) + len(index)


def test_a_kept_object_holds_only_its_non_empty_entries_and_its_blocks() -> None:
    blocks, index, size = small_object({3: b"abc", 400: b"defgh"})
    kept = KeptObjects(1 << 20)
    held = kept.keep("map/1", index, PARTITIONS, size, blocks=blocks)
    assert held is not None and kept.get("map/1") is held
    assert sorted(held.entries) == [3, 400]
    assert held.entry(400) == shuffle.SliceEntry(3, 5, 5, zlib.crc32(b"defgh"))
    assert held.entry(7).length == 0
    assert held.blocks == b"abcdefgh"
    assert kept.nbytes == held.nbytes < len(index)  # far less than the 16 KB index


def test_a_full_share_keeps_what_it_holds_and_admits_nothing_more() -> None:
    blocks, index, size = small_object({0: bytes(1000)})
    kept = KeptObjects(3 * 1000 + 500)
    results = [kept.keep(f"map/{i}", index, PARTITIONS, size, blocks=blocks)
               for i in range(6)]
    assert [r is not None for r in results] == [True, True, True, False, False, False]
    assert [kept.get(f"map/{i}") is not None for i in range(6)] == [True] * 3 + [False] * 3
    assert len(kept) == 3


def test_a_damaged_entry_of_any_partition_is_refused() -> None:
    blocks, index, size = small_object({5: b"xyz"})
    damaged = bytearray(index)
    damaged[100 * shuffle.SLICE_ENTRY.size] ^= 1  # an empty partition's entry
    with pytest.raises(shuffle.CorruptRunError, match="partition 100"):
        KeptObjects(1 << 20).keep("map/1", bytes(damaged), PARTITIONS, size, blocks=blocks)
