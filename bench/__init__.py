"""Benchmarks: `make bench` runs them and prints figures (never pass/fail)."""
