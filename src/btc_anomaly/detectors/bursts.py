"""Coordinated bursts: clusters of structurally similar high fan-in / fan-out transactions close in time.

Candidates are transactions with at least ``FAN_MIN`` (10) inputs or outputs: *fan-out* when the outputs
are at least as many as the inputs, else *fan-in* (the same thresholds as ``tx_stats``'s fan-in/out
counts). Two candidates of the same kind are linked when their ``first_seen`` are at most ``window_s``
apart (default 60 s) and either

* they are structurally similar: the dominant count (outputs for fan-out, inputs for fan-in) within a
  factor ``COUNT_RATIO`` (1.25) and the output value within a factor ``VALUE_RATIO`` (2), or
* they share an address (an input or output address of both: the same funding wallet or recipient).

A burst is a connected group of at least ``min_size`` linked candidates (union-find, so a burst can
slide beyond one window while its members keep arriving). Its id is derived from its kind and its
earliest member, so the same burst found again (next poll, after a restart, with more members) keeps
its id and is updated rather than duplicated. The *representative* is the member closest to the
burst's median (dominant count, log value).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

from btc_anomaly.processing.tables import coordinated_bursts_schema

FAN_MIN = 10
COUNT_RATIO = 1.25
VALUE_RATIO = 2.0
MAX_SHARED = 10
READ_COLUMNS = ["hash", "first_seen", "input_count", "output_count", "output_value", "inputs", "outputs"]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return int(i)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _addresses(ios: Any) -> set[str]:
    if ios is None:
        return set()
    return {io["address"] for io in ios if io is not None and io.get("address")}


def detect_bursts(
    txs: pd.DataFrame,
    *,
    window_s: float = 60.0,
    min_size: int = 3,
    detected_at: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Bursts among ``txs`` (``READ_COLUMNS``), one row per burst with ``coordinated_bursts_schema()`` columns."""
    detected_at = detected_at if detected_at is not None else pd.Timestamp.now(tz="UTC")
    empty = coordinated_bursts_schema().empty_table().to_pandas()
    if txs.empty:
        return empty
    n_in = txs["input_count"].to_numpy(dtype=np.int64)
    n_out = txs["output_count"].to_numpy(dtype=np.int64)
    candidate = (n_in >= FAN_MIN) | (n_out >= FAN_MIN)
    if candidate.sum() < min_size:
        return empty
    cand = txs.loc[candidate].copy()
    cand["first_seen"] = pd.to_datetime(cand["first_seen"], utc=True)
    cand = (
        cand.sort_values(["first_seen", "hash"], kind="stable").drop_duplicates("hash").reset_index(drop=True)
    )
    cand["kind"] = np.where(cand["output_count"] >= cand["input_count"], "fan_out", "fan_in")
    rows: list[dict[str, Any]] = []
    for kind, group in cand.groupby("kind", sort=True):
        if len(group) >= min_size:
            rows.extend(
                _bursts_of_kind(str(kind), group.reset_index(drop=True), window_s, min_size, detected_at)
            )
    if not rows:
        return empty
    return pd.DataFrame(rows, columns=coordinated_bursts_schema().names).sort_values(
        ["window_start", "burst_id"], ignore_index=True
    )


def _bursts_of_kind(
    kind: str, g: pd.DataFrame, window_s: float, min_size: int, detected_at: pd.Timestamp
) -> Iterable[dict[str, Any]]:
    n = len(g)
    t = (g["first_seen"] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    dominant = (g["output_count"] if kind == "fan_out" else g["input_count"]).to_numpy(dtype=np.float64)
    value = np.maximum(g["output_value"].to_numpy(dtype=np.float64), 1.0)
    uf = _UnionFind(n)

    # Structural similarity within the window: for each row, the later rows up to window_s after it.
    ends = np.searchsorted(t, t + window_s, side="right")
    for i in range(n):
        j = np.arange(i + 1, ends[i])
        if not len(j):
            continue
        similar = (
            np.maximum(dominant[j], dominant[i]) <= COUNT_RATIO * np.minimum(dominant[j], dominant[i])
        ) & (np.maximum(value[j], value[i]) <= VALUE_RATIO * np.minimum(value[j], value[i]))
        for k in j[similar]:
            uf.union(i, int(k))

    # Shared addresses: consecutive users of one address, close enough in time.
    addresses = [_addresses(a) | _addresses(b) for a, b in zip(g["inputs"], g["outputs"], strict=True)]
    users: dict[str, list[int]] = defaultdict(list)
    for i, addrs in enumerate(addresses):
        for a in addrs:
            users[a].append(i)
    for idx in users.values():
        for a, b in pairwise(idx):
            if t[b] - t[a] <= window_s:
                uf.union(a, b)

    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[uf.find(i)].append(i)
    for members in groups.values():
        if len(members) < min_size:
            continue
        yield _event(kind, g, members, addresses, dominant, value, window_s, detected_at)


def _event(
    kind: str,
    g: pd.DataFrame,
    members: list[int],
    addresses: list[set[str]],
    dominant: np.ndarray,
    value: np.ndarray,
    window_s: float,
    detected_at: pd.Timestamp,
) -> dict[str, Any]:
    m = np.asarray(members)  # already in time order (g is sorted)
    hashes = g["hash"].to_numpy(dtype=object)[m].tolist()
    center = np.array([np.median(dominant[m]), np.median(np.log(value[m]))])
    dist = np.abs(dominant[m] - center[0]) / max(center[0], 1.0) + np.abs(np.log(value[m]) - center[1])
    representative = hashes[int(np.argmin(dist))]
    counts: dict[str, int] = defaultdict(int)
    for i in members:
        for a in addresses[i]:
            counts[a] += 1
    shared = sorted((a for a, c in counts.items() if c >= 2), key=lambda a: (-counts[a], a))[:MAX_SHARED]
    avg_in = float(g["input_count"].to_numpy()[m].mean())
    avg_out = float(g["output_count"].to_numpy()[m].mean())
    start, end = g["first_seen"].iloc[m[0]], g["first_seen"].iloc[m[-1]]
    what = "outputs" if kind == "fan_out" else "inputs"
    reason = (
        f"{len(members)} {kind.replace('_', '-')} transactions within {(end - start).total_seconds():.0f} s "
        f"(avg {avg_out if kind == 'fan_out' else avg_in:.0f} {what}), linked by similar {what} counts and "
        f"values (x{COUNT_RATIO:g} / x{VALUE_RATIO:g}) or shared addresses ({len(shared)} shared) within "
        f"{window_s:g} s of each other"
    )
    return {
        "burst_id": hashlib.sha256(f"{kind}:{hashes[0]}".encode()).hexdigest()[:32],
        "kind": kind,
        "window_start": start,
        "window_end": end,
        "size": len(members),
        "member_hashes": hashes,
        "representative_hash": representative,
        "avg_inputs": avg_in,
        "avg_outputs": avg_out,
        "total_value": int(g["output_value"].to_numpy()[m].sum()),
        "shared_addresses": shared,
        "reason": reason,
        "detected_at": detected_at,
    }
