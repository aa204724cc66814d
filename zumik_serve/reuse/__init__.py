"""Reuse accounting: opportunity and capture, each with its evidence level, never blended."""
