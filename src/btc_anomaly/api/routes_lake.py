"""GET /anomalies and GET /transactions/{hash}: what the stream scored, from the ``scored_transactions`` table.

No ``from __future__ import annotations`` here: the ``limit`` bound comes from Settings inside ``router()``,
and FastAPI can only evaluate such an annotation when it is a real object.
"""

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from btc_anomaly.api.context import context
from btc_anomaly.api.errors import ApiError, json_response
from btc_anomaly.api.lake import LakeUnavailable
from btc_anomaly.api.schemas import AnomalyPage, ErrorDetail, ScoredRow
from btc_anomaly.config import Settings

HASH_PATTERN = r"^[0-9a-fA-F]{64}$"


def router(settings: Settings) -> APIRouter:
    r = APIRouter(tags=["lake"])

    # Plain `def`: Delta reads block, so FastAPI runs these in its thread pool.
    @r.get(
        "/anomalies",
        response_model=AnomalyPage,
        responses={503: {"model": ErrorDetail, "description": "The lake cannot be read."}},
        summary="Scored anomalies, highest score first",
        description="Transactions the stream flagged (`is_anomaly`), newest scoring per transaction, with "
        "`first_seen` in [since, until) (UTC when no offset is given) and `anomaly_score >= min_score`, "
        "ordered by score descending (then hash). An empty list while the stream has not written the table yet.",
    )
    def anomalies(
        request: Request,
        since: Annotated[dt.datetime | None, Query(description="first_seen lower bound (inclusive).")] = None,
        until: Annotated[dt.datetime | None, Query(description="first_seen upper bound (exclusive).")] = None,
        min_score: Annotated[float, Query(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0,
        limit: Annotated[int, Query(ge=1, le=settings.api_anomalies_max_limit)] = 100,
    ) -> Response:
        lake = context(request).lake
        try:
            items = lake.anomalies(since, until, min_score, limit)
        except LakeUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        return json_response({"count": len(items), "items": items, "table": str(lake.path)})

    @r.get(
        "/transactions/{tx_hash}",
        response_model=ScoredRow,
        responses={
            404: {"model": ErrorDetail, "description": "Not in the scored table."},
            503: {"model": ErrorDetail, "description": "The lake cannot be read."},
        },
        summary="The latest scoring of one transaction",
        description="The newest `scored_transactions` row of the transaction (`scorings` counts all of its rows). "
        "The hash is 64 hex digits (case-insensitive), else 422.",
    )
    def transaction(
        request: Request,
        tx_hash: Annotated[str, Path(pattern=HASH_PATTERN, description="Transaction id, 64 hex digits.")],
    ) -> Response:
        lake = context(request).lake
        try:
            row = lake.transaction(tx_hash.lower())
        except LakeUnavailable as exc:
            raise ApiError(503, str(exc)) from None
        if row is None:
            raise ApiError(404, f"transaction {tx_hash.lower()} has not been scored")
        return json_response(row)

    return r
