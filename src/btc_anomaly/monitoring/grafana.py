"""The Grafana dashboards of ``grafana/dashboards/``, built from compact panel lists.

``python -m btc_anomaly.monitoring.grafana`` rewrites the three JSON files; a test checks the committed
files equal this module's output, so edit here, not in the JSON. Every panel and target uses the
provisioned Prometheus datasource (uid ``btc-prometheus``, ``grafana/provisioning/datasources``); every
query uses metrics of ``monitoring/metrics.py`` (checked by a test, and run against a real Prometheus by
the observability integration test).

Queries that count rare events (DLQ, 5xx, ...) end in ``or vector(0)`` so a quiet system draws 0 rather
than "No data", which would look like a broken exporter. The detect panels do too: whether detect is
scraped at all is the "Metrics endpoints" panel's job, and "Since the last successful detect poll" then
counts from 1970 (red) rather than showing nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btc_anomaly.config import PROJECT_ROOT

DATASOURCE_UID = "btc-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
DASHBOARDS_DIR = PROJECT_ROOT / "grafana" / "dashboards"
SCHEMA_VERSION = 39  # Grafana 10.4 / 11.x; newer versions migrate it on load
RI = "$__rate_interval"
JOBS = "producer|stream|trainer|detect|api|dashboard"


@dataclass
class Q:
    expr: str
    legend: str = ""
    fmt: str = "time_series"  # or "heatmap" for histogram buckets
    instant: bool = False


@dataclass
class P:
    title: str
    queries: list[Q]
    kind: str = "timeseries"
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str


UP_MAPPINGS = [
    {
        "type": "value",
        "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}},
    }
]
PASS_MAPPINGS = [
    {
        "type": "value",
        "options": {"0": {"text": "FAIL", "color": "red"}, "1": {"text": "PASS", "color": "green"}},
    }
]


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def _panel(p: P, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, q in enumerate(p.queries):
        t: dict[str, Any] = {
            "refId": chr(ord("A") + i),
            "datasource": DATASOURCE,
            "expr": q.expr,
            "legendFormat": q.legend or "__auto",
            "format": q.fmt,
            "range": not q.instant,
            "instant": q.instant,
        }
        targets.append(t)
    defaults: dict[str, Any] = {"unit": p.unit, **p.defaults}
    options: dict[str, Any]
    if p.kind == "timeseries":
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        defaults.setdefault("custom", {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"})
    elif p.kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
        }
    elif p.kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "gradient",
        }
    elif p.kind == "heatmap":
        options = {
            "calculate": False,
            "yAxis": {"unit": p.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5},
            "tooltip": {"show": True, "yHistogram": True},
        }
    else:
        options = {}
    options.update(p.options)
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }


def dashboard(uid: str, title: str, description: str, items: list[P | Row]) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    x = y = 0
    row_height = 0
    pid = 1
    for item in items:
        if isinstance(item, Row):
            if x:
                y += row_height
            x, row_height = 0, 0
            panels.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": item.title,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            y += 1
        else:
            if x + item.width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel(item, pid, x, y))
            x += item.width
            row_height = max(row_height, item.height)
        pid += 1
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["btc-anomaly"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "templating": {"list": []},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "links": [
            {
                "type": "dashboards",
                "tags": ["btc-anomaly"],
                "asDropdown": False,
                "title": "btc-anomaly",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


def _zero(expr: str) -> str:
    return f"{expr} or vector(0)"


def _zero_age(gauge: str) -> str:
    """Seconds since a "last time" gauge; from 1970 when no series exists (nothing scraped)."""
    return f"time() - (max({gauge}) or vector(0))"


# --- Pipeline: ingest → Kafka → stream → Delta ----------------------------------------------------------

PIPELINE = [
    Row("Services"),
    P(
        "Metrics endpoints",
        [Q(f'max by (job) (up{{job=~"{JOBS}"}})', "{{job}}")],
        kind="stat",
        width=24,
        height=4,
        description="1 = Prometheus scrapes the service. Alert BtcTargetDown after 2 minutes down.",
        defaults={"mappings": UP_MAPPINGS, "thresholds": _thresholds((None, "red"), (1, "green"))},
    ),
    Row("Ingest: Blockchain.com → producer → Kafka"),
    P(
        "Since the last Kafka acknowledgement",
        [Q("time() - max(btc_producer_last_publish_timestamp_seconds)", "seconds")],
        kind="stat",
        unit="s",
        width=6,
        description="Alert BtcProducerStalled above 5 minutes.",
        defaults={"thresholds": _thresholds((None, "green"), (60, "orange"), (300, "red"))},
    ),
    P(
        "Transactions fetched and published (tx/s)",
        [
            Q(f"sum(rate(btc_producer_published_total[{RI}]))", "published (acks=all)"),
            Q(f"sum by (source) (rate(btc_producer_fetched_total[{RI}]))", "fetched from {{source}}"),
        ],
        unit="ops",
        width=10,
    ),
    P(
        "Source connection",
        [
            Q("max(btc_producer_ws_connected)", "WebSocket connected"),
            Q("max(btc_producer_rest_fallback_active)", "REST fallback active"),
        ],
        kind="stat",
        width=8,
        defaults={"thresholds": _thresholds((None, "text"))},
    ),
    P(
        "Duplicates, dead letters, re-sends (/s)",
        [
            Q(f"sum(rate(btc_producer_duplicates_skipped_total[{RI}]))", "duplicates skipped"),
            Q(_zero(f"sum(rate(btc_producer_dlq_total[{RI}]))"), "to DLQ"),
            Q(f"sum(rate(btc_producer_requeued_total[{RI}]))", "re-queued sends"),
            Q(f"sum(rate(btc_producer_kafka_client_resets_total[{RI}]))", "Kafka client resets"),
        ],
        unit="ops",
        width=12,
    ),
    P(
        "Producer errors by kind (/s)",
        [Q(f"sum by (kind) (rate(btc_producer_errors_total[{RI}]))", "{{kind}}")],
        unit="ops",
        width=12,
    ),
    P(
        "Producer queues (items waiting)",
        [Q("max by (queue) (btc_producer_queue_depth)", "{{queue}}")],
        width=12,
        description="The source and WebSocket queues are bounded by producer_source_queue_max; a full ws queue "
        "drops pushes (alert BtcProducerDroppingRecords).",
    ),
    Row("Kafka → Spark stream"),
    P(
        "Kafka lag (records behind latest)",
        [Q("max by (stat) (btc_stream_kafka_offsets_behind_latest)", "{{stat}} over partitions")],
        width=8,
        description="Alert BtcStreamLagGrowing: above 1000 and growing for 10 minutes.",
    ),
    P(
        "Arrival vs processing rate (rows/s)",
        [
            Q("sum by (query) (btc_stream_input_rows_per_second)", "arriving {{query}}"),
            Q("sum by (query) (btc_stream_processed_rows_per_second)", "processed {{query}}"),
        ],
        unit="ops",
        width=8,
    ),
    P(
        "Micro-batch duration",
        [
            Q(
                f"histogram_quantile(0.5, sum by (le, query) (rate(btc_stream_batch_duration_seconds_bucket[{RI}])))",
                "p50 {{query}}",
            ),
            Q(
                f"histogram_quantile(0.95, sum by (le, query) (rate(btc_stream_batch_duration_seconds_bucket[{RI}])))",
                "p95 {{query}}",
            ),
        ],
        unit="s",
        width=8,
    ),
    P(
        "Since the last micro-batch",
        [Q("time() - max by (query) (btc_stream_last_batch_timestamp_seconds)", "{{query}}")],
        kind="stat",
        unit="s",
        width=8,
        height=5,
        description="Alert BtcStreamStalled above 5 minutes for the transactions query.",
        defaults={"thresholds": _thresholds((None, "green"), (60, "orange"), (300, "red"))},
    ),
    P(
        "Streaming queries",
        [Q("max by (query) (btc_stream_query_active)", "{{query}}")],
        kind="stat",
        width=8,
        height=5,
        defaults={"mappings": UP_MAPPINGS, "thresholds": _thresholds((None, "red"), (1, "green"))},
    ),
    P(
        "Query failures (1h)",
        [Q(_zero("sum(increase(btc_stream_query_failures_total[1h]))"), "failures")],
        kind="stat",
        width=8,
        height=5,
        defaults={"thresholds": _thresholds((None, "green"), (1, "red"))},
    ),
    Row("Delta Lake"),
    P(
        "Rows into Delta (rows/s)",
        [Q(f"sum by (query) (rate(btc_stream_input_rows_total[{RI}]))", "{{query}}")],
        unit="ops",
        width=8,
        description="transactions: Kafka records read into lake/transactions; tx_stats: change-feed rows "
        "aggregated into tx_stats_1m / tx_stats_5m.",
    ),
    P(
        "Quarantined share",
        [
            Q(
                f"sum(rate(btc_stream_quarantined_rows_total[{RI}])) "
                f'/ sum(rate(btc_stream_input_rows_total{{query="transactions"}}[{RI}]))',
                "quarantined / read",
            )
        ],
        unit="percentunit",
        width=8,
        description="Records that failed validation (lake/quarantine). Alert BtcQuarantineRateHigh above 1 %.",
    ),
    P(
        "Window state and late rows",
        [
            Q("sum by (query) (btc_stream_state_rows)", "state rows {{query}}"),
            Q(f"sum by (query) (rate(btc_stream_late_rows_dropped_total[{RI}]))", "late rows/s {{query}}"),
        ],
        width=8,
    ),
]

# --- Detectors: `btc-anomaly detect` over the lake ----------------------------------------------------

DETECT = [
    Row("Detectors (btc-anomaly detect): window anomalies, coordinated bursts, risk alerts"),
    P(
        "Since the last successful detect poll",
        [Q(_zero_age("btc_detect_last_success_timestamp_seconds"), "seconds")],
        kind="stat",
        unit="s",
        width=6,
        description="A poll succeeds when its three stages (windows, bursts, risky) all do; the clock starts "
        "with the poll loop. Alert BtcDetectStalled above 5 minutes; `btc-anomaly detect --healthcheck` "
        "(compose) fails above BTC_ANOMALY_DETECT_HEALTHCHECK_MAX_AGE_S.",
        defaults={"thresholds": _thresholds((None, "green"), (60, "orange"), (300, "red"))},
    ),
    P(
        "Detect poll duration",
        [
            Q(
                _zero(
                    f"histogram_quantile({q}, sum by (le) (rate(btc_detect_poll_duration_seconds_bucket[{RI}])))"
                ),
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.95)
        ],
        unit="s",
        width=9,
        description="Read the lake, run the detectors, upsert, queue the alerts; one poll every "
        "BTC_ANOMALY_DETECT_POLL_S (10 s).",
    ),
    P(
        "Detect poll failures by stage (/s)",
        [Q(_zero(f"sum by (stage) (rate(btc_detect_poll_failures_total[{RI}]))"), "{{stage}}")],
        unit="ops",
        width=9,
        description="A failing stage is retried at the next poll while the other stages go on; its traceback "
        "is in the detect log.",
    ),
    P(
        "Lake rows read by detect (rows/s)",
        [Q(_zero(f"sum by (table) (rate(btc_detect_rows_read_total[{RI}]))"), "{{table}}")],
        unit="ops",
        width=8,
    ),
    P(
        "Findings written (1h)",
        [
            Q(
                _zero("sum by (table, op) (increase(btc_detect_rows_written_total[1h]))"),
                "{{table}} {{op}}",
                instant=True,
            )
        ],
        kind="bargauge",
        width=8,
        description="Rows upserted into window_anomalies and coordinated_bursts (update: a burst that grew).",
    ),
    P(
        "Detect alerts sent to the webhook (1h)",
        [Q(_zero("sum by (kind) (increase(btc_detect_alerts_total[1h]))"), "{{kind}}", instant=True)],
        kind="bargauge",
        width=8,
        description="One per flagged window, new burst and risky transaction, before the notifier's rate "
        "limit (btc_notifier_*).",
    ),
]

# --- Model & predictions -------------------------------------------------------------------------------

# The live share is the stream's: it scores every transaction, API clients choose what they send.
LIVE_RATE = (
    '(sum by (model_kind) (rate(btc_stream_predictions_total{{label="anomaly"}}[{w}])) '
    "or sum by (model_kind) (rate(btc_stream_predictions_total[{w}])) * 0) "
    "/ sum by (model_kind) (rate(btc_stream_predictions_total[{w}]))"
)

MODEL = [
    Row("Champion"),
    P(
        "Champion version (registry)",
        [Q("max(btc_trainer_champion_version)", "champion")],
        kind="stat",
        width=4,
        height=5,
        defaults={"thresholds": _thresholds((None, "red"), (1, "blue"))},
    ),
    P(
        "Version served by the API",
        [Q("max by (version, alias) (btc_api_model_info) == 1", "v{{version}} ({{alias}})", instant=True)],
        kind="stat",
        width=5,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
        options={"textMode": "name"},
    ),
    P(
        "Champion trained",
        [Q("time() - max(btc_trainer_champion_created_timestamp_seconds)", "ago")],
        kind="stat",
        unit="s",
        width=5,
        height=5,
        description="Alert BtcChampionStale above 24 hours.",
        defaults={"thresholds": _thresholds((None, "green"), (43200, "orange"), (86400, "red"))},
    ),
    P(
        "Champion promoted",
        [Q("time() - max(btc_trainer_champion_promoted_timestamp_seconds)", "ago")],
        kind="stat",
        unit="s",
        width=5,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "API model loaded",
        [Q("time() - max(btc_api_model_loaded_timestamp_seconds)", "ago")],
        kind="stat",
        unit="s",
        width=5,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    Row("Predictions"),
    P(
        "Anomaly rate: live vs champion's training window",
        [
            Q(LIVE_RATE.format(w="15m"), "live {{model_kind}} (15m)"),
            Q("max by (model_kind) (btc_trainer_champion_training_anomaly_rate)", "training {{model_kind}}"),
        ],
        unit="percentunit",
        width=12,
        height=9,
        description="Alert BtcAnomalyRateDrift when the hourly live share is more than 3x above or below the "
        "training share (with at least 2000 predictions per hour).",
    ),
    P(
        "Transactions scored by label and forest (/s)",
        [
            Q(
                f"sum by (label, model_kind) (rate(btc_stream_predictions_total[{RI}]))",
                "stream {{label}} {{model_kind}}",
            ),
            Q(
                f"sum by (label, model_kind) (rate(btc_api_predictions_total[{RI}]))",
                "api {{label}} {{model_kind}}",
            ),
        ],
        unit="ops",
        width=12,
        height=9,
    ),
    P(
        "Anomaly score distribution over time",
        [Q(f"sum by (le) (increase(btc_api_anomaly_score_bucket[{RI}]))", "{{le}}", fmt="heatmap")],
        kind="heatmap",
        width=12,
        height=9,
    ),
    P(
        "Anomaly score distribution, last hour",
        [
            Q(
                "sum by (le) (increase(btc_api_anomaly_score_bucket[1h]))",
                "{{le}}",
                fmt="heatmap",
                instant=True,
            )
        ],
        kind="bargauge",
        width=12,
        height=9,
    ),
    Row("Training and promotion gate"),
    P(
        "Training rows (last run)",
        [Q("max by (model_kind) (btc_trainer_training_rows)", "{{model_kind}}")],
        kind="stat",
        width=6,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "Challenger's training anomaly rate",
        [Q("max by (model_kind) (btc_trainer_training_anomaly_rate)", "{{model_kind}}")],
        kind="stat",
        unit="percentunit",
        width=6,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "Gate checks (last decision)",
        [Q("max by (check) (btc_trainer_gate_check_passed)", "{{check}}")],
        kind="stat",
        width=12,
        height=5,
        defaults={"mappings": PASS_MAPPINGS, "thresholds": _thresholds((None, "red"), (1, "green"))},
    ),
    P(
        "Promotion decisions (24h)",
        [
            Q(
                "sum by (outcome) (increase(btc_trainer_promotion_decisions_total[24h]))",
                "{{outcome}}",
                instant=True,
            )
        ],
        kind="bargauge",
        width=8,
    ),
    P(
        "Training runs (24h)",
        [
            Q("sum by (result) (increase(btc_trainer_runs_total[24h]))", "{{result}}"),
            Q("max(btc_trainer_consecutive_failures)", "failing in a row"),
        ],
        kind="stat",
        width=8,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "Last training run",
        [
            Q("max(btc_trainer_last_run_duration_seconds)", "duration"),
            Q("time() - max(btc_trainer_last_success_timestamp_seconds)", "finished ago"),
        ],
        kind="stat",
        unit="s",
        width=8,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    Row("Anomaly notifications (webhook)"),
    P(
        "Messages sent, summarised, dropped (/s)",
        [
            Q(f"sum by (kind) (rate(btc_notifier_messages_total[{RI}]))", "sent {{kind}}"),
            Q(f"sum(rate(btc_notifier_summarised_total[{RI}]))", "folded into summaries"),
            Q(f"sum by (reason) (rate(btc_notifier_dropped_total[{RI}]))", "dropped {{reason}}"),
        ],
        unit="ops",
        width=12,
    ),
    P(
        "Webhook failures by reason (/s)",
        [Q(f"sum by (reason) (rate(btc_notifier_failures_total[{RI}]))", "{{reason}}")],
        unit="ops",
        width=12,
        description="Alert BtcNotifierFailing above 5 failures in 15 minutes.",
    ),
]

# --- API -----------------------------------------------------------------------------------------------

PREDICT = 'route=~"/predict.*"'
NOT_METRICS = 'route!="/metrics"'

API = [
    Row("Traffic"),
    P(
        "Requests/s",
        [Q(f"sum(rate(btc_api_requests_total{{{NOT_METRICS}}}[{RI}]))", "requests/s")],
        kind="stat",
        unit="reqps",
        width=6,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "Transactions scored/s",
        [Q(f"sum(rate(btc_api_predictions_total[{RI}]))", "tx/s")],
        kind="stat",
        unit="ops",
        width=6,
        height=5,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "5xx share",
        [
            Q(
                f'(sum(rate(btc_api_requests_total{{status=~"5.."}}[{RI}])) or vector(0)) '
                f"/ sum(rate(btc_api_requests_total{{{NOT_METRICS}}}[{RI}]))",
                "5xx",
            )
        ],
        kind="stat",
        unit="percentunit",
        width=6,
        height=5,
        description="Alert BtcApiErrorRateHigh above 5 % over 5 minutes (at least 20 requests).",
        defaults={"thresholds": _thresholds((None, "green"), (0.01, "orange"), (0.05, "red"))},
    ),
    P(
        "p99 /predict*",
        [
            Q(
                f"histogram_quantile(0.99, sum by (le) (rate(btc_api_request_duration_seconds_bucket{{{PREDICT}}}[{RI}])))",
                "p99",
            )
        ],
        kind="stat",
        unit="s",
        width=6,
        height=5,
        description="Alert BtcApiLatencyHigh above 1 s for 10 minutes (per route).",
        defaults={"thresholds": _thresholds((None, "green"), (0.25, "orange"), (1, "red"))},
    ),
    P(
        "Requests by route and status (/s)",
        [
            Q(
                f"sum by (route, status) (rate(btc_api_requests_total{{{NOT_METRICS}}}[{RI}]))",
                "{{route}} {{status}}",
            )
        ],
        unit="reqps",
        width=12,
        height=9,
    ),
    P(
        "Client and server errors (/s)",
        [
            Q(_zero(f'sum(rate(btc_api_requests_total{{status=~"4.."}}[{RI}]))'), "4xx"),
            Q(_zero(f'sum(rate(btc_api_requests_total{{status=~"5.."}}[{RI}]))'), "5xx"),
        ],
        unit="reqps",
        width=12,
        height=9,
    ),
    Row("Latency"),
    P(
        "Latency percentiles of /predict*",
        [
            Q(
                f"histogram_quantile({q}, sum by (le) (rate(btc_api_request_duration_seconds_bucket{{{PREDICT}}}[{RI}])))",
                f"p{round(q * 100)}",
            )
            for q in (0.5, 0.9, 0.99)
        ],
        unit="s",
        width=12,
        height=9,
    ),
    P(
        "p99 by route",
        [
            Q(
                f"histogram_quantile(0.99, sum by (le, route) (rate(btc_api_request_duration_seconds_bucket{{{NOT_METRICS}}}[{RI}])))",
                "{{route}}",
            )
        ],
        unit="s",
        width=12,
        height=9,
    ),
    Row("Model and lookups"),
    P(
        "Model reloads (1h)",
        [Q("sum by (result) (increase(btc_api_model_reloads_total[1h]))", "{{result}}")],
        kind="stat",
        width=8,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
    P(
        "/predict/raw items (/s)",
        [
            Q(_zero(f'sum(rate(btc_api_raw_items_total{{result="scored"}}[{RI}]))'), "scored"),
            Q(_zero(f'sum(rate(btc_api_raw_items_total{{result="invalid"}}[{RI}]))'), "invalid"),
        ],
        unit="ops",
        width=8,
    ),
    P(
        "Prevout lookups by result (/s)",
        [Q(f"sum by (result) (rate(btc_api_prevout_lookups_total[{RI}]))", "{{result}}")],
        unit="ops",
        width=8,
    ),
    Row("Dash dashboard (:8050)"),
    P(
        "Callback p95 by callback",
        [
            Q(
                "histogram_quantile(0.95, sum by (le, callback) "
                f"(rate(btc_dashboard_callback_duration_seconds_bucket[{RI}])))",
                "{{callback}}",
            )
        ],
        unit="s",
        width=8,
    ),
    P(
        "Callback errors (/s)",
        [Q(f"sum by (callback) (rate(btc_dashboard_callback_errors_total[{RI}]))", "{{callback}}")],
        unit="ops",
        width=8,
    ),
    P(
        "Cache and registry",
        [
            Q("sum by (table) (btc_dashboard_cached_rows)", "cached rows {{table}}"),
            Q("max(btc_dashboard_mlflow_up)", "MLflow reachable"),
        ],
        kind="stat",
        width=8,
        defaults={"thresholds": _thresholds((None, "blue"))},
    ),
]


def build() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON object."""
    return {
        "pipeline.json": dashboard(
            "btc-pipeline",
            "btc-anomaly · Pipeline",
            "Ingest → Kafka → Spark stream → Delta → detectors: throughput, lag, errors, freshness.",
            PIPELINE + DETECT,
        ),
        "model.json": dashboard(
            "btc-model",
            "btc-anomaly · Model & predictions",
            "Champion, live anomaly rate against its training rate, score distribution, training and gate.",
            MODEL,
        ),
        "api.json": dashboard(
            "btc-api",
            "btc-anomaly · API",
            "Prediction API traffic, latency percentiles, errors; the Dash dashboard's own health.",
            API,
        ),
    }


def render(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write(folder: Path = DASHBOARDS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, obj in build().items():
        path = folder / name
        path.write_text(render(obj))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write():
        print(p)
