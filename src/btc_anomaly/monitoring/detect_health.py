"""``btc-anomaly detect --healthcheck``: is the local detect service polling successfully?

Read from the service's own metrics endpoint (``Settings.detect_metrics_port``), so the check needs no
access to the lake and imports nothing heavy (it runs every 30 s as the compose healthcheck).
"""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from btc_anomaly.config import Settings
from btc_anomaly.monitoring import metrics as m


def healthcheck(settings: Settings, timeout_s: float = 5.0) -> tuple[bool, str]:
    """(healthy, why) of the local `btc-anomaly detect`, read from its own metrics endpoint.

    Healthy when the endpoint answers and the last poll with no failed stage (or the start of the poll loop)
    is at most ``detect_healthcheck_max_age_s`` old: a detect whose polls keep failing is unhealthy even
    though its process runs.
    """
    port = settings.detect_metrics_port
    if not port:
        return False, "BTC_ANOMALY_DETECT_METRICS_PORT is 0: no metrics endpoint to check"
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return False, f"{url} does not answer: {exc}"
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }
    last = values.get(m.DETECT_LAST_SUCCESS._name)
    if not last:
        return False, f"{url} has no {m.DETECT_LAST_SUCCESS._name} yet (poll loop not started)"
    age = time.time() - last
    failed = int(values.get(m.DETECT_CONSECUTIVE_FAILURES._name, 0))
    if age > settings.detect_healthcheck_max_age_s:
        return False, (
            f"no successful poll for {age:.0f} s (limit {settings.detect_healthcheck_max_age_s:.0f} s), "
            f"{failed} failed polls in a row"
        )
    return True, f"last successful poll {age:.0f} s ago, {failed} failed polls in a row"
