"""Adapters to third-party OpenAI-compatible providers (managed and BYOK routes).

Rule kept here: a provider sees only a clean OpenAI body and the API key of its route; a key
never appears in a message, a log line or a ``repr``.
"""
