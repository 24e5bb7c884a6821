"""What every route needs, built once per worker by ``create_app``: settings, model holder, lake, prevouts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from btc_anomaly.api.batcher import Coalescer
from btc_anomaly.api.body import BodyParser
from btc_anomaly.api.errors import ApiError, model_status
from btc_anomaly.api.lake import ScoredTable
from btc_anomaly.api.model_holder import ModelHolder, Served
from btc_anomaly.api.prevouts import PrevoutResolver
from btc_anomaly.config import Settings


@dataclass
class ApiContext:
    settings: Settings
    holder: ModelHolder
    lake: ScoredTable
    resolver: PrevoutResolver
    parser: BodyParser
    coalescer: Coalescer
    started_at: float = field(default_factory=time.monotonic)

    def served(self) -> Served:
        """The model for this request (read once: a reload during the request does not affect it), or 503."""
        served = self.holder.current
        if served is None:
            raise ApiError(503, model_status(self.holder))
        return served


def context(request: Request) -> ApiContext:
    return request.app.state.ctx  # type: ignore[no-any-return]
