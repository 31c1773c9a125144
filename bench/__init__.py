"""Benchmarks: ratios measured side by side in one run (docs/design.md §9). Run with `make bench`."""
