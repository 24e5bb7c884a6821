"""POST /predict (canonical or 8-field transactions) and POST /predict/raw (raw hex)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, TypeVar

from bitcoin.core import CTransaction
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from btc_anomaly.api import inference
from btc_anomaly.api.body import read_body
from btc_anomaly.api.context import ApiContext, context
from btc_anomaly.api.errors import ApiError, json_response
from btc_anomaly.api.model_holder import Served
from btc_anomaly.api.schemas import (
    RISK_DOC,
    SCORE_DOC,
    SUMMARY_SCORING,
    ErrorDetail,
    ExplainMode,
    Prediction,
    RawItem,
)
from btc_anomaly.ingestion.decode import decode_transaction
from btc_anomaly.monitoring.metrics import API_RAW_ITEMS
from btc_anomaly.schema import InvalidTransaction, Transaction

# Jobs of up to this many transactions and inputs + outputs are scored on the event loop (coalesced with
# concurrent requests): a thread hop costs more than scoring them. Anything bigger goes to the thread pool,
# so one huge transaction (a 1 MB one has ~7,000 inputs) never holds the loop that answers /health and
# every other request: scoring cost follows the feature lists' length, not the transaction count.
INLINE_MAX = 32
INLINE_MAX_IOS = 1_000
# Bodies from this size are parsed and validated in the thread pool (a 32 MiB body takes seconds to parse);
# below it the parse costs less than the thread hop.
INLINE_MAX_BODY_BYTES = 64 * 1024
# Sent when a request asks for prevout lookups the operator turned off (BTC_ANOMALY_API_RESOLVE_PREVOUTS).
PREVOUTS_DISABLED = "prevout lookups are disabled on this server (BTC_ANOMALY_API_RESOLVE_PREVOUTS=false)"

_T = TypeVar("_T")

ThresholdQuery = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Label with this threshold instead of the model's (scores are not recomputed).",
    ),
]
ExplainQuery = Annotated[
    ExplainMode,
    Query(
        description="Which transactions get reasons: auto = all when the request holds one transaction, "
        "else the anomalies only; all; anomalies; none."
    ),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorDetail, "description": "Body over the byte limit or batch over the count limit."},
    422: {"model": ErrorDetail, "description": "Invalid body or parameters (field-level messages)."},
    503: {"model": ErrorDetail, "description": "No model loaded (none registered yet, or registry down)."},
}


def _body(ref: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    }


def _explain_mode(explain: ExplainMode, n: int) -> ExplainMode:
    if explain != "auto":
        return explain
    return "all" if n == 1 else "anomalies"


async def _score(
    ctx: ApiContext, served: Served, items: list[Any], threshold: float | None, explain: ExplainMode
) -> list[dict[str, Any]]:
    """Small jobs are coalesced with concurrent ones on the event loop (batcher.py); big ones (many
    transactions, or many inputs + outputs) run in the thread pool so that other requests keep flowing
    meanwhile. Predictions carry the risk fields (``inference.predict_jobs`` → ``api/risk.py``)."""
    if (ios := inference.count_ios(items)) > ctx.settings.api_max_batch_ios:
        raise ApiError(
            413,
            f"{ios:,} inputs + outputs in one request exceed the limit of {ctx.settings.api_max_batch_ios:,}",
        )
    job = inference.Job(items, threshold, explain)
    try:
        if len(items) <= INLINE_MAX and ios <= INLINE_MAX_IOS:
            return await ctx.coalescer.submit(served, job)
        run = partial(inference.predict_jobs, served, [job], top_k=ctx.settings.explain_top_k)
        return (await run_in_threadpool(run))[0]
    except inference.BatchTooLarge as exc:
        raise ApiError(413, str(exc)) from None


def router() -> APIRouter:
    r = APIRouter(tags=["predict"])

    @r.post(
        "/predict",
        response_model=Prediction | list[Prediction],
        responses=ERRORS,
        openapi_extra=_body("PredictRequest"),
        summary="Score one transaction or a batch",
        description="Send one transaction (object) or up to `BTC_ANOMALY_API_MAX_BATCH` (array): the canonical "
        "transaction or the original 8-field body, mixed freely. The response mirrors the request: an object "
        "for an object, an array in the same order for an array.\n" + SCORE_DOC + SUMMARY_SCORING + RISK_DOC,
    )
    async def predict(
        request: Request, threshold: ThresholdQuery = None, explain: ExplainQuery = "auto"
    ) -> Response:
        ctx = context(request)
        served = ctx.served()
        s = ctx.settings
        items, single = await _off_loop(
            ctx.parser.transactions, await read_body(request, s.api_max_body_bytes)
        )
        out = await _score(ctx, served, items, threshold, _explain_mode(explain, len(items)))
        if len(out) > INLINE_MAX:  # serializing 10,000 predictions with reasons takes tens of ms
            return await run_in_threadpool(json_response, out)
        return json_response(out[0] if single else out)

    @r.post(
        "/predict/raw",
        response_model=list[RawItem],
        responses=ERRORS,
        openapi_extra=_body("RawPredictRequest"),
        summary="Decode and score raw hex transactions",
        description="Each item is decoded (python-bitcoinlib). An item that is not a transaction comes back as "
        "`{valid: false, reason}`; the others get the decoded summary and a prediction. Prevouts are looked up "
        "with Blockchain.com `/rawtx/{parent}` when `resolve_prevouts` (default `BTC_ANOMALY_API_RESOLVE_PREVOUTS`) "
        "and the source answers within `BTC_ANOMALY_API_PREVOUT_TIMEOUT_S`; with every prevout known the full "
        "forest scores the transaction, otherwise the structural one, and `missing_features` / `prevouts` say "
        "what was missing and why. Coinbases have no prevouts and are always structural.\n"
        + SCORE_DOC
        + RISK_DOC,
    )
    async def predict_raw(
        request: Request,
        threshold: ThresholdQuery = None,
        explain: ExplainQuery = "auto",
        resolve_prevouts: Annotated[
            bool | None,
            Query(
                description="Look up prevouts (default: BTC_ANOMALY_API_RESOLVE_PREVOUTS). The operator's "
                "setting is a cap: `true` on a server with lookups off is answered without lookups, with "
                "the header `X-Prevout-Lookups: disabled` and the reason in each item's `prevouts.error`."
            ),
        ] = None,
    ) -> Response:
        ctx = context(request)
        served = ctx.served()
        s = ctx.settings
        hexes = await _off_loop(ctx.parser.raw_hexes, await read_body(request, s.api_max_body_bytes))
        decoded = await run_in_threadpool(_decode_all, hexes)
        # The operator's setting caps the request's: lookups spend the Blockchain.com quota the producer
        # shares, and an operator who turned them off may have no outbound access at all.
        refused = bool(resolve_prevouts) and not s.api_resolve_prevouts
        lookup = s.api_resolve_prevouts and resolve_prevouts is not False
        parents = [p for d in decoded if isinstance(d, _Decoded) for p in d.parents]
        resolution = await ctx.resolver.resolve(parents) if lookup and parents else None
        valid = [d for d in decoded if isinstance(d, _Decoded)]
        if resolution is not None:
            await run_in_threadpool(_apply_prevouts, valid, resolution.prevouts)
        explain_mode = _explain_mode(explain, len(valid))
        predictions = iter(await _score(ctx, served, [d.tx for d in valid], threshold, explain_mode))
        out: list[dict[str, Any]] = []
        for index, d in enumerate(decoded):
            if isinstance(d, str):
                out.append({"index": index, "valid": False, "reason": d})
                continue
            pred = next(predictions)
            errors = resolution.errors if resolution is not None else {}
            reasons = sorted({errors[p] for p in d.parents if p in errors})
            if d.error:
                reasons.insert(0, d.error)
            if refused and d.parents:
                reasons.insert(0, PREVOUTS_DISABLED)
            out.append(
                {
                    "index": index,
                    "valid": True,
                    **pred,
                    "summary": _summary(d.tx),
                    "prevouts": {
                        "requested": bool(lookup and d.parents),
                        "inputs": d.tx.input_count,
                        "resolved": sum(1 for i in d.tx.inputs if i.value is not None),
                        "source": ctx.resolver.source if lookup and d.parents else None,
                        "error": "; ".join(reasons)[:1000] or None,
                    },
                }
            )
        invalid = sum(1 for d in decoded if isinstance(d, str))
        if invalid:
            API_RAW_ITEMS.labels(result="invalid").inc(invalid)
        if len(decoded) - invalid:
            API_RAW_ITEMS.labels(result="scored").inc(len(decoded) - invalid)
        headers = {"X-Prevout-Lookups": "disabled"} if refused else None
        if len(out) > INLINE_MAX:
            return await run_in_threadpool(json_response, out, 200, headers)
        return json_response(out, headers=headers)

    return r


async def _off_loop(parse: Callable[[bytes], _T], body: bytes) -> _T:
    """``parse(body)``, in the thread pool when the body is big enough to hold the event loop."""
    if len(body) < INLINE_MAX_BODY_BYTES:
        return parse(body)
    return await run_in_threadpool(parse, body)


# --- raw decoding ------------------------------------------------------------------------------------------


class _Decoded:
    __slots__ = ("error", "hex", "outpoints", "parents", "tx")

    def __init__(self, hex_: str, tx: Transaction, outpoints: list[tuple[str, int]]) -> None:
        self.hex = hex_
        self.tx = tx
        self.outpoints = outpoints
        self.parents = list(dict.fromkeys(txid for txid, _ in outpoints))
        self.error: str | None = None


def _decode_all(hexes: list[str]) -> list[_Decoded | str]:
    """Each hex → a decoded transaction with the outpoints it spends, or the reason it is not one."""
    out: list[_Decoded | str] = []
    for h in hexes:
        try:
            tx = decode_transaction(h)
        except InvalidTransaction as exc:
            out.append(exc.reason)
            continue
        except Exception as exc:  # the decoder's dependencies raise their own types on hostile bytes
            out.append(f"not a transaction: {type(exc).__name__}: {exc}"[:300])
            continue
        outpoints: list[tuple[str, int]] = []
        if not tx.is_coinbase:
            raw = CTransaction.deserialize(bytes.fromhex("".join(h.split())))
            outpoints = [(txin.prevout.hash[::-1].hex(), txin.prevout.n) for txin in raw.vin]
        out.append(_Decoded(h, tx, outpoints))
    return out


def _apply_prevouts(decoded: list[_Decoded], prevouts: dict[Any, Any]) -> None:
    """Decode again with the prevouts that were found (fee, input value and input scripts become known)."""
    for d in decoded:
        if not any(op in prevouts for op in d.outpoints):
            continue
        try:
            d.tx = decode_transaction(d.hex, prevouts=prevouts, first_seen=d.tx.first_seen)
        except InvalidTransaction as exc:
            # e.g. the looked-up outputs are worth less than the transaction spends: keep it prevout-less.
            d.error = f"prevouts rejected: {exc.reason}"


def _summary(tx: Transaction) -> dict[str, Any]:
    """``decode_summary``'s fields (the CLI's `decode`), plus fee and input value when prevouts were found."""
    return {
        "txid": tx.hash,
        "input_count": tx.input_count,
        "output_count": tx.output_count,
        "output_value": tx.output_value,
        "input_value": tx.input_value,
        "fee": tx.fee,
        "script_types": [o.script_type for o in tx.outputs],
        "is_segwit": tx.is_segwit,
        "is_coinbase": tx.is_coinbase,
        "rbf": tx.rbf,
        "has_op_return": tx.has_op_return,
        "size": tx.size,
        "vsize": tx.vsize,
        "weight": tx.weight,
    }
