"""Benchmarking utilities: MAC counting, timing."""
