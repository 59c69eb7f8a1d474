"""Benchmarks behind ``streamvlm bench ...``: speed and memory figures, never pass/fail tests."""
