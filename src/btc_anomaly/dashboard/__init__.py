"""The Dash dashboard (``btc-anomaly dashboard``, :8050): live KPIs, charts and top anomalies from the
lake's ``scored_transactions``, transaction details from ``transactions``, and a model page from MLflow.

Modules: ``app`` (create_app, serving, /metrics), ``layout`` (components), ``callbacks`` (Dash wiring,
timing), ``views`` (what each callback renders), ``data`` (NumPy queries), ``lake`` (Delta cache and
lookups), ``figures`` (plotly dicts), ``model_info`` (background MLflow poller), ``demo`` (a lake from
the bundled sample for tests, benchmarks and ``--demo``). Nothing here imports pyspark.
"""
