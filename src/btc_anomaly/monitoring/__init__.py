"""Prometheus metrics catalogue and alert delivery."""
