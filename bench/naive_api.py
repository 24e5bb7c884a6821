"""The naive baseline of bench_api.py: the obvious FastAPI service around the registered model.

Loads ``models:/<name>@champion`` with ``mlflow.pyfunc.load_model``, takes the fitted sklearn
IsolationForests out of it and, per request, builds a pandas frame, calls ``compute_features`` and then
sklearn's ``predict`` and ``score_samples`` (which scores twice), answering through FastAPI's response
model. Run as ``uvicorn bench.naive_api:naive_app --factory`` with ``BENCH_NAIVE_MODEL_URI`` set.

No ``from __future__ import annotations``: FastAPI must see the body types as objects.
"""

import os
from typing import Any

NAIVE_ENV = "BENCH_NAIVE_MODEL_URI"


def naive_app() -> Any:
    import mlflow.pyfunc
    import pandas as pd
    from fastapi import FastAPI
    from pydantic import BaseModel

    from btc_anomaly.features import FEATURES_FULL, compute_features
    from btc_anomaly.model.bundle import FOREST_FEATURES_OF, ModelBundle
    from btc_anomaly.schema import Transaction

    pyfunc = mlflow.pyfunc.load_model(os.environ[NAIVE_ENV])
    # The pyfunc wraps our bundle; its artifact folder also holds the fitted sklearn forests.
    bundle_dir = pyfunc._model_impl.context.artifacts["bundle"]
    forests = {k: ModelBundle.load_sklearn(bundle_dir, k) for k in ("full", "structural")}
    # The naive service scores with the bundle's forests alone (no tails, no calibration), on the features
    # they were fit on.
    columns = FOREST_FEATURES_OF

    class Out(BaseModel):
        hash: str
        anomaly_score: float
        is_anomaly: bool

    app = FastAPI()

    def score(txs: list[Transaction]) -> list[Out]:
        frame = pd.DataFrame([t.model_dump() for t in txs])
        features = compute_features(frame)
        full = features[FEATURES_FULL].notna().all(axis=1)
        out = []
        for i, tx in enumerate(txs):
            kind = "full" if full.iloc[i] else "structural"
            X = features.iloc[[i]][columns[kind]]
            model = forests[kind]
            label = model.predict(X)[0]
            out.append(
                Out(hash=tx.hash, anomaly_score=-float(model.score_samples(X)[0]), is_anomaly=label == -1)
            )
        return out

    @app.post("/predict", response_model=Out)
    def predict(tx: Transaction) -> Out:
        return score([tx])[0]

    @app.post("/predict/batch", response_model=list[Out])
    def predict_batch(txs: list[Transaction]) -> list[Out]:
        return score(txs)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
