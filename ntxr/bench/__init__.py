"""Benchmarks of the hot paths: `python -m ntxr.bench` (see __main__.py)."""
