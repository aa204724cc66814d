"""Purge receipts: guarantee classes, signed receipts and their offline verification."""
