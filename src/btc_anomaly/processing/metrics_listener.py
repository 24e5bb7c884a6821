"""Streaming query progress → Prometheus (metric objects in monitoring/metrics.py, ``btc_stream_*``).

Spark calls the listener on its own event thread after every micro-batch (and on idle triggers), so
the exported values cost the stream nothing. Kafka lag comes from the Kafka source's progress metrics
(``maxOffsetsBehindLatest`` ...: latest offsets known at planning time minus the batch's end offsets).
What only the batch writer knows — rows quarantined — it counts itself (stream.py), into the same
registry.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from pyspark.sql.streaming import StreamingQueryListener

from btc_anomaly.monitoring import metrics as m

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_LAG_KEYS = {
    "max": "maxOffsetsBehindLatest",
    "avg": "avgOffsetsBehindLatest",
    "min": "minOffsetsBehindLatest",
}


def _unix(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class PrometheusListener(StreamingQueryListener):
    def onQueryStarted(self, event: Any) -> None:
        m.STREAM_QUERY_ACTIVE.labels(query=event.name or str(event.id)).set(1)

    def onQueryProgress(self, event: Any) -> None:
        try:
            self._progress(event.progress)
        except Exception:  # a metrics bug must never fail the stream; Spark would only log it anyway
            log.exception("exporting streaming progress failed")

    def onQueryIdle(self, event: Any) -> None:
        m.STREAM_LAST_BATCH.labels(query=self._names.get(str(event.id), str(event.id))).set(time.time())

    def onQueryTerminated(self, event: Any) -> None:
        name = self._names.get(str(event.id), str(event.id))
        m.STREAM_QUERY_ACTIVE.labels(query=name).set(0)
        if event.exception:
            m.STREAM_QUERY_FAILURES.labels(query=name).inc()

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[str, str] = {}

    def _progress(self, p: Any) -> None:
        name = p.name or str(p.id)
        self._names[str(p.id)] = name
        rows = int(p.numInputRows or 0)
        m.STREAM_INPUT_ROWS.labels(query=name).inc(rows)
        m.STREAM_BATCH_INPUT_ROWS.labels(query=name).set(rows)
        m.STREAM_INPUT_ROWS_PER_SECOND.labels(query=name).set(float(p.inputRowsPerSecond or 0.0))
        m.STREAM_PROCESSED_ROWS_PER_SECOND.labels(query=name).set(float(p.processedRowsPerSecond or 0.0))
        m.STREAM_BATCH_DURATION.labels(query=name).observe(p.batchDuration / 1000.0)
        m.STREAM_LAST_BATCH.labels(query=name).set(_unix(p.timestamp) + p.batchDuration / 1000.0)
        for source in p.sources:
            metrics = source.metrics or {}
            for stat, key in _LAG_KEYS.items():
                if key in metrics:
                    m.STREAM_KAFKA_LAG.labels(stat=stat).set(float(metrics[key]))
        for op in p.stateOperators:
            m.STREAM_STATE_ROWS.labels(query=name).set(op.numRowsTotal)
            m.STREAM_LATE_ROWS.labels(query=name).inc(op.numRowsDroppedByWatermark)


def install_listener(spark: SparkSession, port: int) -> PrometheusListener:
    """Register the listener; serve /metrics on ``port`` unless it is 0."""
    listener = PrometheusListener()
    spark.streams.addListener(listener)
    if port:
        from btc_anomaly.monitoring.exposition import serve_metrics

        # The stream's families and the notifier's (the scoring query notifies anomalies).
        serve_metrics(port, "btc_stream_", "btc_notifier_")
        log.info("stream metrics on :%d/metrics", port)
    return listener
