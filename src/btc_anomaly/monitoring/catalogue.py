"""The metrics catalogue: every metric object of ``monitoring/metrics.py``, read back from the objects.

The README table (``btc-anomaly metrics --markdown``) and the checks that dashboards and alert rules only
query metrics that exist both come from here, so neither can drift from the code that exports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase

from btc_anomaly.monitoring import metrics

# Sample names prometheus-client exposes per metric type, besides the family name itself (counters
# also get `_created`, which nothing queries).
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "enum": ("",),
}
# Series Prometheus itself writes for every target and rule; dashboards and alerts may use them.
PROMETHEUS_SYNTHETIC = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
        "ALERTS",
        "ALERTS_FOR_STATE",
    }
)


@dataclass(frozen=True)
class MetricDoc:
    name: str  # family name as registered (counters without _total)
    type: str
    labels: tuple[str, ...]
    help: str
    constant: str  # the Python name in metrics.py

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names a PromQL query uses for this metric."""
        return tuple(self.name + s for s in _SUFFIXES.get(self.type, ("",)))

    @property
    def query_name(self) -> str:
        """The name shown in the catalogue: what one queries (counters with ``_total``)."""
        return self.name + "_total" if self.type == "counter" else self.name


def catalogue() -> list[MetricDoc]:
    """Every metric defined in ``monitoring/metrics.py``, in definition order."""
    docs: list[MetricDoc] = []
    for constant, obj in vars(metrics).items():
        if not isinstance(obj, MetricWrapperBase):
            continue
        docs.append(
            MetricDoc(
                name=obj._name,
                type=obj._type,
                labels=tuple(obj._labelnames),
                help=obj._documentation,
                constant=constant,
            )
        )
    return docs


def sample_names() -> frozenset[str]:
    """Every series name the project exports, plus Prometheus' own per-target series."""
    names = {n for doc in catalogue() for n in doc.sample_names}
    return frozenset(names | PROMETHEUS_SYNTHETIC)


def service_of(name: str) -> str | None:
    """``btc_<service>_...`` → service (producer, stream, trainer, api, dashboard, notifier)."""
    parts = name.split("_")
    return parts[1] if len(parts) > 2 and parts[0] == "btc" else None


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (README): one row per metric, grouped by service prefix."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for doc in catalogue():
        labels = ", ".join(f"`{label}`" for label in doc.labels) or "—"
        text = doc.help.replace("|", "\\|")
        rows.append(f"| `{doc.query_name}` | {doc.type} | {labels} | {text} |")
    return "\n".join(rows)


def catalogue_text() -> str:
    """One line per metric: name, type, labels (for a terminal)."""
    docs = catalogue()
    width = max(len(d.query_name) for d in docs)
    return "\n".join(f"{d.query_name:<{width}}  {d.type:<9}  {','.join(d.labels) or '-'}" for d in docs)
