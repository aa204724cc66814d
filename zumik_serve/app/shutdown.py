"""Draining the Serve app before a stack stops (``zumik serve`` on SIGTERM or Ctrl-C).

SIGTERM ─► every replica of the app's ingress deployment (the Gateway, or the colocated
           EngineReplica) drains at once (a Serve broadcast; ``api/drain.py``): new requests
           get 503, those in flight finish ─► all idle, or the grace period is over
         ─► Serve, Ray and the embedded Redis stop (``LocalStack.stop``)
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from zumik_serve.api.drain import DrainReport

# A replica answers its drain call at most this long after the grace period (it returns at the
# timeout even with requests still in flight); beyond it the replica is counted as unreachable.
ANSWER_SLACK_S = 15.0


@dataclass(frozen=True)
class DrainOutcome:
    """The app's drain, over all ingress replicas."""

    replicas: int  # replicas that answered
    unreachable: int  # replicas whose drain call failed (a dead replica has nothing to drain)
    in_flight_at_start: int
    left_in_flight: int  # 0: every request in flight finished within the grace period
    ledger_writes_left: int = 0  # reuse-ledger writes still unwritten at the end of the grace period

    def summary(self, elapsed_s: float) -> str:
        unwritten = (
            f"; {self.ledger_writes_left} reuse-ledger write(s) unfinished, lost"
            if self.ledger_writes_left
            else ""
        )
        if self.left_in_flight:
            return (
                f"{self.left_in_flight} of {self.in_flight_at_start} request(s) still in flight after "
                f"{elapsed_s:.0f} s{unwritten}; stopping anyway"
            )
        unreachable = f" ({self.unreachable} replica(s) did not answer)" if self.unreachable else ""
        return (
            f"drained: {self.in_flight_at_start} request(s) in flight finished in {elapsed_s:.1f} s"
            f"{unreachable}{unwritten}"
        )


def drain_serve_app(app_name: str, timeout_s: float) -> DrainOutcome:
    """Drain every ingress replica of ``app_name`` (this process must be connected to Ray)."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    results = handle.broadcast("drain", timeout_s).results(
        timeout_s=timeout_s + ANSWER_SLACK_S, return_exceptions=True
    )
    reports = [result for result in results if isinstance(result, DrainReport)]
    return DrainOutcome(
        replicas=len(reports),
        unreachable=len(results) - len(reports),
        in_flight_at_start=sum(report.in_flight_at_start for report in reports),
        left_in_flight=sum(report.left_in_flight for report in reports),
        ledger_writes_left=sum(report.ledger_writes_left for report in reports),
    )


class StopSignals:
    """SIGTERM (``docker stop``, a pod's termination) and SIGINT (Ctrl-C) for ``zumik serve``.

    Before ``serving()`` a signal interrupts the start (KeyboardInterrupt: what was started is
    stopped). Once serving, the first signal ends ``wait()`` (the caller drains), a second one
    cuts the drain short (KeyboardInterrupt); after ``stopping()`` signals are ignored, so that
    everything started is stopped.
    """

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._phase = "starting"
        self._requested = threading.Event()

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def serving(self) -> None:
        self._phase = "serving"
        if self.received is not None:  # arrived between the start's end and this call
            self._requested.set()

    def wait(self) -> int:
        """Block until a stop is asked for; the signal's number."""
        while not self._requested.wait(0.5):
            pass
        return self.received or signal.SIGTERM

    def stopping(self) -> None:
        self._phase = "stopping"

    def _handle(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
        if self._phase == "stopping":
            return
        if self._phase == "serving" and not self._requested.is_set():
            self._requested.set()
            return
        raise KeyboardInterrupt
