"""Benchmarks (not tests): see bench/fanout.py and docs/PERFORMANCE.md."""
