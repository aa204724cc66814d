"""Tier implementations behind ``kvstore.tier.TierBackend``."""
