"""Address watchlists: GraphSense TagPacks and plain lists → one address index, matched with Arrow.

A watchlist folder holds ``watchlists.yaml`` (the manifest: name, file, format, optional category per
list) and the files it names. Formats:

* ``tagpack``: GraphSense TagPack YAML (header fields ``abuse``/``category``/``currency``/``label`` and a
  ``tags:`` list of ``{address, label?, category?, abuse?, currency?}``); non-BTC tags are skipped;
* ``lines``: one address per line (``#`` comments and blank lines ignored);
* ``json``: a JSON list of addresses.

A tag's category is, first match: the manifest's ``category``, the tag's ``abuse``, the tag's
``category``, the pack's ``abuse``, the pack's ``category``, ``unknown``.

Matching: the inputs' and outputs' addresses of a batch are flattened and tested with
``pyarrow.compute.is_in`` against the listed addresses (large batches) or with dict lookups (small ones,
where building is_in's hash set would dominate); only the (rare) hits become Python objects.
The index is built once per process and folder (``load_watchlist`` caches on the files' mtimes).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

log = logging.getLogger(__name__)

MANIFEST = "watchlists.yaml"
SET_LOOKUP_MAX = 20_000  # addresses per batch side below which matching uses Python dict lookups

# One hit as stored in scored_transactions.watchlist_hits (a list of these structs per transaction).
HIT_TYPE = pa.struct(
    [
        pa.field("list", pa.string()),
        pa.field("category", pa.string()),
        pa.field("address", pa.string()),
        pa.field("label", pa.string()),
        pa.field("side", pa.string()),  # "input" (the tx spends from it) or "output" (the tx pays it)
    ]
)


@dataclass(frozen=True, slots=True)
class Entry:
    list: str
    category: str
    label: str | None = None


@dataclass
class Watchlist:
    """Listed addresses → the lists (entries) that name them."""

    entries: dict[str, list[Entry]] = field(default_factory=dict)
    lists: dict[str, int] = field(default_factory=dict)  # list name → addresses it contributed
    _values: pa.Array | None = field(default=None, repr=False)

    def add(self, address: str, entry: Entry) -> None:
        address = address.strip()
        if not address:
            return
        bucket = self.entries.setdefault(address, [])
        if entry not in bucket:
            bucket.append(entry)
            self.lists[entry.list] = self.lists.get(entry.list, 0) + 1
        self._values = None

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, address: str) -> list[Entry]:
        return self.entries.get(address, [])

    @property
    def values(self) -> pa.Array:
        if self._values is None:
            self._values = pa.array(sorted(self.entries), pa.string())
        return self._values

    def match(self, inputs: pa.ListArray, outputs: pa.ListArray) -> list[list[dict[str, Any]]]:
        """Per row, the hits among its input and output addresses (``HIT_TYPE`` dicts), inputs first.

        An address listed by several lists gives one hit per list; an address that occurs several
        times on the same side of a transaction gives one hit.
        """
        n = len(inputs)
        empty: list[dict[str, Any]] = []
        out: list[list[dict[str, Any]]] = [empty] * n
        if not self.entries or n == 0:
            return out
        for side, lists in (("input", inputs), ("output", outputs)):
            flat = lists.flatten().field("address")
            if not len(flat):
                continue
            if len(flat) < SET_LOOKUP_MAX:
                # is_in builds a hash set of all listed addresses on every call (~5 ms for 21k): for a few
                # addresses a dict lookup per address is far cheaper.
                entries = self.entries
                idx = np.flatnonzero(np.fromiter((a in entries for a in flat.to_pylist()), bool, len(flat)))
            else:
                mask = pc.fill_null(pc.is_in(flat, value_set=self.values), False)
                idx = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            if not len(idx):
                continue
            parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)[idx]
            addresses = flat.take(pa.array(idx)).to_pylist()
            for row, address in zip(parents.tolist(), addresses, strict=True):
                hits = out[row] if out[row] is not empty else []
                for e in self.entries[address]:
                    hit = {
                        "list": e.list,
                        "category": e.category,
                        "address": address,
                        "label": e.label,
                        "side": side,
                    }
                    if hit not in hits:
                        hits.append(hit)
                out[row] = hits
        return out


# --- loading ----------------------------------------------------------------------------------------------


def _category(*candidates: Any) -> str:
    for c in candidates:
        if c:
            return str(c).strip().lower().replace(" ", "_")
    return "unknown"


def load_tagpack(path: Path, name: str, category: str | None = None) -> Iterable[tuple[str, Entry]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader is ~10x faster on the big packs
    with path.open(encoding="utf-8") as fh:
        doc = yaml.load(fh, Loader=loader) or {}
    pack_currency = str(doc.get("currency") or "BTC").upper()
    for tag in doc.get("tags") or []:
        address = tag.get("address")
        if not address or str(tag.get("currency") or pack_currency).upper() != "BTC":
            continue
        cat = _category(
            category, tag.get("abuse"), tag.get("category"), doc.get("abuse"), doc.get("category")
        )
        label = tag.get("label") or doc.get("label") or doc.get("title")
        yield str(address), Entry(name, cat, None if label is None else str(label))


def load_lines(path: Path, name: str, category: str | None = None) -> Iterable[tuple[str, Entry]]:
    entry = Entry(name, _category(category))
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            yield line, entry


def load_json(path: Path, name: str, category: str | None = None) -> Iterable[tuple[str, Entry]]:
    entry = Entry(name, _category(category))
    for address in json.loads(path.read_text(encoding="utf-8")):
        yield str(address), entry


LOADERS = {"tagpack": load_tagpack, "lines": load_lines, "json": load_json}


def build_watchlist(folder: Path) -> Watchlist:
    """Read the manifest of ``folder`` and every list it names."""
    wl = Watchlist()
    manifest = folder / MANIFEST
    if not manifest.is_file():
        log.warning("no %s in %s: watchlists are empty", MANIFEST, folder)
        return wl
    spec = yaml.safe_load(manifest.read_text(encoding="utf-8")) or {}
    for item in spec.get("lists") or []:
        fmt = item.get("format", "tagpack")
        if fmt not in LOADERS:
            raise ValueError(f"{manifest}: list {item.get('name')!r} has unknown format {fmt!r}")
        path = folder / item["file"]
        for address, entry in LOADERS[fmt](path, item["name"], item.get("category")):
            wl.add(address, entry)
    log.info("watchlists: %d addresses from %d lists in %s", len(wl), len(wl.lists), folder)
    return wl


_cache: dict[str, tuple[tuple[tuple[str, float], ...], Watchlist, float]] = {}
_lock = threading.Lock()
RECHECK_S = 30.0  # how often a cached folder's files are stat'ed again (cheap, but not per transaction)


def _fingerprint(folder: Path) -> tuple[tuple[str, float], ...]:
    if not folder.is_dir():
        return ()
    return tuple(sorted((str(p), p.stat().st_mtime) for p in folder.rglob("*") if p.is_file()))


def load_watchlist(folder: str | Path | None) -> Watchlist:
    """The watchlist of ``folder`` (cached per process until a file in it changes); empty for None."""
    if folder is None or str(folder) == "":
        return Watchlist()
    folder = Path(folder)
    key = str(folder)
    now = time.monotonic()
    with _lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[2] < RECHECK_S:
            return hit[1]
        fp = _fingerprint(folder)
        if hit is not None and hit[0] == fp:
            _cache[key] = (fp, hit[1], now)
            return hit[1]
        wl = build_watchlist(folder) if fp else Watchlist()
        _cache[key] = (fp, wl, now)
        return wl


def hit_lists(hits: Sequence[dict[str, Any]]) -> list[str]:
    """Distinct list names of a row's hits, in order."""
    return list(dict.fromkeys(h["list"] for h in hits))
