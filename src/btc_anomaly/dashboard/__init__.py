"""Plotly Dash dashboard."""
