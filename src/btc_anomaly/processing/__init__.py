"""Spark Structured Streaming into Delta Lake, and JVM-free Delta readers."""
