"""Benchmarks that measure Fermion side by side with a bare endpoint, in one run."""
