"""Benchmarks for optaxclip: jitted timings against optax, torch and the memory bound.

Run ``python -m benchmarks`` (full) or ``python -m benchmarks --quick``; see
``python -m benchmarks --help``.
"""
