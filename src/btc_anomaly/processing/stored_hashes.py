"""Which transactions the ``transactions`` table already holds: the transactions query's own index.

Why. Asking Delta "is this hash stored?" is what an insert-only MERGE does, and it cost ~1 s of every
1 s micro-batch here (Delta rebuilds its snapshot state, anti-joins the batch with the partitions in
scope, then appends): the stream fell behind its trigger and missed the latency goal (bench/RESULTS.md,
Stream). The stream is the only writer of ``transactions``, so it can know the answer itself:

* a query run loads the index from the table before its first batch — the only batch Spark may replay
  after a crash, and the table then already holds whatever that batch had committed;
* every batch adds the hashes it stored, once its writes are committed.

Keys are Spark's 64-bit ``xxhash64`` of the tx hash (computed in the JVM, 8 bytes a tx). Two hashes
can share a key, so a hit only says "maybe stored": the rows hit go through the exact MERGE. A miss is
certain for the dates covered, so the rows missed are appended — no MERGE, no duplicate.

Scope, as the MERGE's: only stored rows of a date from the batch's ``since`` on count (sinks.py,
``Settings.stream_dedup_lookback_days``). The index holds every stored row of a date from
``covered_from`` on, loads older dates when a batch reaches further back, and forgets dates a lookback
before the batch's scope — two lookback spans, so a batch a little older than the last one does not
reload (memory: 12 bytes per stored tx, ~290 MB for 2 x 30 days of mainnet at ~400k transactions a day).

Layout: sorted runs of (key, date), merged while a run is no longer than half the previous one (up to
``MAX_MERGED_RUN`` keys), so a lookup is a binary search in a few dozen runs at most and a batch's insert
costs an amortized O(log n) per key. A key appears at most once per run, with the newest date it was
stored under: that is the one a ``date >= since`` check needs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# Runs stop merging at this size: sorting a run costs ~0.1 s per million keys, paid by the batch that
# trips the merge, so a month of mainnet in one run would stall one batch for seconds.
MAX_MERGED_RUN = 1 << 22

Keys = npt.NDArray[np.int64]
Days = npt.NDArray[np.int32]  # days since 1970-01-01 (Arrow date32)


def _newest_per_key(keys: Keys, days: Days) -> tuple[Keys, Days]:
    """Sorted by key, one entry per key with its newest date."""
    order = np.lexsort((days, keys))
    keys, days = keys[order], days[order]
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    return keys[last], days[last]


class StoredHashes:
    def __init__(self) -> None:
        self._runs: list[tuple[Keys, Days]] = []
        self.covered_from: int | None = None  # every stored row of a date >= this is indexed
        self._pending: tuple[Keys, Days] | None = None  # the current batch's rows, until committed

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self._runs)

    def to_load(self, since: int) -> tuple[int, int | None] | None:
        """Dates [start, end) to load from the table before looking up from ``since`` (end None: no
        bound); None when they are indexed already."""
        if self.covered_from is not None and since >= self.covered_from:
            return None
        return since, self.covered_from

    def loaded(self, keys: Keys, days: Days, since: int) -> None:
        """Add the stored rows of the range ``to_load(since)`` gave; the index now covers ``since`` on."""
        self.add(keys, days)
        self.covered_from = since

    def add(self, keys: Keys, days: Days) -> None:
        if not len(keys):
            return
        self._runs.append(_newest_per_key(np.asarray(keys, np.int64), np.asarray(days, np.int32)))
        while (
            len(self._runs) > 1
            and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0])
            and len(self._runs[-2][0]) + len(self._runs[-1][0]) <= MAX_MERGED_RUN
        ):
            k2, d2 = self._runs.pop()
            k1, d1 = self._runs.pop()
            self._runs.append(_newest_per_key(np.concatenate((k1, k2)), np.concatenate((d1, d2))))

    def stage(self, keys: Keys, days: Days) -> None:
        """The current batch's rows: indexed by ``commit`` once every write of the batch succeeded (a
        batch that fails is replayed by a new query run, which reloads the index from the table)."""
        self._pending = (keys, days)

    def commit(self) -> None:
        if self._pending is not None:
            self.add(*self._pending)
            self._pending = None

    def contains(self, keys: Keys, since: int) -> npt.NDArray[np.bool_]:
        """Per key: may a row of this key be stored under a date >= ``since``? (False is certain when
        ``since`` is covered.)"""
        keys = np.asarray(keys, np.int64)
        hit = np.zeros(len(keys), dtype=bool)
        if not len(keys) or not self._runs:
            return hit
        order = np.argsort(keys)  # sorted probes: a cache-friendly binary search
        probes = keys[order]
        found = np.zeros(len(keys), dtype=bool)
        for run_keys, run_days in self._runs:
            at = np.minimum(np.searchsorted(run_keys, probes), len(run_keys) - 1)
            found |= (run_keys[at] == probes) & (run_days[at] >= since)
        hit[order] = found
        return hit

    def forget_before(self, day: int) -> None:
        """Drop rows dated before ``day`` (bounded memory); a later batch reaching back reloads them."""
        if self.covered_from is None or day <= self.covered_from:
            return
        runs = []
        for keys, days in self._runs:
            keep = days >= day
            if keep.any():
                runs.append((keys[keep], days[keep]))
        self._runs = runs
        self.covered_from = day
