"""Purge: deletion with signed receipts. The job and its steps (``service``, ``job``), their Redis
side (``store``), guarantee classes, signed receipts and their offline verification, and the
bodies of the /v2 purge routes (``requests``)."""
