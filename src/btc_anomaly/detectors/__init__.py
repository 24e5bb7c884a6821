"""Detectors beyond the Isolation Forest.

Per transaction (run inside ``model.scoring.score_frame``, so the stream and the API both get them):

* ``rules``: transparent rules with ids and descriptions (dust fan-out, peel-chain step, ...);
* ``watchlist``: addresses from GraphSense TagPacks and plain lists (``data/labels``);
* ``mahalanobis``: distance of the feature vector from the training window's mean (stored in the bundle);
* ``risk``: the 0-100 risk score and severity that combines them with the forest score.

Over time (run by ``btc-anomaly detect``, ``service.py``):

* ``windows``: EWMA z-scores of the 1-minute window aggregates → ``window_anomalies``;
* ``bursts``: clusters of similar high fan-in / fan-out transactions → ``coordinated_bursts``.
"""
