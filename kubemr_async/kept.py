"""What a worker keeps of small shuffle objects between its reduces. Pure: no I/O.

Every reduce of a job reads its slice of every map's shuffle object: M x R reads, each
needing the slice's index entry first. When maps are many and their objects small (2,000
maps x 500 reducers of a few KiB each), those requests, not the bytes, are the cost. A
worker that reads a small object (or a small object's index) whole keeps it for its next
reduces: one read per map per *worker* instead of one or two per map per *reduce*.

What is kept is compact: every index entry is checked once, on the way in, and only the
entries of non-empty slices are kept (of a tiny map's 500 partitions, most are empty),
with the object's blocks when it was read whole. Kept objects are held within a byte
share of the budget, and a full share admits nothing more and evicts nothing: every
reduce reads the maps in the same order, and under such a scan eviction finds nothing
(dropping the oldest to make room drops exactly the one the next reduce reads first),
while keeping the first ones saves their reads in every later reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import shuffle

__all__ = ["KeptObject", "KeptObjects"]

#: A kept entry's cost beyond its slice's bytes: the dict slot and the SliceEntry tuple.
_ENTRY_COST = 128
#: The entry of a slice that holds nothing (an empty partition of a kept object).
_EMPTY = shuffle.SliceEntry(0, 0, 0, 0)


@dataclass(frozen=True)
class KeptObject:
    """A small shuffle object as kept: its non-empty slices' checked index entries, and
    its bytes up to the index (``blocks``) when it was read whole, else None."""

    entries: dict[int, shuffle.SliceEntry]
    blocks: bytes | None

    def entry(self, partition: int) -> shuffle.SliceEntry:
        return self.entries.get(partition, _EMPTY)

    @property
    def nbytes(self) -> int:
        return len(self.blocks or b"") + _ENTRY_COST * len(self.entries)


class KeptObjects:
    """The kept objects of one worker, within ``limit`` bytes (module docstring)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.nbytes = 0
        self._objects: dict[str, KeptObject] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, key: str) -> KeptObject | None:
        return self._objects.get(key)

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more would still fit the share."""
        return self.nbytes + nbytes <= self.limit

    def keep(self, key: str, index: bytes, partitions: int, size: int,
             blocks: bytes | None = None) -> KeptObject | None:
        """Check every entry of ``index`` (an object's whole index; ``size`` is the
        object's) and keep the object if it fits; the kept object, or None if it did not
        fit. A damaged entry raises :class:`~kubemr_async.shuffle.CorruptRunError`."""
        if not self.has_room(len(blocks or b"")):
            return None  # not worth checking every entry of what cannot be kept
        entries = {}
        width = shuffle.SLICE_ENTRY.size
        for partition in range(partitions):
            found = shuffle.decode_entry(index[partition * width:(partition + 1) * width],
                                         partition, size)
            if found.length:
                entries[partition] = found
        kept = KeptObject(entries, blocks)
        if not self.has_room(kept.nbytes):
            return None
        self._objects[key] = kept
        self.nbytes += kept.nbytes
        return kept
