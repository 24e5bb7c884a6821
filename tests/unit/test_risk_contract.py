"""The risk formula of ``detectors/risk.py`` against values worked out by hand from its module doc: each
part at its anchors and clips, the noisy-OR combination, the severity bands at their edges, and the per-row
signal names and details. Watchlist hits are real listed addresses (``data/labels``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from btc_anomaly.detectors import risk
from btc_anomaly.detectors.rules import RULES
from btc_anomaly.detectors.watchlist import load_watchlist
from helpers.detectors import LABELS

OFAC = "123WBUDmSJv4GctdVEz6Qq6z8nXSKrJ4KX"  # on ofac_sdn, graphsense_ofac and hydra_market
RANSOM = "1Lud76Q98VRHCUiyK7XUs7AgFofrqXeP78"  # on ransomware and ransomwhere
RULE = {r.id: i for i, r in enumerate(RULES)}


def _hit(address: str, side: str = "output") -> list[dict]:
    """The hits ``Watchlist.match`` gives for one listed address, from the committed lists."""
    entries = load_watchlist(LABELS).lookup(address)
    assert entries, address
    return [
        {"list": e.list, "category": e.category, "address": address, "label": e.label, "side": side}
        for e in entries
    ]


def test_the_lists_name_the_addresses_as_the_tests_expect() -> None:
    assert [h["list"] for h in _hit(OFAC)] == ["ofac_sdn", "graphsense_ofac", "hydra_market"]
    assert {h["category"] for h in _hit(OFAC)} == {"sanctions"}
    assert {h["category"] for h in _hit(RANSOM)} == {"ransomware"}


def test_category_weights_and_default() -> None:
    assert risk.category_weight("sanctions") == 0.90
    assert risk.category_weight("ransomware") == 0.75
    assert risk.category_weight("exchange") == 0.05
    assert risk.category_weight("never-heard-of") == 0.50


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (0.0, "low"),
        (24.99, "low"),
        (25.0, "medium"),
        (49.99, "medium"),
        (50.0, "high"),
        (74.99, "high"),
        (75.0, "severe"),
        (99.99, "severe"),
    ],
)
def test_severity_band_edges(score: float, expected: str) -> None:
    assert risk.severity_of(np.array([score])).tolist() == [expected]
    assert risk.severity_of([score]).tolist() == [expected]  # any sequence of numbers
    assert risk.severity_rank(expected) == ["low", "medium", "high", "severe"].index(expected)


def test_forest_part_anchors() -> None:
    # x = log10(1 - score) / log10(1 - threshold); part = 0.70 (1 - 2^(-x^2)).
    score = np.array([0.0, 0.99, 0.9999, 0.999, 1.0, 1.5])
    part = risk.forest_part(score, np.full(6, 0.99))
    expected = [0.0, 0.35, 0.70 * (1 - 2**-4), 0.70 * (1 - 2**-2.25), 0.70, 0.70]
    assert part.tolist() == pytest.approx(expected, abs=1e-12)
    # The threshold's contamination is capped at 0.5: a threshold of 0.3 reads as 0.5.
    assert risk.forest_part([0.5], [0.3]).tolist() == pytest.approx([0.35])
    assert risk.forest_part([0.75], [0.5]).tolist() == pytest.approx([0.70 * (1 - 2**-4)])
    # A threshold of 1 (c = 0) is floored at 1e-300, not a division by zero.
    assert risk.forest_part([0.99], [1.0]).tolist() == pytest.approx([0.70 * (1 - 2 ** -((2 / 300) ** 2))])
    assert np.isfinite(risk.forest_part([1.0], [1.0])).all()


def test_mahalanobis_part_between_the_quantiles() -> None:
    d = np.array([0.0, 10.0, 15.0, 20.0, 30.0, np.nan])
    assert risk.mahalanobis_part(d, 10.0, 20.0).tolist() == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.4, 0.0])
    per_row = risk.mahalanobis_part(np.array([12.0, 12.0]), np.array([10.0, 11.0]), np.array([14.0, 13.0]))
    assert per_row.tolist() == pytest.approx([0.2, 0.2])
    # Equal quantiles: the span is 1e-9, so anything past q99 is the full part.
    assert risk.mahalanobis_part([10.0, 10.0 + 1e-10, 10.5], 10.0, 10.0).tolist() == pytest.approx(
        [0.0, 0.04, 0.4]
    )
    assert risk.mahalanobis_part([5], 10, 20).dtype == np.float64


def test_watchlist_weights_per_distinct_address() -> None:
    hits = _hit(OFAC, "input") + _hit(RANSOM) + _hit(OFAC, "output")
    assert risk.watchlist_weights(hits) == [0.90, 0.75]
    mixed = [
        {"address": "a", "category": "coinjoin"},
        {"address": "a", "category": "scam"},
        {"address": "a", "category": "exchange"},
        {"address": "b", "category": "whatever"},
    ]
    assert risk.watchlist_weights(mixed) == [0.60, 0.50]
    assert risk.watchlist_weights([]) == []


def test_combine_is_the_noisy_or_of_the_parts() -> None:
    n = 5
    hits = np.zeros((n, len(RULES)), dtype=bool)
    hits[1, RULE["dust_fanout"]] = True  # 0.25
    hits[2, RULE["dust_fanout"]] = hits[2, RULE["excessive_fee_share"]] = True  # 0.25, 0.30
    p_forest = np.array([0.35, 0.0, 0.0, 0.0, 1 / 3])
    p_mahal = np.array([0.2, 0.0, 0.0, 0.0, 0.0])
    watch = [[], [], [], [0.9, 0.75], []]
    out = risk.combine(p_forest, p_mahal, hits, watch)
    # 100 (1 - 0.65 * 0.8); 100 (1 - 0.75); 100 (1 - 0.75 * 0.7); 100 (1 - 0.1 * 0.25); 100 / 3 rounded.
    assert out.tolist() == [48.0, 25.0, 47.5, 97.5, 33.33]
    assert risk.combine(p_forest, p_mahal, hits).tolist() == [48.0, 25.0, 47.5, 0.0, 33.33]
    # No rule columns at all (a batch scored with the rules off): forest and distance only.
    assert risk.combine(np.array([0.35]), np.array([0.0]), np.zeros((1, 0), dtype=bool)).tolist() == [35.0]
    every = np.ones((1, len(RULES)), dtype=bool)
    expected = 100 * (1 - math.prod(1 - r.weight for r in RULES))
    assert risk.combine(np.zeros(1), np.zeros(1), every).tolist() == [round(expected, 2)]


def _parts(
    p_forest: list[float], p_mahal: list[float], fired: list[list[str]], watch: list[list[dict]]
) -> risk.Parts:
    hits = np.zeros((len(p_forest), len(RULES)), dtype=bool)
    for i, ids in enumerate(fired):
        for rid in ids:
            hits[i, RULE[rid]] = True
    return risk.Parts(
        p_forest=np.array(p_forest),
        p_mahalanobis=np.array(p_mahal),
        rule_hits=hits,
        watch_hits=watch,
        mahalanobis=np.array([30.5 if m > 0 else np.nan for m in p_mahal]),
    )


def test_signal_names_per_row() -> None:
    parts = _parts(
        [0.35, 0.35, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.1, 0.0, 0.0],
        [["op_return_payload"], ["op_return_payload"], ["dust_fanout", "large_consolidation"], [], []],
        [_hit(OFAC), [], [], [], _hit(RANSOM, "input")],
    )
    assert risk.signal_names(parts) == [
        [
            "forest",
            "rule:op_return_payload",
            "watchlist:ofac_sdn",
            "watchlist:graphsense_ofac",
            "watchlist:hydra_market",
        ],
        ["forest", "rule:op_return_payload"],  # same key as row 0: its watchlist names are not shared
        ["mahalanobis", "rule:dust_fanout", "rule:large_consolidation"],
        [],
        ["watchlist:ransomware", "watchlist:ransomwhere"],
    ]
    twice = _parts([0.0], [0.0], [[]], [_hit(OFAC) + _hit(OFAC, "input")])
    assert risk.signal_names(twice) == [
        ["watchlist:ofac_sdn", "watchlist:graphsense_ofac", "watchlist:hydra_market"]
    ]
    every = _parts([0.1], [0.1], [[r.id for r in RULES]], [[]])
    assert risk.signal_names(every) == [["forest", "mahalanobis", *(f"rule:{r.id}" for r in RULES)]]


def test_each_signal_is_named_on_its_own_and_rows_alike_share_their_list() -> None:
    """The Mahalanobis distance and the first rule are named each without the other, and rows whose signals
    are the same (no watchlist hit) share one list, as the module promises (one list per distinct set)."""
    parts = _parts(
        [0.0, 0.0, 0.2, 0.2], [0.1, 0.0, 0.0, 0.0], [[], ["dust_fanout"], [], []], [[], [], [], []]
    )
    names = risk.signal_names(parts)
    assert names == [["mahalanobis"], ["rule:dust_fanout"], ["forest"], ["forest"]]
    assert names[2] is names[3]


def test_severities_are_an_object_array_of_names() -> None:
    """``severity_of`` gives Python strings (an object array, as documented), which the API and the lake
    serialize as they are."""
    got = risk.severity_of(np.array([0.0, 30.0, 60.0, 90.0]))
    assert got.dtype == object and [type(s) for s in got] == [str] * 4


def test_details_give_each_signal_its_points_and_reason() -> None:
    parts = _parts(
        [0.123456, 0.0, 0.0],
        [0.234567, 0.4, 0.0],
        [["round_large_transfer"], [], []],
        [[], [], _hit(OFAC, "input") + _hit(OFAC, "input") + _hit(RANSOM, "output")],
    )
    rows = risk.details(
        parts,
        [["round_large_transfer"], [], []],
        np.array([0.99, 0.5, 0.1]),
        np.array([0.99, 0.99, 0.99]),
        [(10.04, 20.06), None, None],
    )
    rule = next(r for r in RULES if r.id == "round_large_transfer")
    assert rows[0] == [
        {"signal": "forest", "points": 12.35, "detail": "anomaly score 0.990 (threshold 0.990)"},
        {
            "signal": "mahalanobis",
            "points": 23.46,
            "detail": "distance 30.5 from the training mean (training p99 10.0, p99.9 20.1)",
        },
        {"signal": "rule:round_large_transfer", "points": 15.0, "detail": rule.description},
    ]
    assert rows[1] == [
        {"signal": "mahalanobis", "points": 40.0, "detail": "distance 30.5 from the training mean"}
    ]
    hydra = _hit(OFAC)[2]["label"]
    assert rows[2] == [
        {
            "signal": "watchlist:ofac_sdn",
            "points": 90.0,
            "detail": f"spends from {OFAC}, listed as sanctions",
        },
        {
            "signal": "watchlist:graphsense_ofac",
            "points": 90.0,
            "detail": f"spends from {OFAC}, listed as sanctions (Asset listed under US Treasury OFAC Sanctions List)",
        },
        {
            "signal": "watchlist:hydra_market",
            "points": 90.0,
            "detail": f"spends from {OFAC}, listed as sanctions ({hydra})",
        },
        *(
            {
                "signal": f"watchlist:{h['list']}",
                "points": 75.0,
                "detail": f"pays {RANSOM}, listed as ransomware" + (f" ({h['label']})" if h["label"] else ""),
            }
            for h in _hit(RANSOM)
        ),
    ]
