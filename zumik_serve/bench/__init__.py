"""Benchmarks behind `zumik bench ...`: arms measured side by side in one run."""
