"""Benchmarks and experiments: ``otfuse bench NAME``."""
