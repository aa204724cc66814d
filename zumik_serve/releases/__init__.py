"""Releases: the immutable versions an alias points at (model, route table, policy version)."""
