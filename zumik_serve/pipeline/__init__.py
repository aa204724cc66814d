"""The request pipeline: one owner for a generation request from admission to telemetry."""
