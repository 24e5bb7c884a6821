"""GET /anomalies, /transactions/{hash}, /addresses/{address} and /rules: what the stream scored and why.

Reads ``scored_transactions`` (and ``transactions`` for addresses) JVM-free through ``lake.py``.

No ``from __future__ import annotations`` here: the ``limit`` bound comes from Settings inside ``router()``,
and FastAPI can only evaluate such an annotation when it is a real object.
"""

import datetime as dt
import logging
import pathlib
import threading
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from btc_anomaly.api import inference
from btc_anomaly.api import risk as api_risk
from btc_anomaly.api.context import context
from btc_anomaly.api.errors import ApiError, BodyValidationError, json_response
from btc_anomaly.api.lake import LakeUnavailable, Window, WindowTooWide
from btc_anomaly.api.schemas import AddressReport, AnomalyPage, ErrorDetail, ScoredRow, Severity
from btc_anomaly.config import Settings
from btc_anomaly.detectors import rules as detector_rules
from btc_anomaly.detectors.watchlist import load_watchlist
from btc_anomaly.model.context import fee_market

log = logging.getLogger(__name__)

HASH_PATTERN = r"^[0-9a-fA-F]{64}$"
# Base58 (legacy, P2SH) and bech32/bech32m addresses: letters and digits only, bounded length.
ADDRESS_PATTERN = r"^[a-zA-Z0-9]{14,100}$"


_WINDOW_DOC = (
    " The range read is bounded: without `since` it is the last `api_lake_window_h` hours up to the newest "
    "row; a range wider than `api_lake_max_window_h` hours is a 422."
)


def _unavailable(exc: LakeUnavailable) -> ApiError:
    """A 503 that says what failed, never where or the reader's own words (paths, log entries): those go
    to the API log."""
    log.warning("lake read failed: %s", exc)
    return ApiError(503, "the Delta lake cannot be read right now (details in the API log)")


def _window(
    request: Request,
    table: pathlib.Path,
    since: dt.datetime | None,
    until: dt.datetime | None,
    default: dt.timedelta | None = None,
) -> Window:
    """The request's bounded [since, until) (lake.ScoredTable.window); too wide is a 422 on `since`."""
    try:
        return context(request).lake.window(table, since, until, default)
    except WindowTooWide as exc:
        raise BodyValidationError(
            [{"type": "window_too_wide", "loc": ["query", "since"], "msg": str(exc)}]
        ) from None


def router(settings: Settings) -> APIRouter:
    r = APIRouter(tags=["lake"])
    api_risk.configure(settings)  # the detectors /predict runs read the watchlists of these Settings
    # /predict reads fee rates against the lake's current fee market, refreshed off the request path.
    inference.set_market(fee_market(settings).start())
    # Parsing the watchlists takes about a second: do it now, off the request path, rather than in the
    # first /predict or /addresses request (load_watchlist caches it for the process).
    threading.Thread(
        target=load_watchlist, args=(settings.watchlist_dir,), name="watchlist-warmup", daemon=True
    ).start()

    # Plain `def`: Delta reads block, so FastAPI runs these in its thread pool.
    @r.get(
        "/anomalies",
        response_model=AnomalyPage,
        responses={
            422: {"description": "Invalid parameters, or a [since, until) wider than api_lake_max_window_h."},
            503: {"model": ErrorDetail, "description": "The lake cannot be read."},
        },
        summary="Scored anomalies, highest score first",
        description="Transactions the stream flagged (`is_anomaly`), newest scoring per transaction, with "
        "`first_seen` in [since, until) (UTC when no offset is given) and `anomaly_score >= min_score`, "
        "ordered by score descending (then hash). With `severity`, `rule` or `watchlist`, every transaction "
        "matching them (flagged by the forest or not) ordered by `risk_score` instead. An empty list while the "
        "stream has not written the table yet." + _WINDOW_DOC,
    )
    def anomalies(
        request: Request,
        since: Annotated[dt.datetime | None, Query(description="first_seen lower bound (inclusive).")] = None,
        until: Annotated[dt.datetime | None, Query(description="first_seen upper bound (exclusive).")] = None,
        min_score: Annotated[float, Query(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=settings.api_anomalies_max_limit)] = 100,
        severity: Annotated[
            list[Severity] | None, Query(description="Only these severities (repeat for several).")
        ] = None,
        rule: Annotated[
            str | None, Query(max_length=64, description="Only transactions this rule fired on (GET /rules).")
        ] = None,
        watchlist: Annotated[
            str | None, Query(max_length=64, description="Only transactions that hit this watchlist.")
        ] = None,
    ) -> Response:
        lake = context(request).lake
        try:
            window = _window(request, lake.path, since, until)
            items = lake.anomalies(
                window, min_score, limit, severity=severity, rule=rule, watchlist=watchlist
            )
        except LakeUnavailable as exc:
            raise _unavailable(exc) from None
        return json_response({"count": len(items), "items": items, "window": window.jsonable()})

    @r.get(
        "/transactions/{tx_hash}",
        response_model=ScoredRow,
        responses={
            404: {"model": ErrorDetail, "description": "Not in the scored table."},
            503: {"model": ErrorDetail, "description": "The lake cannot be read."},
        },
        summary="The latest scoring of one transaction",
        description="The newest `scored_transactions` row of the transaction (`scorings` counts all of its rows). "
        "The hash is 64 hex digits (case-insensitive), else 422. Searched among the transactions first seen "
        "in [since, until): by default the last `api_lake_max_window_h` hours up to the newest row; wider is "
        "a 422.",
    )
    def transaction(
        request: Request,
        tx_hash: Annotated[str, Path(pattern=HASH_PATTERN, description="Transaction id, 64 hex digits.")],
        since: Annotated[dt.datetime | None, Query(description="first_seen lower bound (inclusive).")] = None,
        until: Annotated[dt.datetime | None, Query(description="first_seen upper bound (exclusive).")] = None,
    ) -> Response:
        lake = context(request).lake
        try:
            window = _window(request, lake.path, since, until, lake.max_window)
            row = lake.transaction(tx_hash.lower(), window)
        except LakeUnavailable as exc:
            raise _unavailable(exc) from None
        if row is None:
            w = window.jsonable()
            raise ApiError(
                404,
                f"transaction {tx_hash.lower()} was not scored among the transactions first seen in "
                f"[{w['since']}, {w['until']}); pass since/until to search another range",
            )
        return json_response(row)

    @r.get(
        "/addresses/{address}",
        response_model=AddressReport,
        responses={503: {"model": ErrorDetail, "description": "The lake cannot be read."}},
        summary="An address's transactions, watchlist entries and highest risk",
        description="Transactions of the `transactions` table that spend from or pay the address (first_seen in "
        "[since, until)), newest first, each with its latest scoring (risk score, severity, rule and watchlist "
        "hits) from `scored_transactions`; the watchlists that name the address; the highest-risk transaction."
        + _WINDOW_DOC,
    )
    def address(
        request: Request,
        address: Annotated[str, Path(pattern=ADDRESS_PATTERN, description="A Bitcoin address.")],
        since: Annotated[dt.datetime | None, Query(description="first_seen lower bound (inclusive).")] = None,
        until: Annotated[dt.datetime | None, Query(description="first_seen upper bound (exclusive).")] = None,
        limit: Annotated[int, Query(ge=1, le=settings.api_anomalies_max_limit)] = 100,
    ) -> Response:
        lake = context(request).lake
        try:
            window = _window(request, lake.transactions_path, since, until)
            report = lake.address(address, window, limit)
        except LakeUnavailable as exc:
            raise _unavailable(exc) from None
        return json_response(report)

    @r.get("/rules", summary="The detector rules and the loaded watchlists")
    def rules_catalogue() -> Response:
        wl = load_watchlist(settings.watchlist_dir)
        return json_response({"rules": detector_rules.describe(), "watchlists": wl.lists})

    return r
