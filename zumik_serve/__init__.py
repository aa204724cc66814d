"""Zumik: an inference control plane for agent workloads (the serving package)."""

__version__ = "0.1.0"
