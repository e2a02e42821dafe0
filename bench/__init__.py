"""Benchmarks: scripts printing figures and ratios measured in one run (see each)."""
