"""What sources hand to the producer besides :class:`~btc_anomaly.schema.Transaction`.

* :class:`Encoded` — a transaction already serialized as canonical JSON (the replay hot path re-uses
  bytes instead of building a pydantic object per message).
* :class:`Failure` — a record that could not become a transaction; it goes to the dead-letter topic.
"""

from __future__ import annotations

from dataclasses import dataclass

from btc_anomaly.schema import Source, Transaction


@dataclass(slots=True)
class Encoded:
    hash: str
    unconfirmed: bool  # block_height is None; part of the dedup key
    value: bytes  # canonical JSON, as Transaction.to_json_bytes() would give
    source: Source
    partition: int | None = None  # precomputed murmur2 partition, or None to let the producer compute it


@dataclass(slots=True)
class Failure:
    raw: bytes | str | None
    reason: str
    source: str


Item = Transaction | Encoded | Failure
