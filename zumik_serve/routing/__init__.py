"""The profile-scoped scheduler's pure domain: breakers, residency, decisions, replay, retries.

No framework imports here (tests/unit/test_layering.py): every decision is a pure function of
recorded inputs, so that ``replay(record)`` rebuilds it byte for byte.
"""
