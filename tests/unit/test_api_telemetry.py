"""Bulk histogram observation (the score histogram of every batch) equals one observe per value."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from btc_anomaly.api.telemetry import observe_many


def test_observe_many_equals_observe() -> None:
    values = np.random.default_rng(0).uniform(0.2, 1.0, 5000)
    values[:10] = [0.3, 0.35, 0.5, 0.55, 1.0, 0.0, 0.2999999, 0.3000001, 0.9, 0.90000001]
    one, bulk = CollectorRegistry(), CollectorRegistry()
    buckets = (0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.9, 1.0)
    h1 = Histogram("s", "x", ["kind"], buckets=buckets, registry=one)
    h2 = Histogram("s", "x", ["kind"], buckets=buckets, registry=bulk)
    for v in values:
        h1.labels(kind="full").observe(float(v))
    observe_many(h2.labels(kind="full"), values)

    def samples(reg: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(reg).decode().splitlines() if "_created" not in line]

    got, want = samples(bulk), samples(one)
    assert [line for line in got if "_sum" not in line] == [line for line in want if "_sum" not in line]
    sum_got = float(next(line for line in got if "_sum" in line).split()[-1])
    assert sum_got == pytest.approx(values.sum())
