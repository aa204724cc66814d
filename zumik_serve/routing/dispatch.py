"""Dispatcher: decide a request's route with the profile's scheduler, then carry the decision out.

    decide() ─► Decision ─► execute() ─► pick ─ breaker admits? ─attempt─► first output ─► EngineRun
                                           │        │ failure before output: classify (retry.py)
                                           │        ├─ retry    same route, after Retry-After,
                                           │        │           within the retry budget
                                           │        ├─ fallback next of the decision's fallbacks
                                           │        └─ fail     the client's error (a 4xx)
                                           └─ every attempt, its outcome and the breaker it left
                                              are recorded with the decision (``routing/store.py``)

``decide`` and ``execute`` are two calls so that the caller (the request pipeline) can start work
that needs only the decision (the reuse lookup of the prompt's prefix) while the route runs; the
dispatcher never calls back up. ``execute`` returns what happened (an ``EngineRun``) or raises the
client's error. A half-open breaker lets one probe through at a time: the pick takes the probe
before it is sent (``breaker.admit``), and a concurrent request falls back.

BYOC picks go to the engine client of that replica; managed and BYOK picks go to the provider
(``providers/engine_client.py``) with Zumik's key from the environment or the tenant's own key.
Before content of a state object (``RouteContext.sources``) goes to a provider, the send is
recorded (``routing/reach.py``), so a purge of the object can name that provider's retention.

A decision's ``request_digest`` is an HMAC of the prompt under the tenant's cache salt: it ties
requests with one prompt together (ties, replay) but confirms no guess of the prompt to anyone
without the server's salt secret. The prompt's prefix family (``routing/family.py``) is what its
escalation evidence is read by and what the provider's ``prompt_cache_key`` is derived from (a
client's own key is kept, namespaced inside its tenant).

Fault domains: a BYOK route's breaker and retry budget are the tenant's own (its key is the
tenant's: one tenant's revoked key opens the route for that tenant only); every other route's are
shared, and move only on what says something of the route itself (5xx, timeouts, connection
errors, a refused managed key), never on a client error.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvstore.keys import scope_id
from profiles.model import RouteKind
from zumik_serve.engines.chat_prompt import content_texts
from zumik_serve.engines.protocol import (
    EngineCall,
    EngineChunks,
    EngineClient,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
    parse_stream_error,
)
from zumik_serve.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    ZumikError,
)
from zumik_serve.ids import DecisionId, new_decision_id
from zumik_serve.providers.engine_client import ProviderEngineClient
from zumik_serve.providers.hints import NO_HINTS, ProviderHints
from zumik_serve.providers.openai_http import OpenAICompatProvider
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.routing.decision import NO_EVIDENCE, DecisionRecord, Evidence, Pick
from zumik_serve.routing.family import PrefixFamily, prefix_family, provider_cache_key
from zumik_serve.routing.reach import ProviderReach, ReachSink
from zumik_serve.routing.retry import Attempt, AttemptOutcome, RetryAction, RetryBudget, classify
from zumik_serve.routing.scheduler import ProfileScheduler, SchedulingRequest

logger = logging.getLogger("ray.serve")

PROBE_OUT = "breaker half open: its probe is in flight"
MAX_TENANT_BUDGETS = 10_000  # per-tenant BYOK retry budgets kept (least recently used dropped)


class DecisionSink(Protocol):
    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        """Record the decision; ``sources``: the state objects whose content its prompt carried;
        ``settlement``: the request's rate settlement, written in the same step (None: none)."""
        ...


class DecisionMetrics(Protocol):
    def observe(self, *, route: str, reason: str, decide_us: float) -> None: ...

    def chat_keys(self, kind: str) -> None:
        """A chat prompt was keyed as ``kind`` (``scheduler.ENGINE_KEYS`` or a fallback's
        reason)."""
        ...


@dataclass(frozen=True)
class RouteContext:
    """What a request brings to its decision besides the body."""

    release_id: str | None = None
    allowed_routes: frozenset[str] | None = None
    snapshot_id: str | None = None
    evidence: Evidence = NO_EVIDENCE
    qos: str = "standard"
    prefer_cheapest: bool = False  # the class takes the cheapest healthy route
    engine_priority: int | None = None  # vLLM priority on BYOC engines (None: not sent)
    sources: tuple[str, ...] = ()  # state objects whose content the prompt carries (purgeable)
    hints: ProviderHints = NO_HINTS  # provider hints; the client's prompt_cache_key is kept, namespaced


@dataclass(frozen=True)
class PromptView:
    """A request's prompt as routing sees it: stable text and its prefix family (computed once,
    before the decision, so that the family's evidence can be read first)."""

    text: str
    family: PrefixFamily


@dataclass(frozen=True)
class Decision:
    """A decided request, not yet carried out: the record, the prompt's prefix keys and the
    isolation scope of its cache salt (what the reuse accounting looks the prefix up by).
    ``prefix_keys`` is a ``PromptKeys``: computed as far as the decision read them, the rest
    when first read in full (after the call is handed on, or by the reuse accounting)."""

    record: DecisionRecord
    prefix_keys: Sequence[str]
    scope: str
    decide_ms: float
    family: str = ""  # the prompt's prefix family (``routing/family.py``)
    # The prompt's text is all the engine tokenizes but template markup (``_text_is_prompt``):
    # its bytes' share measures a prefix's tokens (``PromptKeys.prefix_tokens``).
    text_is_prompt: bool = False

    @property
    def decision_id(self) -> DecisionId:
        return DecisionId(self.record.decision_id)


@dataclass
class EngineRun:
    """A started call whose first output is known to be good (errors were raised before)."""

    decision_id: DecisionId
    replica_id: str
    first: EngineResponse | EngineChunks
    rest: AsyncIterator[EngineEvent]
    route_label: str | None = None  # x-zumik-route: byoc:<replica>, managed:<route>, byok:<route>
    route_name: str = "local"  # the profile's route that served it
    route_kind: str = "byoc"
    scope: str = ""  # the isolation scope of the request's cache salt (``kvstore.keys.scope_id``)
    prefix_keys: Sequence[str] = ()  # the scheduler's prefix keys of the prompt
    timing_ms: dict[str, float] | None = None  # where the time went before the first output
    recording: asyncio.Future[None] | None = None  # the decision record's save (``execute``)
    # Starts the save when ``execute(..., defer_record=True)`` left that to the caller.
    saver: Callable[[RateSettlement | None], asyncio.Future[None]] | None = field(default=None, repr=False)

    def start_recording(self, settlement: RateSettlement | None = None) -> None:
        """Start the decision record's save, unless it has started (``execute`` starts it unless
        ``defer_record``); ``settlement``: the request's rate settlement, written in the same
        step, so a whole answer's record and settlement cost one round trip."""
        if self.recording is None and self.saver is not None:
            self.recording = self.saver(settlement)

    async def recorded(self) -> None:
        """Wait for the decision record's save (started now if it has not been) and raise its
        failure. A caller cancelled meanwhile (a deadline, a client gone) leaves the save
        running to its end."""
        self.start_recording()
        if self.recording is not None:
            await asyncio.shield(self.recording)

    @property
    def route(self) -> str:
        return self.route_label or f"byoc:{self.replica_id}"

    def kv_report(self) -> dict[str, Any] | None:
        """What the engine's KV connector says this request got from caches (``zumik_kv`` of
        ``kvstore/connector.py``): BYOC, non-streamed answers only; None otherwise."""
        if self.route_kind != "byoc" or not isinstance(self.first, EngineResponse):
            return None
        params = self.first.body.get("kv_transfer_params")
        report = params.get("zumik_kv") if isinstance(params, dict) else None
        return report if isinstance(report, dict) else None

    def restore_timing(self) -> tuple[float, str] | None:
        """The tier restore of this request for ``Server-Timing``: (ms, description)."""
        report = self.kv_report()
        tiers = report.get("tiers") if report is not None else None
        if report is None or not isinstance(tiers, dict) or not any(tiers.values()):
            return None
        parts = [f"{tier} {tokens} tokens" for tier, tokens in sorted(tiers.items()) if tokens]
        if isinstance(report.get("bytes"), int):
            parts.append(f"{report['bytes']} bytes")
        ms = report.get("ms")
        return (float(ms) if isinstance(ms, int | float) else 0.0), ", ".join(parts)


class Dispatcher:
    def __init__(
        self,
        scheduler: ProfileScheduler,
        *,
        engines: dict[str, EngineClient],
        decisions: DecisionSink,
        byok_key: Callable[[str, str], Awaitable[str | None]] | None = None,
        reach: ReachSink | None = None,
        metrics: DecisionMetrics | None = None,
        environ: dict[str, str] | None = None,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.scheduler = scheduler
        self._engines = engines
        self._decisions = decisions
        self._byok_key = byok_key
        self._reach = reach
        self._metrics = metrics
        self._environ = os.environ if environ is None else environ
        self._clock_ms = clock_ms
        self._sleep = sleep
        self._providers: dict[str, OpenAICompatProvider] = {}
        self._tenant_budgets: dict[tuple[str, str], RetryBudget] = {}  # (tenant, byok route)
        for route in scheduler.routes.values():
            if route.kind is not RouteKind.BYOC and route.base_url:
                self._providers[route.name] = OpenAICompatProvider(
                    route.name, route.base_url, timeout_s=route.timeout_s
                )

    def count_chat_keys(self, kind: str) -> None:
        """A chat prompt was keyed as ``kind``: counted by the scheduler and in the metrics."""
        self.scheduler.count_chat_keys(kind)
        if self._metrics is not None:
            self._metrics.chat_keys(kind)

    def prompt(self, call: EngineCall, engine_body: dict[str, Any], *, salt: str) -> PromptView:
        """The prompt's stable text and prefix family in the tenant's scope (no I/O)."""
        text = _prompt_text(call, engine_body)
        return PromptView(text, prefix_family(salt, text))

    def decide(
        self, call: EngineCall, engine_body: dict[str, Any], *, tenant: str, salt: str, context: RouteContext,
        prompt: PromptView | None = None, prompt_token_ids: Sequence[int] | None = None,
    ) -> Decision:  # fmt: skip
        """The route of one request, as a recorded decision (no I/O). ``prompt``: ``prompt()``
        of this body, when the caller already has it; ``prompt_token_ids``: the token ids the
        engine will build from a chat body (its prefix keys are then the engine's own)."""
        started = time.perf_counter()
        view = prompt if prompt is not None else self.prompt(call, engine_body, salt=salt)
        prompt_text = view.text
        request = SchedulingRequest(
            tenant=tenant, cache_salt=salt, prompt_text=prompt_text,
            expected_output_tokens=_max_tokens(engine_body),
            request_digest=prompt_digest(salt, prompt_text),
            release_id=context.release_id, snapshot_id=context.snapshot_id,
            allowed_routes=context.allowed_routes, evidence=context.evidence,
            qos=context.qos, prefer_cheapest=context.prefer_cheapest,
            prompt_token_ids=_token_ids(call, engine_body) if prompt_token_ids is None else prompt_token_ids,
        )  # fmt: skip
        record, keys = self.scheduler.decide(
            new_decision_id(), request, now_ms=self._clock_ms(), seed=secrets.randbits(31)
        )
        decide_ms = (time.perf_counter() - started) * 1000
        if self._metrics is not None:
            route = record.pick.route if record.pick is not None else "none"
            self._metrics.observe(route=route, reason=record.pick_reason, decide_us=decide_ms * 1000)
        return Decision(
            record=record, prefix_keys=keys, scope=scope_id(salt), decide_ms=decide_ms,
            family=view.family, text_is_prompt=_text_is_prompt(call, engine_body),
        )  # fmt: skip

    async def execute(
        self, decision: Decision, call: EngineCall, engine_body: dict[str, Any], *, stream: bool,
        tenant: str, salt: str, context: RouteContext, defer_record: bool = False,
    ) -> EngineRun:  # fmt: skip
        """Carry ``decision`` out: the first route that gives a first output, or the client's
        error. The decision and every attempt are recorded either way: before the error is
        raised, and before the run is returned; with ``defer_record`` the run is returned with
        its save not started: the caller starts it at once (``run.start_recording``, with the
        request's rate settlement when it has one), does its own work after the first output
        meanwhile, and awaits ``run.recorded()`` before it answers (the decision id it answers
        with is then readable, and a failed save fails the request as it would here).
        ``timing_ms["record"]`` is the save's own time either way."""
        started = time.perf_counter()
        attempts: list[Attempt] = []
        timing: dict[str, float] = {"decide": decision.decide_ms}
        try:
            run = await self._execute(
                decision, call, engine_body, stream, tenant, salt, attempts, context,
            )  # fmt: skip
        except BaseException:
            await asyncio.shield(self._record(tenant, decision, attempts, context, timing))
            raise
        timing["first-output"] = (time.perf_counter() - started) * 1000
        run.timing_ms = timing
        run.saver = functools.partial(self._record, tenant, decision, attempts, context, timing)
        if not defer_record:
            await run.recorded()
        return run

    def _record(
        self, tenant: str, decision: Decision, attempts: Sequence[Attempt], context: RouteContext,
        timing: dict[str, float], settlement: RateSettlement | None = None,
    ) -> asyncio.Future[None]:  # fmt: skip
        """The decision's save (with ``settlement``, see ``DecisionSink``), started now; it runs
        to its end even when whoever awaits it is cancelled (its failure is logged then).
        ``timing["record"]``: its own time."""

        async def save() -> None:
            saved = time.perf_counter()
            try:
                await self._decisions.save(
                    tenant, decision.record, attempts, context.sources, settlement=settlement
                )
            finally:
                timing["record"] = (time.perf_counter() - saved) * 1000

        saving = asyncio.ensure_future(save())
        saving.add_done_callback(_retrieve)
        return saving

    async def start(
        self, call: EngineCall, engine_body: dict[str, Any], *, stream: bool, tenant: str, salt: str,
        context: RouteContext,
    ) -> EngineRun:  # fmt: skip
        """``decide`` then ``execute``."""
        decision = self.decide(call, engine_body, tenant=tenant, salt=salt, context=context)
        return await self.execute(
            decision, call, engine_body, stream=stream, tenant=tenant, salt=salt, context=context
        )

    async def _send(
        self, pick: Pick, keys: Sequence[str], attempt: Coroutine[Any, Any, FirstOutput], prefill_tokens: int
    ) -> FirstOutput:
        """Run ``attempt`` (one call of ``pick``) to its first output, the pick in flight from
        before it starts and its ``prefill_tokens`` owed by the replica until then. The prompt's
        keys are recorded as sent to the replica once its first step has handed the call on (a
        Serve handle's ``.remote()``): what the decision did not read of them is hashed then,
        not before the call leaves. A decision between the two sees the load but not the keys
        (a worse pick at worst, never a wrong answer)."""
        self.scheduler.started(pick, prefill_tokens)
        if pick.replica is None:  # a provider's route: no residency to record
            return await attempt
        try:
            call = asyncio.ensure_future(attempt)
            try:
                await asyncio.sleep(0)  # the call's first step runs
                self.scheduler.record_sent(pick, keys)
            except BaseException:
                call.cancel()
                raise
            return await call
        finally:
            self.scheduler.prefilled(pick, prefill_tokens)

    async def _execute(
        self, decision: Decision, call: EngineCall, engine_body: dict[str, Any], stream: bool, tenant: str,
        salt: str, attempts: list[Attempt], context: RouteContext,
    ) -> EngineRun:  # fmt: skip
        record, keys = decision.record, decision.prefix_keys
        client_key = context.hints.prompt_cache_key
        cache_key = provider_cache_key(salt, family=decision.family, client_key=client_key)
        engine_priority = context.engine_priority
        picks = ([record.pick] if record.pick is not None else []) + list(record.fallbacks)
        if not picks:
            raise EngineError(
                "Every route of this profile is unavailable right now (circuit breakers open). Retry "
                "in a few seconds.",
                status=503,
                retry_after_s=self.scheduler.profile.routing.breaker.cooldown_s,
            )
        last_error: ZumikError | None = None
        saturated = 0
        for pick in picks:
            route = self.scheduler.route(pick.route)
            if self.scheduler.route_full(pick.route):
                saturated += 1
                attempts.append(_attempt(pick, 1, "saturated", None, "fallback", "route at max_inflight"))
                continue
            if not self.scheduler.admit(pick, self._clock_ms(), tenant):
                attempts.append(_attempt(pick, 1, "skipped", None, "fallback", PROBE_OUT))
                continue
            body = engine_body
            if route.kind is RouteKind.BYOC and engine_priority is not None:
                body = {**engine_body, "priority": engine_priority}
            if route.kind is RouteKind.BYOK:
                self._tenant_budget_request(tenant, route.name)
            attempt = 0
            while True:
                attempt += 1
                if attempt > 1 and self.scheduler.breaker_open(pick, self._clock_ms(), tenant):
                    attempts.append(_attempt(pick, attempt, "skipped", None, "fallback", "breaker open"))
                    break
                client = await self._client(pick, tenant, cache_key, salt, context.hints)
                if client is None:
                    attempts.append(_attempt(pick, attempt, "skipped", None, "fallback", "no api key"))
                    break
                # The tenant's content leaves for a provider: recorded first, for the receipts of
                # a purge of its objects and of a deletion of the tenant (a dispatcher wired
                # without a reach sink, in tests, can send only content of no object).
                if route.kind is not RouteKind.BYOC and (context.sources or self._reach is not None):
                    try:
                        await self.record_sent(tenant, context.sources, route.name)
                    except BaseException:  # not sent: a probe it held goes back
                        self.scheduler.release_probe(pick, tenant)
                        raise
                result = await self._send(
                    pick, keys, _first_output(client, call, body, stream), record.prefill_tokens(pick)
                )
                now_ms = self._clock_ms()
                if isinstance(result, tuple):
                    replica_id, first, rest = result
                    breaker = self.scheduler.succeeded(pick, now_ms, tenant)
                    attempts.append(_attempt(pick, attempt, "ok", None, "done", "", breaker.state.value))
                    if not stream:  # the whole answer is here: the replica is done with it
                        self.scheduler.finished(pick)
                    return EngineRun(
                        decision_id=record.decision_id,  # type: ignore[arg-type]
                        replica_id=replica_id,
                        first=first,
                        rest=self._finishing(pick, rest) if stream else rest,
                        route_label=_route_label(route.kind, route.name, replica_id),
                        route_name=route.name,
                        route_kind=route.kind.value,
                        scope=scope_id(salt),
                        prefix_keys=keys,
                    )
                self.scheduler.finished(pick)
                failure = result
                outcome = _outcome(failure)
                verdict = classify(
                    outcome,
                    attempt=attempt,
                    max_retries=route.max_retries,
                    retry_after_s=failure.retry_after_s,
                )
                breaker_state = None
                if verdict.counts_as_failure:
                    breaker_state = self.scheduler.failed(pick, now_ms, tenant, outcome).state.value
                else:  # not the route's fault: a half-open probe it held is given back
                    self.scheduler.release_probe(pick, tenant)
                action = verdict.action
                if action is RetryAction.RETRY and not self._allow_retry(
                    route.kind, tenant, route.name, now_ms
                ):
                    action = RetryAction.FALLBACK
                attempts.append(_attempt(
                    pick, attempt, outcome.value, failure.status, action.value, verdict.reason, breaker_state
                ))  # fmt: skip
                last_error = error_for_failure(failure, call)
                if action is RetryAction.FAIL:
                    raise last_error
                if action is RetryAction.RETRY:
                    await self._sleep(verdict.delay_ms / 1000)
                    continue
                break
        if saturated and last_error is None:
            raise OverloadedError(
                "Every route this request may take has as many requests as its profile allows "
                f"(max_inflight). Retry after {self.scheduler.profile.qos.retry_after_s} s.",
                retry_after_s=self.scheduler.profile.qos.retry_after_s,
            )
        last = last_error.message if last_error is not None else "no route had a key"
        status = last_error.status if last_error is not None and last_error.status >= 500 else 503
        raise EngineError(
            f"No route could take the request; the last one said: {last} Retry in a few seconds; GET "
            f"/v2/decisions/{record.decision_id} shows every attempt.",
            status=status,
            retry_after_s=2,
        )

    def _tenant_budget_request(self, tenant: str, route: str) -> None:
        key = (tenant, route)
        budget = self._tenant_budgets.pop(key, None) or RetryBudget(ratio=self.scheduler.budget.ratio)
        self._tenant_budgets[key] = budget.record_request(self._clock_ms())
        if len(self._tenant_budgets) > MAX_TENANT_BUDGETS:
            del self._tenant_budgets[next(iter(self._tenant_budgets))]

    def _allow_retry(self, kind: RouteKind, tenant: str, route: str, now_ms: int) -> bool:
        """One more attempt within the retry budget: a BYOK route's is the tenant's own for that
        route (its failures are its key's), every other route's is the profile's."""
        if kind is not RouteKind.BYOK:
            return self.scheduler.allow_retry(now_ms)
        budget = self._tenant_budgets.get((tenant, route)) or RetryBudget(ratio=self.scheduler.budget.ratio)
        if not budget.allow(now_ms):
            return False
        self._tenant_budgets[(tenant, route)] = budget.record_retry(now_ms)
        return True

    def tenant_budget(self, tenant: str, route: str) -> RetryBudget | None:
        """The tenant's retry budget of BYOK route ``route`` (None: it sent nothing there)."""
        return self._tenant_budgets.get((tenant, route))

    async def _client(
        self, pick: Pick, tenant: str, cache_key: str, salt: str, hints: ProviderHints
    ) -> EngineClient | None:
        route = self.scheduler.route(pick.route)
        if route.kind is RouteKind.BYOC:
            return self._engines[pick.replica or ""]
        if route.kind is RouteKind.MANAGED:
            api_key = self._environ.get(route.api_key_env or "")
        else:
            api_key = await self._byok_key(tenant, route.name) if self._byok_key else None
        if not api_key:
            return None
        managed = route.kind is RouteKind.MANAGED
        return ProviderEngineClient(
            self._providers[route.name], label=route.name, model=route.model or "",
            api_key=api_key, prompt_cache_key=cache_key,
            user_salt=salt if managed else None,  # BYOK: the tenant's account
            hints=hints.for_route(managed=managed, retention_days=route.provider_retention_days()),
        )  # fmt: skip

    async def record_sent(self, tenant: str, sources: tuple[str, ...], route_name: str) -> None:
        """Record, before it is sent, that content of ``sources`` goes to a provider route;
        ``NotFoundError`` (nothing sent) when one of them was revoked or purged meanwhile."""
        if self._reach is None:
            raise RuntimeError("a provider route needs a reach sink to send a state object's content")
        route = self.scheduler.route(route_name)
        reach = ProviderReach(
            route=route.name, kind=route.kind.value, retention_days=route.provider_retention_days(),
            last_sent_at_s=self._clock_ms() // 1000,
        )  # fmt: skip
        await self._reach.sent(tenant, sources, reach)

    async def _finishing(self, pick: Pick, rest: AsyncIterator[EngineEvent]) -> AsyncIterator[EngineEvent]:
        try:
            async for event in rest:
                yield event
        finally:
            self.scheduler.finished(pick)

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


def _retrieve(future: asyncio.Future[None]) -> None:
    """A save's failure, logged: whoever waits for it raises it too, but a caller cancelled
    before it waits (a deadline, a client gone) never does."""
    if not future.cancelled() and future.exception() is not None:
        logger.warning("zumik: a decision record could not be saved: %r", future.exception())


FirstOutput = tuple[str, Any, AsyncIterator[EngineEvent]] | EngineFailure
_RAISED_KINDS: set[type[BaseException]] = set()  # what engine calls raised in this process (logged)


async def _first_output(
    client: EngineClient, call: EngineCall, body: dict[str, Any], stream: bool
) -> FirstOutput:
    """The first output of one attempt, or the failure that came before any."""
    replica_id = "unknown"
    try:
        events = aiter(client.generate(call, body)) if stream else _iterate(await client.complete(call, body))
        async for event in events:
            if isinstance(event, ReplicaAssigned):
                replica_id = event.replica_id
                continue
            if isinstance(event, EngineFailure):
                return event
            if isinstance(event, EngineChunks):
                failure = _stream_starts_with_error(event)
                if failure is not None:
                    return failure
            return replica_id, event, events
    except Exception as exc:  # the replica is gone or the handle broke
        # With its traceback the first time a kind is seen in this process (a fault of the
        # client's own code would otherwise pass for an outage), then a line: not a traceback
        # for every request of an outage.
        first = type(exc) not in _RAISED_KINDS
        _RAISED_KINDS.add(type(exc))
        logger.warning("zumik: an engine call raised before any output: %r", exc, exc_info=first)
        return EngineFailure(503, f"the engine replica is unreachable ({type(exc).__name__})",
                             outcome=AttemptOutcome.CONNECT_ERROR.value)  # fmt: skip
    return EngineFailure(
        502, "the route ended the call without output", outcome=AttemptOutcome.SERVER_ERROR.value
    )


async def _iterate(events: list[EngineEvent]) -> AsyncIterator[EngineEvent]:
    for event in events:
        yield event


def _stream_starts_with_error(event: EngineChunks) -> EngineFailure | None:
    for payload in event.payloads:
        error = parse_stream_error(payload)
        if error is not None:
            code = error.get("code")
            return EngineFailure(
                status=int(code) if isinstance(code, int) else 500,
                message=str(error.get("message") or "engine failure"),
                type=str(error.get("type") or "server_error"),
                param=error.get("param"),
            )
        if payload and payload != "[DONE]":
            return None
    return None


def _outcome(failure: EngineFailure) -> AttemptOutcome:
    if failure.outcome is not None:
        return AttemptOutcome(failure.outcome)
    if failure.status == 429:
        return AttemptOutcome.RATE_LIMITED
    if failure.status in (408, 504):
        return AttemptOutcome.TIMEOUT
    if 400 <= failure.status < 500:
        return AttemptOutcome.CLIENT_ERROR
    return AttemptOutcome.SERVER_ERROR


def _attempt(
    pick: Pick, attempt: int, outcome: str, status: int | None, action: str, reason: str,
    breaker: str | None = None,
) -> Attempt:  # fmt: skip
    return Attempt(pick.route, pick.replica, attempt, outcome, status, action, reason, breaker)


def _route_label(kind: RouteKind, name: str, replica_id: str) -> str:
    if kind is RouteKind.BYOC:
        return f"byoc:{replica_id}"
    return f"{kind.value}:{name}"


def prompt_digest(salt: str, prompt_text: str) -> str:
    """The recorded digest of a prompt: HMAC-SHA256 under the tenant's cache salt, 32 hex
    characters. The salt is itself an HMAC of the server's secret (``tenancy/tenant.py``), so
    only the server can tell which prompt a digest stands for."""
    return hmac.new(salt.encode(), prompt_text.encode(), hashlib.sha256).hexdigest()[:32]


def _prompt_text(call: EngineCall, body: dict[str, Any]) -> str:
    """The prompt as stable text: what repeats across requests repeats here too, in order."""
    if call is EngineCall.CHAT:
        messages = body.get("messages", [])
        return "".join(json.dumps(message, sort_keys=True, ensure_ascii=False) for message in messages)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def _text_is_prompt(call: EngineCall, body: dict[str, Any]) -> bool:
    """Whether ``_prompt_text`` holds all the engine tokenizes but its chat template's markup:
    a text completion prompt, or a chat without tools (rendered into the prompt, absent from the
    text) whose every content is text (``content_texts``, as the chat keys read it: a media
    part's base64 is in the text, a fixed count of tokens in the prompt)."""
    if call is EngineCall.COMPLETION:
        return isinstance(body.get("prompt"), str)
    if body.get("tools") or body.get("functions"):
        return False
    return all(
        content_texts(message.get("content") if isinstance(message, dict) else None) is not None
        for message in body.get("messages") or ()
    )


def _token_ids(call: EngineCall, body: dict[str, Any]) -> list[int] | None:
    """A completion prompt given as token ids (the engine's own block hashes key it then)."""
    prompt = body.get("prompt") if call is EngineCall.COMPLETION else None
    if isinstance(prompt, list) and prompt and all(type(token) is int for token in prompt):
        return prompt
    return None


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    return value if isinstance(value, int) and value > 0 else 16


def error_for_failure(failure: EngineFailure, call: EngineCall) -> ZumikError:
    """Map an engine failure (before any output) to the error a client sees."""
    message = failure.message
    lowered = message.lower()
    if failure.status == 400 and (
        "context length" in lowered or "maximum model length" in lowered or "max_model_len" in lowered
    ):
        param = "messages" if call is EngineCall.CHAT else "prompt"
        return ContextLengthExceededError(f"{message} Shorten the {param} or lower max_tokens.", param=param)
    if 400 <= failure.status < 500:
        return InvalidRequestError(message, param=failure.param, status=failure.status)
    return EngineError(
        f"The engine failed before producing output ({message}). Retry the request; if it "
        "keeps failing, check the server logs.",
        status=failure.status if failure.status >= 500 else 500,
    )
