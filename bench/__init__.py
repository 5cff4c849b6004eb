"""Benchmarks that print side-by-side ratios (each figure measured in the same run as its reference)."""
