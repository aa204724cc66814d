"""Where a request's time went: ``Server-Timing`` headers, the ``telemetry`` object of
``/v2/generate`` and OpenTelemetry spans, all from the same phases.

    queue         waiting for admission (``qos/admission.py``)
    decide        the scheduler's decision (prefix keys + ``routing.decide``)
    first-output  from the decision to the route's first output (prefill and the first token;
                  a whole answer when not streamed)
    restore       inside first-output: KV restored from Zumik's tiers, with tokens per tier and
                  bytes (reported by the engine's KV connector, non-streamed BYOC answers)
    record        saving the decision record

Spans are off by default. ``telemetry.traces`` in the profile (or ``ZUMIK_TRACES``) turns them
on: ``otlp`` exports over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_ENDPOINT``; the exporter reads them), ``console`` prints them. Each request
is one ``zumik.request`` span carrying the decision id, with a child span per phase; the spans
are built after the fact from measured offsets, so the request path pays nothing when tracing
is off and one span batch append when it is on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from zumik_serve.routing.dispatch import EngineRun

logger = logging.getLogger(__name__)

TRACES_ENV = "ZUMIK_TRACES"
TRACE_MODES = ("none", "otlp", "console")
SPAN_PHASES = ("queue", "decide", "first-output", "record")


@dataclass
class RequestClock:
    """When a request started (wall clock for spans, monotonic for durations) and its phases."""

    started_ns: int = field(default_factory=time.time_ns)
    started_perf: float = field(default_factory=time.perf_counter)
    started_monotonic: float = field(default_factory=time.monotonic)
    phases_ms: dict[str, float] = field(default_factory=dict)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started_perf) * 1000


def request_phases(
    run: EngineRun, clock: RequestClock | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """The phases of ``run`` (ms) in order, and descriptions for some of them."""
    phases = dict(clock.phases_ms) if clock is not None else {}
    phases.update(run.timing_ms or {})
    descriptions: dict[str, str] = {}
    restore = run.restore_timing()
    if restore is not None:
        phases["restore"], descriptions["restore"] = restore
    return phases, descriptions


def telemetry_object(run: EngineRun, clock: RequestClock, usage: dict[str, Any]) -> dict[str, Any]:
    """``/v2/generate``'s ``telemetry``: the phases, the tier restore and the decode rate."""
    phases, _ = request_phases(run, clock)
    result: dict[str, Any] = {f"{phase}_ms": round(ms, 3) for phase, ms in phases.items()}
    report = run.kv_report()
    if report is not None:
        result["restore"] = {
            "tiers": {tier: tokens for tier, tokens in sorted((report.get("tiers") or {}).items()) if tokens},
            "bytes": report.get("bytes"),
            "engine_cached_tokens": report.get("engine_tokens"),
        }
    engine_ms = (run.timing_ms or {}).get("first-output")
    completion = usage.get("completion_tokens")
    if engine_ms and isinstance(completion, int) and completion > 0:
        result["output_tokens_per_s"] = round(completion / (engine_ms / 1000), 1)
    return result


class Tracing:
    """The process's span exporter (one per gateway process), or nothing when off."""

    def __init__(self, mode: str, *, service_name: str = "zumik-gateway", exporter: Any = None) -> None:
        """``exporter``: a span exporter to use instead of the mode's (tests pass an in-memory one)."""
        mode = os.environ.get(TRACES_ENV) or mode
        if mode not in TRACE_MODES:
            raise ValueError(f"telemetry.traces must be one of {', '.join(TRACE_MODES)}, not {mode!r}")
        self.mode = mode
        self._tracer: Any = None
        self._provider: Any = None
        if mode == "none":
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter is not None:
            pass
        elif mode == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("zumik")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def request(
        self, run: EngineRun, clock: RequestClock, attributes: dict[str, str | int | float | bool]
    ) -> None:
        """One ``zumik.request`` span (from the request's start to now) with a child per phase."""
        if self._tracer is None:
            return
        from opentelemetry import trace

        try:
            end_ns = clock.started_ns + int(clock.elapsed_ms() * 1e6)
            phases, descriptions = request_phases(run, clock)
            root = self._tracer.start_span(
                "zumik.request", kind=trace.SpanKind.SERVER, start_time=clock.started_ns,
                attributes={"zumik.decision_id": run.decision_id, "zumik.route": run.route, **attributes},
            )  # fmt: skip
            context = trace.set_span_in_context(root)
            offset_ns = clock.started_ns
            first_output_start = offset_ns
            for phase in SPAN_PHASES:
                if phase not in phases:
                    continue
                duration_ns = int(phases[phase] * 1e6)
                if phase == "first-output":
                    first_output_start = offset_ns
                span = self._tracer.start_span(f"zumik.{phase}", context=context, start_time=offset_ns)
                span.end(end_time=offset_ns + duration_ns)
                offset_ns += duration_ns
            if "restore" in phases:  # inside first-output; the connector restores before prefill
                span = self._tracer.start_span(
                    "zumik.restore", context=context, start_time=first_output_start,
                    attributes={"zumik.restore": descriptions.get("restore", "")},
                )  # fmt: skip
                span.end(end_time=first_output_start + int(phases["restore"] * 1e6))
            root.end(end_time=max(end_ns, offset_ns))
        except Exception:  # tracing never fails a request
            logger.exception("zumik: could not emit the request's spans")

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()
