"""Deduplication of the transactions stream in Spark's state store, ahead of the batch writes.

Every parsed Kafka record becomes one or two rows with a *role* and a dedup key, and
``dropDuplicatesWithinWatermark`` lets through the first row of each key (RocksDB state, see
spark_session; watermark on the Kafka timestamp, ``Settings.stream_dedup_lookback_days`` behind):

* ``insert`` (every valid record, key = hash): the first copy of a transaction, confirmed or not —
  appended to ``transactions`` as it is; every later copy (retry, replay, restart) is dropped here;
* ``confirm`` (valid records with a ``block_height``, key = hash + ``:confirmed``): the first
  confirmed copy — it sets ``block_height`` on the stored row when that was stored unconfirmed;
  only the columns that update needs are kept (the inputs/outputs arrays are the bulk of a row);
* ``quarantine`` (invalid records, key = the Kafka position): every one reaches the quarantine.

So an unconfirmed copy after a confirmed one is dropped (its hash key is taken) while a confirmed
copy after an unconfirmed one still confirms it (its own key is new) — the two things a single key
per record cannot express, and the reason a confirmed record has two rows.

Why here and not a MERGE per batch: a MERGE (or any anti-join against the table) scans the stored
hashes of the lookback window on every trigger — ~0.9 s of a 1 s trigger on this machine for ten
rows (bench/RESULTS.md) — while the state store answers from its own index. The trade-offs:

* the window is counted in *publish* time (the Kafka timestamp, which only moves forward): a copy
  published more than the lookback after the first is stored again, and a record published more
  than the lookback before the newest one already read counts as late and is dropped by Spark;
* a change of the key or of the watermark needs a new checkpoint (the state is part of it);
* within one micro-batch, which of two copies of a hash goes through is Spark's choice (the first to
  reach the operator): copies that differ in more than ``block_height`` keep either one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from btc_anomaly.processing.parse import is_valid

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

ROLE = "role"
INSERT = "insert"
CONFIRM = "confirm"
QUARANTINE = "quarantine"
DEDUP_KEY = "dedup_key"
# Not needed by a confirm row; dropping them keeps the shuffle in front of the state store small.
_WIDE_COLUMNS = ("inputs", "outputs", "key", "value")


def dedup_stream(parsed: DataFrame, lookback_days: int) -> DataFrame:
    """``parse.parse`` rows → the rows to write, each with its ``role`` (see the module docstring).

    ``lookback_days`` = 0 keeps every key forever (exact, but the state grows without bound)."""
    from pyspark.sql import functions as F

    valid = is_valid()
    roles = (
        F.when(~valid, F.array(F.lit(QUARANTINE)))
        .when(F.col("block_height").isNotNull(), F.array(F.lit(INSERT), F.lit(CONFIRM)))
        .otherwise(F.array(F.lit(INSERT)))
    )
    rows = parsed.select("*", F.explode(roles).alias(ROLE))
    role = F.col(ROLE)
    key = (
        F.when(role == QUARANTINE, F.concat_ws(":", F.lit("q"), "topic", "partition", "offset"))
        .when(role == CONFIRM, F.concat(F.col("hash"), F.lit(":confirmed")))
        .otherwise(F.col("hash"))
    )
    rows = rows.select(
        *[
            F.when(role != CONFIRM, F.col(c)).alias(c) if c in _WIDE_COLUMNS else F.col(c)
            for c in parsed.columns
        ],
        role,
        key.alias(DEDUP_KEY),
    )
    if lookback_days <= 0:
        return rows.dropDuplicates([DEDUP_KEY])
    return rows.withWatermark("timestamp", f"{lookback_days} days").dropDuplicatesWithinWatermark([DEDUP_KEY])
