"""btc-anomaly: real-time Bitcoin transaction anomaly detection."""

__version__ = "0.1.0"
