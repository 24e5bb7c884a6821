"""Alertmanager webhook → Slack-compatible webhook, through the rate-limited notifier.

Alertmanager's ``webhook_configs`` posts its own JSON (version 4), which Slack does not accept. `btc-anomaly
alert-relay` listens on ``Settings.alert_relay_port`` and turns each notification (one per alert group)
into one chat message, sent by the same ``Notifier`` as anomaly notifications, so one rate limit covers
both. ``monitoring/alertmanager/alertmanager.yml`` points its receiver here.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from btc_anomaly.monitoring.notifier import Notifier

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_ALERTS_LISTED = 10


def format_alerts(payload: dict[str, Any]) -> str:
    """One chat message for one Alertmanager notification (Slack mrkdwn)."""
    alerts = payload.get("alerts") or []
    status = str(payload.get("status", "firing")).upper()
    common = payload.get("commonLabels") or {}
    name = common.get("alertname") or ", ".join(
        sorted({a.get("labels", {}).get("alertname", "?") for a in alerts})
    )
    icon = ":white_check_mark:" if status == "RESOLVED" else ":fire:"
    lines = [f"{icon} *[{status}:{len(alerts)}] {name}*"]
    for alert in alerts[:MAX_ALERTS_LISTED]:
        ann = alert.get("annotations") or {}
        labels = alert.get("labels") or {}
        extra = {k: v for k, v in labels.items() if k not in common}
        where = f" ({', '.join(f'{k}={v}' for k, v in sorted(extra.items()))})" if extra else ""
        state = "" if str(alert.get("status", "")).upper() == status else f"[{alert.get('status')}] "
        lines.append(f"• {state}{ann.get('summary') or labels.get('alertname', '?')}{where}")
        if ann.get("description") and status != "RESOLVED":
            lines.append(f"  {ann['description']}")
    if len(alerts) > MAX_ALERTS_LISTED:
        lines.append(f"… and {len(alerts) - MAX_ALERTS_LISTED} more")
    if payload.get("externalURL"):
        lines.append(f"<{payload['externalURL']}|Alertmanager>")
    return "\n".join(lines)


def make_server(notifier: Notifier, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = self.path in ("/-/healthy", "/-/ready", "/health")
            self._reply(200 if ok else 404, b"ok\n" if ok else b"not found\n")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._reply(413 if length > MAX_BODY else 400, b"bad body\n")
                return
            try:
                payload = json.loads(self.rfile.read(length))
                text = format_alerts(payload)
            except (ValueError, AttributeError, TypeError) as exc:
                self._reply(400, f"not an Alertmanager webhook body: {exc}\n".encode())
                return
            # Accepted even when the notifier queue is full: Alertmanager would only resend the same group.
            notifier.notify_text(text, kind="alert")
            self._reply(200, b"queued\n")

        def _reply(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)
