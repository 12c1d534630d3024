"""Benchmarks of the receiver and the worker; `python -m bench` runs them and writes docs/benchmarks.md."""
