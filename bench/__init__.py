"""Benchmarks: each prints a table of ratios against a baseline measured in the same run.
Run one with ``.venv/bin/python -m bench.<name>``; results go to bench/RESULTS.md."""
