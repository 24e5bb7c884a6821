"""Request and response bodies of the prediction API, and the texts its OpenAPI page shows.

Requests are validated with pydantic (422 with field-level messages). Responses are built as plain dicts
and serialised with orjson: the response models below document them (OpenAPI) and are checked against
real responses in the tests, but are not run per request, because validating every response would cost
more than scoring the transaction.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, model_validator

from btc_anomaly.schema import Sat, Transaction, TxHash

# Consensus limits: no transaction can be larger than a block (4M weight units), so nothing a client
# sends can push sizes or counts outside what the feature code and Arrow's int64 columns handle.
MAX_TX_WEIGHT = 4_000_000
MAX_TX_BYTES = MAX_TX_WEIGHT  # weight >= size
MIN_TX_BYTES = 10  # version 4 + input count 1 + output count 1 + locktime 4
MIN_INPUT_BYTES = 41  # outpoint 36 + script length 1 + sequence 4
MIN_OUTPUT_BYTES = 9  # value 8 + script length 1

ExplainMode = Literal["auto", "all", "anomalies", "none"]
ModelKind = Literal["full", "structural"]


# --- requests -----------------------------------------------------------------------------------------


class CanonicalTransaction(Transaction):
    """The canonical transaction (``btc_anomaly.schema.Transaction``, as carried on Kafka and stored in Delta).

    Same fields, defaults and consistency rules; the API adds the physical upper bounds of a Bitcoin
    transaction to the sizes and header fields.
    """

    version: Annotated[int, Field(ge=-(2**31), le=2**32 - 1)]
    locktime: Annotated[int, Field(ge=0, le=2**32 - 1)]
    size: Annotated[int, Field(ge=MIN_TX_BYTES, le=MAX_TX_BYTES)]
    vsize: Annotated[int, Field(ge=1, le=MAX_TX_WEIGHT // 4)]
    weight: Annotated[int, Field(ge=MIN_TX_BYTES, le=MAX_TX_WEIGHT)]
    block_height: Annotated[int, Field(ge=0, le=100_000_000)] | None = None

    @model_validator(mode="after")
    def _sizes(self) -> CanonicalTransaction:
        # Every producer derives these the same way (decode.py, blockchain_com.py); a body that disagrees
        # was not produced by a Bitcoin serializer.
        if not self.size <= self.weight <= 4 * self.size:
            raise ValueError(
                f"weight {self.weight} must lie in [size, 4 * size] = [{self.size}, {4 * self.size}]"
            )
        if self.vsize != (self.weight + 3) // 4:
            raise ValueError(f"vsize {self.vsize} != ceil(weight / 4) = {(self.weight + 3) // 4}")
        return self


class SummaryTransaction(BaseModel):
    """The original 8-field body. Per-input/output details are unknown, see ``SUMMARY_SCORING``."""

    model_config = ConfigDict(extra="forbid")

    hash: TxHash
    size: Annotated[int, Field(ge=MIN_TX_BYTES, le=MAX_TX_BYTES, description="Serialized size in bytes.")]
    weight: Annotated[
        int,
        Field(ge=MIN_TX_BYTES, le=MAX_TX_WEIGHT, description="Weight units (size <= weight <= 4 * size)."),
    ]
    fee: Sat | None = Field(
        None, description="Fee in sat; null = unknown (derived from input_value if given)."
    )
    inputs_count: Annotated[int, Field(ge=1, le=MAX_TX_BYTES // MIN_INPUT_BYTES)]
    outputs_count: Annotated[int, Field(ge=1, le=MAX_TX_BYTES // MIN_OUTPUT_BYTES)]
    input_value: Sat | None = Field(None, description="Total input value in sat; null = unknown.")
    output_value: Sat

    @model_validator(mode="after")
    def _physical(self) -> SummaryTransaction:
        if not self.size <= self.weight <= 4 * self.size:
            raise ValueError(
                f"weight {self.weight} must lie in [size, 4 * size] = [{self.size}, {4 * self.size}]"
            )
        floor = MIN_TX_BYTES + MIN_INPUT_BYTES * self.inputs_count + MIN_OUTPUT_BYTES * self.outputs_count
        if self.size < floor:
            raise ValueError(
                f"{self.inputs_count} inputs and {self.outputs_count} outputs need at least {floor} bytes, "
                f"size is {self.size}"
            )
        # fee = input_value - output_value is an identity: complete whichever side is missing.
        if self.fee is not None and self.input_value is not None:
            if self.fee != self.input_value - self.output_value:
                raise ValueError(
                    f"fee {self.fee} != input_value {self.input_value} - output_value {self.output_value}"
                )
        elif self.input_value is not None:
            if self.input_value < self.output_value:
                raise ValueError(f"input_value {self.input_value} < output_value {self.output_value}")
            self.fee = self.input_value - self.output_value
        elif self.fee is not None:
            total = self.output_value + self.fee
            if total > 21_000_000 * 100_000_000:
                raise ValueError("output_value + fee exceeds 21 million BTC")
            self.input_value = total
        return self


def _body_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "summary" if "inputs_count" in value or "outputs_count" in value else "canonical"
    if isinstance(value, SummaryTransaction):
        return "summary"
    if isinstance(value, Transaction):
        return "canonical"
    return None


PredictItem = Annotated[
    Annotated[CanonicalTransaction, Tag("canonical")] | Annotated[SummaryTransaction, Tag("summary")],
    Discriminator(
        _body_kind,
        custom_error_type="transaction_body",
        custom_error_message="expected a transaction object: the canonical transaction, or the 8-field "
        "body with inputs_count/outputs_count",
    ),
]
ITEM_ADAPTER: TypeAdapter[Any] = TypeAdapter(PredictItem)


def request_schemas(ref_template: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(predict body schema, raw body schema, component definitions) for the hand-parsed request bodies."""
    item = ITEM_ADAPTER.json_schema(ref_template=ref_template)
    defs = dict(item.pop("$defs", {}))
    predict = {
        "oneOf": [item, {"type": "array", "items": item, "minItems": 1}],
        "description": "One transaction (object) or a batch (array); the response has the same shape.",
    }
    raw = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "string", "minLength": 1, "description": "A serialized transaction as hex."},
        "description": "Raw transactions as hex strings (whitespace inside a string is ignored).",
    }
    return predict, raw, defs


# --- responses ----------------------------------------------------------------------------------------


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class Reason(BaseModel):
    feature: str = Field(description="Feature name (see features.py).")
    label: str = Field(description="How a human calls the feature.")
    value: float | None = Field(
        description="Feature value as the model sees it (log1p for sizes and amounts)."
    )
    display: str = Field(description="The value in human units (sat, sat/vB, BTC, share, yes/no).")
    contribution: float = Field(
        description="Path length this feature saved, in splits, averaged over trees (path-length attribution)."
    )
    share: float = Field(description="This feature's part of all positive contributions of the transaction.")
    text: str = Field(description="One sentence placing the value in the training window's distribution.")
    imputed: bool = Field(description="True when the value was not in the request but imputed (median).")


Severity = Literal["low", "medium", "high", "severe"]


class WatchlistHit(BaseModel):
    list: str = Field(description="Watchlist name (data/labels/watchlists.yaml).")
    category: str = Field(description="What the list says the address is: sanctions, ransomware, ...")
    address: str
    label: str | None = Field(description="The list's label of the address (e.g. a ransomware family).")
    side: Literal["input", "output"] = Field(description="input: the tx spends from it; output: pays it.")


class RiskSignal(BaseModel):
    signal: str = Field(description="forest, mahalanobis, rule:<id> or watchlist:<list>.")
    points: float = Field(description="The risk score this signal alone would give (0-100).")
    detail: str


class RiskFields(BaseModel):
    risk_score: float = Field(ge=0, le=100, description="0-100 combined risk; see the risk section.")
    severity: Severity = Field(description="low < 25 <= medium < 50 <= high < 75 <= severe.")
    signals: list[str] = Field(description="The signals that raised the risk score.")
    rule_hits: list[str] = Field(description="Ids of the rules that fired (GET /rules lists them).")
    watchlist_hits: list[WatchlistHit]
    mahalanobis: float | None = Field(
        description="Mahalanobis distance of the features from the training mean; null when absent."
    )


class Prediction(RiskFields):
    hash: str
    anomaly_score: float = Field(ge=0, le=1, description="Higher = more anomalous; see the API description.")
    is_anomaly: bool
    threshold: float = Field(description="The threshold applied: the request's, else the model's.")
    model_threshold: float = Field(description="The threshold of the forest that scored this transaction.")
    model_kind: ModelKind = Field(
        description="Which forest scored it: full (prevouts known) or structural (no fee / input value)."
    )
    reasons: list[Reason] = Field(description="Top features that isolated it (empty when not explained).")
    missing_features: list[str] = Field(
        description="Features of the full model the request did not determine: imputed with training medians "
        "(8-field body) or unknown without prevouts (then the structural forest scored the transaction)."
    )
    model: ModelRef
    risk_detail: list[RiskSignal] = Field(description="Each contributing signal with its points and why.")
    absent_signals: list[str] = Field(
        description="Signals that could not be computed: mahalanobis (model trained before it was stored, or "
        "an 8-field body), watchlists and output_rules (8-field bodies have no addresses or outputs)."
    )


class PrevoutLookup(BaseModel):
    requested: bool = Field(description="Whether a prevout lookup was attempted for this transaction.")
    inputs: int
    resolved: int = Field(description="Inputs whose previous output (value, script) is known.")
    source: str | None = Field(description="Where the prevouts came from (Blockchain.com base URL).")
    error: str | None = Field(description="Why some prevouts are unknown, when they are.")


class RawSummary(BaseModel):
    txid: str
    input_count: int
    output_count: int
    output_value: int
    input_value: int | None
    fee: int | None
    script_types: list[str]
    is_segwit: bool
    is_coinbase: bool
    rbf: bool
    has_op_return: bool
    size: int
    vsize: int
    weight: int


class RawPrediction(Prediction):
    index: int
    valid: Literal[True]
    summary: RawSummary
    prevouts: PrevoutLookup


class RawInvalid(BaseModel):
    index: int
    valid: Literal[False]
    reason: str = Field(description="Why the hex is not a transaction (one line).")


RawItem = Annotated[RawPrediction | RawInvalid, Field(discriminator="valid")]


class ScoredRow(BaseModel):
    """A row of the ``scored_transactions`` Delta table: the columns of ``scored_arrow_schema()``, including
    the display fields the stream stores with the score (block_height, counts, value, fee, vsize, fee_rate)."""

    model_config = ConfigDict(extra="allow")

    hash: str
    first_seen: str | None
    anomaly_score: float
    is_anomaly: bool
    threshold: float
    model_kind: str
    reasons: list[str] | None
    top_features: list[str] | None
    model_name: str
    model_version: str
    scored_at: str
    # Rows written before the detectors existed lack these.
    risk_score: float | None = None
    severity: Severity | None = None
    signals: list[str] | None = None
    rule_hits: list[str] | None = None
    watchlist_hits: list[WatchlistHit] | None = None
    mahalanobis: float | None = None


class AddressTransaction(BaseModel):
    hash: str
    first_seen: str | None
    side: Literal["input", "output", "both"] = Field(
        description="Whether the address spends, receives or both."
    )
    value: int | None = Field(description="Sat the address sends (inputs) or receives (outputs) in this tx.")
    block_height: int | None
    scored: bool = Field(description="Whether scored_transactions holds a scoring of the transaction.")
    anomaly_score: float | None
    risk_score: float | None
    severity: Severity | None
    rule_hits: list[str] | None
    watchlist_hits: list[WatchlistHit] | None


class ListedAs(BaseModel):
    list: str
    category: str
    label: str | None


class AddressReport(BaseModel):
    address: str
    watchlists: list[ListedAs] = Field(description="The lists that name this address itself.")
    transactions: list[AddressTransaction] = Field(description="Newest first, at most `limit`.")
    count: int = Field(description="Transactions touching the address in the range read.")
    truncated: bool
    highest_risk: AddressTransaction | None = Field(
        description="The scored transaction with the highest risk."
    )
    rule_hits: dict[str, int] = Field(description="Rule id → how many of its transactions it fired on.")
    tables: dict[str, str]
    window: ReadWindow | None = Field(None, description="The [since, until) of first_seen that was read.")


class ReadWindow(BaseModel):
    since: str = Field(description="Start of the range read (inclusive, ISO 8601 UTC).")
    until: str = Field(description="End of the range read (exclusive, ISO 8601 UTC).")


class AnomalyPage(BaseModel):
    count: int
    items: list[ScoredRow]
    window: ReadWindow = Field(description="The [since, until) of first_seen that was read.")


class Health(BaseModel):
    status: Literal["ok"]
    pid: int
    uptime_s: float


class Readiness(BaseModel):
    ready: bool
    model: dict[str, Any]
    lake: dict[str, Any]
    missing: list[str] = Field(description="What keeps the service from being ready (empty when ready).")


class ModelDescription(BaseModel):
    name: str
    version: str
    alias: str
    run_id: str | None
    loaded_at: float
    trained_at: str | None
    metrics: dict[str, float]
    params: dict[str, Any]
    thresholds: dict[str, float]
    features: dict[str, list[str]]
    promotion: dict[str, Any] = Field(
        description="status, reason, decided_by, decided_at from the version tags."
    )
    description: str | None = Field(description="The registry's version description (training and gate log).")


class ReloadResult(BaseModel):
    changed: bool
    previous_version: str | None
    version: str | None
    detail: str


class ErrorDetail(BaseModel):
    detail: Any


# --- OpenAPI texts --------------------------------------------------------------------------------------

SCORE_DOC = """
**Score.** `anomaly_score = 1 - p`, where `p` is the share of the training window's transactions that are at
least as unusual (extrapolated past the most unusual one), so 0.999 reads "more unusual than 99.9 % of the
training window". Two views are combined in decades of evidence (`-log10` of a training probability): the
**tails** of each heavy-tailed feature (fee rate, read both absolutely and against the current fee market,
fee, fee share, value, input/output counts, size, dust and OP_RETURN outputs), extrapolated past the training
range so a larger value always scores higher; and an **Isolation Forest** over amounts, counts, fees and the
shape of the outputs, for combinations no single feature shows (it needs ten times the rarity to weigh like
a tail). A transaction is an anomaly when `anomaly_score > threshold`; the model's threshold is
`1 - contamination` (default 0.99), so about `contamination` of traffic like the training window is
flagged, and any tail feature past the training range (or a fee rate below the 1 sat/vB minimum relay fee)
is always flagged. `?threshold=` replaces it for one request: the scores are not recomputed, only the labels
(and which transactions get reasons). Reasons name the features with the most evidence.

**Two models.** Transactions whose prevouts are known (fee and input value) are scored by the *full* model;
the others (raw hex without a prevout lookup, coinbases, 8-field bodies without fee and input value) by the
*structural* model, trained on the same window without the fee/input features. `model_kind` says which, and
`missing_features` lists the full model's features the request did not determine.
"""

SUMMARY_SCORING = """
**The 8-field body** (`hash, size, weight, fee, inputs_count, outputs_count, input_value, output_value`) is
mapped onto the canonical columns and goes through the same feature function as every other path:
`vsize = ceil(weight / 4)`, `is_segwit = weight < 4 * size`, input/output counts, output value, and, when fee
or input value is given (the other is completed with `fee = input_value - output_value`), fee, fee rate, input
value and fee share. What cannot be known without the individual inputs and outputs (output value shares and
concentration, dust and round amounts, output script mix, address reuse, RBF, locktime and OP_RETURN flags) is
**imputed with the training-window median** of the scoring forest (stored with the model) and listed in
`missing_features`; reasons that rest on an imputed value say so (`imputed: true`). Without fee and input value
the structural forest scores it.
"""

RISK_DOC = """
**Risk.** Besides the forest, every transaction gets a 0-100 `risk_score` and a `severity` from all
per-transaction signals, combined like independent evidence (`risk = 100 (1 - prod(1 - p_i))`): the forest
(`0.35` per unit of `(score - 0.5) / (threshold - 0.5)`, at most `0.70`), the Mahalanobis distance of the
features from the training window (up to `0.40` between the training 99th and 99.9th percentiles), each rule
that fires (`rule_hits`, weights 0.05-0.30) and each listed address the transaction spends from or pays
(`watchlist_hits`; sanctions 0.90, ransomware 0.75, hacks and scams 0.60, mixers 0.50, ...).
`low < 25 <= medium < 50 <= high < 75 <= severe`. `risk_detail` gives each contributing signal's points and
reason; `absent_signals` names what could not be computed.
"""

API_DESCRIPTION = (
    """
Real-time Bitcoin transaction anomaly detection: scores transactions with the MLflow registry's `champion`
Isolation Forest bundle, hot-reloaded when the alias moves, and serves the stream's `scored_transactions`
Delta table.

**Errors.** Invalid bodies → 422 with field-level messages: `loc` is the path to the field, with the body variant
the item was read as (`["body", 3, "canonical", "outputs", 0, "value"]`; an object with `inputs_count` or
`outputs_count` is read as the 8-field body, anything else as the canonical transaction). More transactions than
the batch limit, or a body over the byte limit (declared in Content-Length or counted while streaming) → 413.
No model registered under the alias yet → 503 `{"detail": "no model registered yet: run btc-anomaly train"}`;
model registry unreachable before any model was loaded → 503 saying so. Unknown transaction → 404.

**Readiness.** `/ready` is 200 when a model is loaded and the Delta lake folder is readable. With several
workers each answers for itself; a worker only takes connections after its first registry check.

**Admin.** `POST /admin/reload` re-checks the alias now (other workers follow within a second). It needs the
`X-API-Key` header equal to `BTC_ANOMALY_API_KEY`: missing or wrong → 401; when no key is configured the
endpoint is disabled → 403.
"""
    + SCORE_DOC
    + SUMMARY_SCORING
    + RISK_DOC
)
