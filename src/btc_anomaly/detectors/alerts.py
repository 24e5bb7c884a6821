"""Alert texts for the detect service: one message per severe transaction, flagged window or burst.

Messages go through the project's rate-limited webhook notifier (``monitoring/notifier.py``,
``notify_text``), so a storm of findings never floods the channel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from btc_anomaly.detectors import windows


def _link(tx_hash: str, explorer_url: str) -> str:
    short = f"{tx_hash[:16]}…"
    return f"<{explorer_url.replace('{hash}', tx_hash)}|{short}>" if explorer_url else f"`{short}`"


def risky_transaction(row: Mapping[str, Any], explorer_url: str) -> str:
    """What fired for one scored transaction, and why."""
    lines = [
        f":rotating_light: *btc-anomaly*: {row['severity']} transaction {_link(str(row['hash']), explorer_url)} "
        f"risk *{float(row['risk_score']):.1f}*/100 (anomaly score {float(row['anomaly_score']):.3f}, "
        f"model v{row.get('model_version', '?')})"
    ]
    for hit in _seq(row.get("watchlist_hits")):
        verb = "spends from" if hit.get("side") == "input" else "pays"
        label = f" ({hit['label']})" if hit.get("label") else ""
        lines.append(
            f"• watchlist {hit['list']}: {verb} {hit['address']}, listed as {hit['category']}{label}"
        )
    if rules := _seq(row.get("rule_hits")):
        lines.append("• rules: " + ", ".join(str(r) for r in rules))
    mahal = row.get("mahalanobis")
    if mahal is not None and mahal == mahal:
        lines.append(f"• Mahalanobis distance {float(mahal):.1f} from the training mean")
    for reason in _seq(row.get("reasons"))[:3]:
        lines.append(f"• forest: {reason}")
    return "\n".join(lines)


def flagged_window(rows: Sequence[Mapping[str, Any]]) -> str:
    """All flagged metrics of one window in one message."""
    start = rows[0]["window_start"]
    head = f":chart_with_upwards_trend: *btc-anomaly*: unusual 1-minute window starting {start:%Y-%m-%d %H:%M} UTC"
    return "\n".join([head, *(f"• {windows.describe(dict(r))}" for r in rows)])


def burst(row: Mapping[str, Any], explorer_url: str) -> str:
    return (
        f":busts_in_silhouette: *btc-anomaly*: coordinated {str(row['kind']).replace('_', '-')} burst of "
        f"{int(row['size'])} transactions, {row['window_start']:%Y-%m-%d %H:%M:%S} to "
        f"{row['window_end']:%H:%M:%S} UTC, {int(row['total_value']) / 1e8:,.8f} BTC\n"
        f"• {row['reason']}\n• representative {_link(str(row['representative_hash']), explorer_url)}"
    )


def _seq(value: Any) -> list[Any]:
    return [] if value is None else list(value)
