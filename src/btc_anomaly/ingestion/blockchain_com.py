"""Blockchain.com (blockchain.info) JSON transactions → canonical :class:`~btc_anomaly.schema.Transaction`.

One mapping serves every endpoint that returns tx objects: ``/rawtx/{hash}``, ``/unconfirmed-transactions``
(``txs[]``), ``/rawblock/{hash}`` (``tx[]``), ``/multiaddr`` (``txs[]``) and the WebSocket ``utx`` op.

Script types and addresses are derived from the hex ``script`` with the same classifier as raw decoding
(their ``type`` field is always 0), so a tx looks the same whichever way it reached us. Their ``addr``
is only a fallback for scripts we cannot derive an address from.

Conventions shared with :mod:`btc_anomaly.ingestion.decode`: a coinbase input has script_type
``coinbase``, ``input_value`` null and ``fee`` 0; ``rbf`` is BIP125 signalling and never set on a coinbase.
When every prevout value is present the fee is computed and must equal their ``fee``; when one is
missing ``input_value`` is null and their ``fee`` is kept if they sent one.
``/multiaddr`` lists only the outputs touching the queried wallet: such a tx (``vout_sz`` larger than
``out``) is rejected as incomplete rather than stored with a wrong output value.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from btc_anomaly.ingestion.decode import MAX_MONEY, classify_script
from btc_anomaly.schema import InvalidTransaction, Source, Transaction, validation_reason

_HASH_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_SEQUENCE_FINAL_MINUS_ONE = 0xFFFFFFFE

RawFailure = tuple[Any, str]  # (the raw object, why it was rejected)


def from_blockchain_tx(
    d: dict[str, Any], *, source: Source, first_seen: dt.datetime | None = None
) -> Transaction:
    """Map one Blockchain.com tx object (or a WebSocket ``{"op": "utx", "x": {...}}`` message)."""
    if isinstance(d, dict) and d.get("op") == "utx" and "x" in d:
        d = d["x"]
    if not isinstance(d, dict):
        raise InvalidTransaction(f"expected a JSON object, got {type(d).__name__}")
    try:
        return Transaction.model_validate(_record(d, source, first_seen))
    except ValidationError as exc:
        raise InvalidTransaction(validation_reason(exc)) from None


def _record(d: dict[str, Any], source: Source, first_seen: dt.datetime | None) -> dict[str, Any]:
    txid = d.get("hash")
    if not isinstance(txid, str) or not _HASH_RE.match(txid):
        raise InvalidTransaction(f"missing or malformed hash: {txid!r}"[:120])
    txid = txid.lower()
    where = f"tx {txid[:16]}…"
    raw_inputs = _list(d, "inputs", where)
    raw_outputs = _list(d, "out", where)
    _check_count(d, "vin_sz", len(raw_inputs), "inputs", where)
    _check_count(d, "vout_sz", len(raw_outputs), "outputs", where)

    coinbase = len(raw_inputs) == 1 and _prev_out(raw_inputs[0], where) is None
    inputs: list[dict[str, Any]] = []
    input_value: int | None = None if coinbase else 0
    segwit = False
    rbf = False
    for i, txin in enumerate(raw_inputs):
        ctx = f"{where} input {i}"
        if not isinstance(txin, dict):
            raise InvalidTransaction(f"{ctx}: not an object")
        witness = txin.get("witness") or ""
        if not isinstance(witness, str):
            raise InvalidTransaction(f"{ctx}: witness is not a hex string")
        segwit = segwit or bool(witness)
        sequence = _opt_int(txin, "sequence", ctx)
        rbf = rbf or (sequence is not None and sequence < _SEQUENCE_FINAL_MINUS_ONE)
        if coinbase:
            inputs.append({"address": None, "value": None, "script_type": "coinbase"})
            continue
        prev = _prev_out(txin, ctx)
        value = _opt_int(prev, "value", ctx) if prev is not None else None
        script_type, address = _script(prev, ctx) if prev is not None else ("unknown", None)
        inputs.append({"address": address, "value": value, "script_type": script_type})
        if value is None:
            input_value = None
        elif input_value is not None:
            input_value += value

    outputs: list[dict[str, Any]] = []
    has_op_return = False
    for n, out in enumerate(raw_outputs):
        ctx = f"{where} output {n}"
        if not isinstance(out, dict):
            raise InvalidTransaction(f"{ctx}: not an object")
        value = _opt_int(out, "value", ctx)
        if value is None:
            raise InvalidTransaction(f"{ctx}: missing value")
        script_type, address = _script(out, ctx)
        has_op_return = has_op_return or str(out.get("script", "")).lower().startswith("6a")
        outputs.append({"address": address, "value": value, "script_type": script_type})
    output_value = sum(o["value"] for o in outputs)

    their_fee = _opt_int(d, "fee", where)
    fee: int | None
    if coinbase:
        fee = 0
    elif input_value is not None:
        fee = input_value - output_value
        if their_fee is not None and fee != their_fee:
            raise InvalidTransaction(f"{where}: computed fee {fee} != reported fee {their_fee}")
    else:
        fee = their_fee

    size = _opt_int(d, "size", where)
    if size is None:
        raise InvalidTransaction(f"{where}: missing size")
    weight = _opt_int(d, "weight", where)
    if weight is None:
        if segwit:
            raise InvalidTransaction(f"{where}: missing weight of a segwit tx")
        weight = 4 * size  # without witness data every byte weighs 4
    if first_seen is None:
        first_seen = _timestamp(d, "time", where) or dt.datetime.now(dt.UTC)

    return {
        "hash": txid,
        "first_seen": first_seen,
        "block_height": _opt_int(d, "block_height", where),
        "version": _req_int(d, "ver", where, signed=True),
        "locktime": _req_int(d, "lock_time", where),
        "size": size,
        "vsize": (weight + 3) // 4,
        "weight": weight,
        "fee": fee,
        "input_count": len(inputs),
        "output_count": len(outputs),
        "input_value": input_value,
        "output_value": output_value,
        "is_coinbase": coinbase,
        "has_op_return": has_op_return,
        "is_segwit": segwit,
        "rbf": rbf and not coinbase,
        "inputs": inputs,
        "outputs": outputs,
        "source": source,
    }


def _prev_out(txin: Any, ctx: str) -> dict[str, Any] | None:
    if not isinstance(txin, dict):
        raise InvalidTransaction(f"{ctx}: input is not an object")
    prev = txin.get("prev_out")
    if prev is not None and not isinstance(prev, dict):
        raise InvalidTransaction(f"{ctx}: prev_out is not an object")
    return prev


def _script(obj: dict[str, Any], ctx: str) -> tuple[str, str | None]:
    """Script type and address from the hex script; their ``addr`` fills in when we derive none."""
    script = obj.get("script")
    their_addr = obj.get("addr") if isinstance(obj.get("addr"), str) else None
    if script is None:
        return "unknown", their_addr
    if not isinstance(script, str):
        raise InvalidTransaction(f"{ctx}: script is not a hex string")
    try:
        script_type, address = classify_script(bytes.fromhex(script))
    except ValueError:
        raise InvalidTransaction(f"{ctx}: script is not valid hex") from None
    return script_type, address or their_addr


def _list(d: dict[str, Any], key: str, ctx: str) -> list[Any]:
    value = d.get(key)
    if not isinstance(value, list):
        raise InvalidTransaction(f"{ctx}: {key} is missing or not a list")
    return value


def _check_count(d: dict[str, Any], key: str, actual: int, what: str, ctx: str) -> None:
    declared = _opt_int(d, key, ctx)
    if declared is not None and declared != actual:
        raise InvalidTransaction(f"{ctx}: incomplete, {key}={declared} but {actual} {what} listed")


def _opt_int(d: dict[str, Any], key: str, ctx: str, *, signed: bool = False) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    # bool is an int subclass; a JSON true is never a valid amount or count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTransaction(f"{ctx}: {key} must be an integer, got {value!r}"[:160])
    if not signed and value < 0:
        raise InvalidTransaction(f"{ctx}: {key} is negative ({value})")
    if key in ("value", "fee") and value > MAX_MONEY:
        raise InvalidTransaction(f"{ctx}: {key} {value} exceeds 21 million BTC")
    return value


def _timestamp(d: dict[str, Any], key: str, ctx: str) -> dt.datetime | None:
    seconds = _opt_int(d, key, ctx)
    if seconds is None:
        return None
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidTransaction(f"{ctx}: {key} {seconds} is not a usable unix time") from None


def _req_int(d: dict[str, Any], key: str, ctx: str, *, signed: bool = False) -> int:
    value = _opt_int(d, key, ctx, signed=signed)
    if value is None:
        raise InvalidTransaction(f"{ctx}: missing {key}")
    return value


# --- whole responses -----------------------------------------------------------------------------


def parse_unconfirmed(
    body: dict[str, Any], *, source: Source = "rest"
) -> tuple[list[Transaction], list[RawFailure]]:
    """``/unconfirmed-transactions?format=json``: good transactions, and (raw, reason) for the rest."""
    if not isinstance(body, dict):
        raise InvalidTransaction(f"expected a JSON object response, got {type(body).__name__}")
    return _parse_many(_list(body, "txs", "response"), source)


@dataclass(frozen=True, slots=True)
class ParsedBlock:
    hash: str | None
    height: int | None
    time: dt.datetime | None
    n_tx: int | None  # as the block reports it; tx lists may be cut short
    transactions: list[Transaction] = field(default_factory=list)
    failures: list[RawFailure] = field(default_factory=list)


def parse_rawblock(body: dict[str, Any], *, source: Source = "rest") -> ParsedBlock:
    """``/rawblock/{hash}``: the block's transactions, each given the block height when it lacks one."""
    if not isinstance(body, dict):
        raise InvalidTransaction(f"expected a JSON object response, got {type(body).__name__}")
    raw_txs = _list(body, "tx", "rawblock")
    height = _opt_int(body, "height", "rawblock")
    block_time = _timestamp(body, "time", "rawblock")
    if height is not None:
        raw_txs = [
            {**t, "block_height": height} if isinstance(t, dict) and t.get("block_height") is None else t
            for t in raw_txs
        ]
    transactions, failures = _parse_many(raw_txs, source)
    block_hash = body.get("hash")
    return ParsedBlock(
        hash=block_hash if isinstance(block_hash, str) else None,
        height=height,
        time=block_time,
        n_tx=_opt_int(body, "n_tx", "rawblock"),
        transactions=transactions,
        failures=failures,
    )


def _parse_many(raw_txs: list[Any], source: Source) -> tuple[list[Transaction], list[RawFailure]]:
    good: list[Transaction] = []
    bad: list[RawFailure] = []
    for raw in raw_txs:
        try:
            good.append(from_blockchain_tx(raw, source=source))
        except InvalidTransaction as exc:
            bad.append((raw, exc.reason))
    return good, bad
