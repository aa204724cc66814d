"""Telemetry: where a request's time went (Server-Timing, spans) and the metrics it feeds."""
