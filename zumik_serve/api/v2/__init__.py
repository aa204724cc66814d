"""/v2: the native surface (state objects, generation, routing, purge), with request models."""
