"""Redis adapters: the only place that talks to Redis."""
