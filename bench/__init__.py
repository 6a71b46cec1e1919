"""Benchmarks: load generator, baselines and result tables (see bench/README.md)."""
