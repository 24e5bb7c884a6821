"""Bounded "already published?" memory for the producer.

The key is ``(hash, unconfirmed)``: a transaction first seen in the mempool and later seen in a block
(``block_height`` now set) is a different key, so the confirmation is published again and downstream
MERGE-by-hash can update ``block_height``. Re-sightings of the same state are skipped.

This only deduplicates within one process run and within ``capacity`` keys (least recently seen are
forgotten first); the Delta MERGE by hash downstream is the real guarantee of no duplicates.
"""

from __future__ import annotations

from collections import OrderedDict

DedupKey = tuple[str, bool]


class Dedup:
    __slots__ = ("_keys", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("dedup capacity must be >= 1")
        self.capacity = capacity
        self._keys: OrderedDict[DedupKey, None] = OrderedDict()

    @staticmethod
    def key(tx_hash: str, block_height: int | None) -> DedupKey:
        return (tx_hash, block_height is None)

    def seen(self, key: DedupKey) -> bool:
        """True if ``key`` was already recorded (refreshing it), else record it and return False."""
        keys = self._keys
        if key in keys:
            keys.move_to_end(key)
            return True
        keys[key] = None
        if len(keys) > self.capacity:
            keys.popitem(last=False)
        return False

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
