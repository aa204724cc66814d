"""Wiring: the typed gateway context built once at start, the Ray Serve deployments and
application, the local stack behind ``zumik serve``. These modules hold no policy."""
