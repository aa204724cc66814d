"""What a generation request is once a surface has parsed it, and what the pipeline returns.

    GenerationRequest   tenant, surface, call, model, engine fields, stream, state refs,
                        admission (QoS class, deadline, slot), clock
    Generation          the outcome: the engine run, the release and snapshot it ran under,
                        the served model, the phases, and the reuse opportunity known so far
    Completion          what a stream's consumer reports back once the stream has ended

Surfaces (``api/v1``, ``api/v2``) build the request and render the outcome; everything between
is ``pipeline.Pipeline``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from profiles.model import QosClass
from zumik_serve.engines.protocol import EngineCall, EngineResponse
from zumik_serve.errors import EngineError
from zumik_serve.pipeline.accounting import RequestAccounting
from zumik_serve.providers.hints import NO_HINTS, ProviderHints
from zumik_serve.qos.admission import Ticket
from zumik_serve.qos.deadline import Deadline
from zumik_serve.qos.quota import RateReservation
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.routing.dispatch import EngineRun
from zumik_serve.routing.release import Release
from zumik_serve.telemetry.tracing import RequestClock
from zumik_serve.tenancy.tenant import Tenant


class Surface(StrEnum):
    """Where a request came in, which decides how its prompt reaches the engine."""

    V1 = "v1"  # OpenAI-compatible: messages or prompt as sent, any route of the profile
    V2 = "v2"  # native: messages tokenized here, so only this deployment's own engines (byoc)
    WARM = "warm"  # a snapshot's compiled tokens, one output token (``/v2/snapshots/{id}/warm``)


@dataclass(frozen=True)
class StateRefs:
    """The state objects a request builds on: a snapshot whose messages come first, a session
    that the exchange (the request's last user/tool message and the reply) is appended to, and
    the release a stored conversation ran under (kept while the request names the same alias),
    and other objects whose content the request carries (a Responses chain's session)."""

    snapshot: str | None = None
    session: str | None = None
    release: str | None = None
    carried: tuple[str, ...] = ()

    def sources(self) -> tuple[str, ...]:
        """Every state object whose content goes out with the request (or, for the session,
        into which the exchange goes), each once: what a purge of one of them must reach."""
        named = (self.snapshot, self.session, *self.carried)
        return tuple(dict.fromkeys(handle for handle in named if handle is not None))


@dataclass
class Admission:
    """A request admitted into its QoS class: the slot it holds until ``release()``."""

    qos: QosClass
    deadline: Deadline
    ticket: Ticket
    engine_priority: int | None  # vLLM's priority for the class; None: the engines do FIFO
    prefer_cheapest: bool  # the class takes the cheapest healthy route

    def release(self) -> None:
        self.ticket.release()


@dataclass(frozen=True)
class GenerationRequest:
    tenant: Tenant
    surface: Surface
    call: EngineCall
    model: str | None  # as the client named it (an alias or a served model); None: the default
    body: Mapping[str, Any]  # the engine fields the surface accepted; ``model`` is set later
    stream: bool
    refs: StateRefs
    admission: Admission
    clock: RequestClock = field(default_factory=RequestClock)
    hints: ProviderHints = NO_HINTS  # provider hints, the client's prompt_cache_key among them
    profile: str | None = None  # the profile the client asked for (x-zumik-profile); None: served one


@dataclass(frozen=True)
class Completion:
    """What came out of a stream, as its consumer saw it: the reply of choice 0 (for the
    session) and the usage the engine reported (for the reuse ledger)."""

    reply: str
    usage: Mapping[str, Any] | None


@dataclass
class Generation:
    """A request whose route gave a good first output. ``run.first`` is the whole answer of a
    non-streamed request; a stream goes on in ``run.rest`` (``Pipeline.events``)."""

    request: GenerationRequest
    model: str  # the served model it ran on (what the answer names)
    release: Release | None
    run: EngineRun
    # queue, decide, first-output, record (and restore); then lookup (the release lookup's round
    # trip), to-decide and in-app (from the handler's start to the decision, and to the answer,
    # or a stream's first output, ready): what the app's own clock saw
    phases_ms: dict[str, float]
    phase_descriptions: dict[str, str]
    accounting: RequestAccounting
    opportunity_tokens: int | None = None  # known before a stream's body; None: not known
    figures: ReuseFigures | None = None  # once answered; None: no accounting (store outage)
    rate_reservation: RateReservation | None = None  # the tokens counted at admission

    @property
    def snapshot(self) -> str | None:
        return self.request.refs.snapshot

    @property
    def answer(self) -> dict[str, Any]:
        """The engine's whole answer (a non-streamed request)."""
        first = self.run.first
        if not isinstance(first, EngineResponse):
            raise EngineError("The engine streamed a response to a non-streaming request.")
        return first.body
