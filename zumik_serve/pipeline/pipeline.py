"""Pipeline: the one owner of a generation request, from admission to telemetry.

    surface (api/v1, api/v2) ── parse ──► GenerationRequest
      admit()     QoS class, deadline, a slot of the class and the tenant's share of it (429
                  when full); after the body is read, so a slow upload holds no slot
      run()       within the request's deadline:
        ├─ limits      n, max_tokens, message and prompt counts (400 naming the parameter)
        ├─ release     the model names an alias (or the served model, published on first use);
        │              the tenant's salt epoch is read in the same round trip (never cached: a
        │              purge moves it on), its cache salt derived once the state is resolved;
        │              a /v1 request without state objects takes its rate admission in it too
        ├─ state       snapshot messages first; a session checked live; /v2: tokenized here
        ├─ rate        the tenant's requests and tokens per minute (429 with Retry-After), for
        │              the requests that did not take it with the release
        │  ║ evidence  what the reuse ledger recorded for the tenant and the prompt's prefix
        │              family (escalation), read at most once per EVIDENCE_TTL_S per family
        ├─ decide      Dispatcher.decide → Decision (recorded inputs, replayable)
        ├─ accounting  the prefix's opportunity lookup starts, running while the engine works
        ├─ dispatch    Dispatcher.execute → EngineRun (first output) or the client's error (its
        │              decision saved first); the decision's save starts at the first output
        ├─ a stream: the save ║ the opportunity (for the headers), both awaited
        └─ a whole answer: the save, which writes the rate settlement in the same script ║
           figures ║ session exchange, all awaited (the first failure raised, the save's
           first); span
      events()    a stream's events within the deadline
      finish()    a stream's end: settlement ║ figures ║ session exchange, then the span
      sent()      the surface has sent the answer: the reuse ledger's write starts (it counts
                  the answer, nobody waits for it; ``pipeline/accounting.py``)
    surface ◄── Generation (typed outcome) ── render

(``║``: side by side, each its own Redis round trip.) A generation is returned only once its
decision is saved, so the decision id it answers with is readable at ``/v2/decisions/{id}``; a
request cancelled meanwhile (its deadline) leaves the save running, and waits for it.

Surfaces own the admission's slot (taken once the body is read, given back when the response
is done) and the wire format; everything between is here. Nothing here imports a web framework
or a Redis client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvstore.keys import scope_id
from kvstore.tier import BlockAddress
from profiles.model import RouteKind, group_served_names
from zumik_serve.engines.chat_prompt import ChatFallback
from zumik_serve.engines.protocol import EngineCall, EngineEvent
from zumik_serve.errors import (
    AuthenticationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitExceededError,
    StoreUnavailableError,
)
from zumik_serve.pipeline.accounting import RequestAccounting
from zumik_serve.pipeline.context import GatewayContext
from zumik_serve.pipeline.limits import check_generation_limits, check_media_urls
from zumik_serve.pipeline.request import (
    Admission,
    Completion,
    Generation,
    GenerationRequest,
    StateRefs,
    Surface,
)
from zumik_serve.qos.admission import choose_class
from zumik_serve.qos.deadline import Deadline, exceeded
from zumik_serve.qos.quota import RateReservation, RateSettlement, reserved_tokens, used_tokens
from zumik_serve.reuse.evidence import EvidenceLevel
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.routing.decision import NO_EVIDENCE, Evidence
from zumik_serve.routing.dispatch import RouteContext
from zumik_serve.routing.release import Release
from zumik_serve.routing.scheduler import ENGINE_KEYS
from zumik_serve.routing.service import RequestRelease
from zumik_serve.state.compiler import CompiledSnapshot
from zumik_serve.state.objects import TurnRole
from zumik_serve.state.requests import AppendTurn, message_text
from zumik_serve.store.client import guard
from zumik_serve.store.kv_probe import KvProbe
from zumik_serve.telemetry.tracing import RequestClock, request_phases
from zumik_serve.tenancy.tenant import Tenant

if TYPE_CHECKING:
    from zumik_serve.qos.store import RateAdmission

logger = logging.getLogger("ray.serve")

EVIDENCE_TTL_S = 2.0  # how long a tenant's escalation evidence is reused before it is read again


@dataclass(frozen=True)
class EarlyAdmission:
    """A request's rate admission to take with its release lookup (``Pipeline._early_admission``):
    its scope is the one of ``salt``, the tenant's salt at ``epoch``."""

    admission: RateAdmission
    epoch: int
    salt: str


@dataclass(frozen=True)
class Warmed:
    """A snapshot warmed: its generation, what it compiled to, and what the Redis tier holds."""

    generation: Generation
    num_tokens: int
    compiled: CompiledSnapshot
    compat_key: str | None
    block_size: int | None
    num_blocks: int | None
    persisted_redis_blocks: int | None


class Pipeline:
    def __init__(self, context: GatewayContext) -> None:
        self.context = context
        self._byoc_routes = frozenset(
            route.name for route in context.profile.effective_routes() if route.kind is RouteKind.BYOC
        )
        self._escalates = context.profile.routing.escalation.to != "none"
        self._first_group = frozenset(group_served_names(context.profile.model_groups()[0]))
        self._evidence: dict[tuple[str, str], tuple[float, Evidence]] = {}
        self._salt_epochs: dict[str, int] = {}  # a tenant's last salt epoch read (a guess only)
        self.evidence_ttl_s = EVIDENCE_TTL_S  # 0: read the ledger on every request (benches)
        # Every profile the gateway serves (``api/app.py`` sets it when it serves several).
        self.served_profiles: tuple[str, ...] = (context.profile.name,)

    # --- before the request runs: authenticate first, admit once the body is read ------------

    async def authenticate(self, authorization: str | None) -> Tenant:
        tenant = await self.context.authenticator.authenticate(authorization)
        if tenant is None:
            raise AuthenticationError(
                "Missing or invalid API key. Send 'Authorization: Bearer <key>'; create a key "
                "with `zumik tenant create NAME`."
            )
        return tenant

    async def admit(
        self, tenant: Tenant, *, qos: Any, timeout_s: Any, clock: RequestClock, qos_param: str = "qos",
        timeout_param: str = "timeout_s",
    ) -> Admission:  # fmt: skip
        """The request's class and deadline, checked, then a running slot of its class (or 429).
        The caller gives the slot back (``Admission.release``) when its response is done."""
        controller = self.context.admission
        if qos is not None and not isinstance(qos, str):
            raise InvalidRequestError(f"{qos_param} must be a string.", param=qos_param)
        chosen = choose_class(qos, tenant.qos_classes, controller.spec, param=qos_param)
        deadline = Deadline.parse(timeout_s, param=timeout_param, started=clock.started_monotonic)
        ticket = await controller.admit(chosen, tenant.id, deadline_s=deadline.left())
        clock.phases_ms["queue"] = ticket.queued_ms
        priority = controller.engine_priority(chosen) if self.context.priority_scheduling else None
        return Admission(chosen, deadline, ticket, priority, controller.prefers_cheapest(chosen))

    # --- the request -------------------------------------------------------------------------

    async def run(self, request: GenerationRequest) -> Generation:
        """Carry ``request`` to its first output (a whole answer unless streamed)."""
        return await request.admission.deadline.run(self._run(request))

    async def _run(self, request: GenerationRequest) -> Generation:
        ctx = self.context
        tenant = request.tenant
        self.check_profile(tenant, request.profile)
        check_generation_limits(request.body, ctx.limits)
        early = await self._early_admission(request)
        lookup_started = time.perf_counter()
        lookup = await self._release(tenant, request.model, pinned=request.refs.release, early=early)
        lookup_ms = (time.perf_counter() - lookup_started) * 1000
        admitted = lookup.admitted
        release = lookup.release
        model = release.model if release is not None else (request.model or ctx.models.default)
        if model not in ctx.models.ids:
            if isinstance(admitted, RateReservation):  # counted with the lookup: taken back
                await self._refund_rate(tenant, admitted)
            raise ModelNotFoundError(
                f"The model '{model}' does not exist or you do not have access to it. "
                "GET /v1/models lists the models you can use.",
                param="model",
            )
        if isinstance(admitted, RateLimitExceededError):
            raise admitted
        call, body, allowed = await self._resolve_state(request, model, release)
        if early is not None and lookup.salt_epoch == early.epoch:
            salt = early.salt
        else:  # the epoch this request read
            salt = await ctx.salts.at_epoch(tenant.id, lookup.salt_epoch)
        dispatcher = ctx.dispatcher_for(model)
        prompt = dispatcher.prompt(call, body, salt=salt)
        # The rate admission (unless taken with the lookup) and the escalation evidence (a read,
        # usually cached) side by side, and a chat prompt's engine token ids meanwhile; a
        # refusal is raised once all are done (the evidence and the ids never fail a request).
        reservation, evidence, chat_ids = await _all(
            self._admit_rate(tenant, body, salt) if admitted is None else None,
            self._escalation_evidence(tenant, prompt.family),
            self._engine_chat_ids(call, body, model, allowed),
        )
        if admitted is not None:
            reservation = admitted
        body["cache_salt"] = salt
        admission = request.admission
        route = RouteContext(
            release_id=release.id if release is not None else None,
            allowed_routes=allowed,
            snapshot_id=request.refs.snapshot,
            evidence=evidence,
            qos=admission.qos.value,
            prefer_cheapest=admission.prefer_cheapest,
            engine_priority=admission.engine_priority,
            sources=request.refs.sources(),
            hints=request.hints,
        )
        to_decide_ms = request.clock.elapsed_ms()
        decision = dispatcher.decide(
            call, body, tenant=tenant.id, salt=salt, context=route, prompt=prompt, prompt_token_ids=chat_ids
        )
        accounting = RequestAccounting(ctx.reuse if tenant.reuse_accounting else None, decision)
        # The decision's record is saved while the work after the first output runs (a whole
        # answer's rate settlement in the same script); both are awaited before the generation
        # is returned (the id it answers with is readable then).
        run = await dispatcher.execute(
            decision, call, body, stream=request.stream, tenant=tenant.id, salt=salt, context=route,
            defer_record=True,
        )  # fmt: skip
        generation = Generation(request, model, release, run, {}, {}, accounting)
        generation.rate_reservation = reservation
        try:
            if request.stream:  # the opportunity goes out in the headers, before the body
                run.start_recording()
                published = accounting.publish_opportunity()
                _, generation.opportunity_tokens = await _all(run.recorded(), published)
            else:
                answer = generation.answer
                completion = Completion(_reply(call, answer), answer.get("usage"))
                run.start_recording(RateSettlement.of(reservation, used_tokens(completion.usage)))
                generation.figures = await self._finish(generation, completion, recording=run.recorded())
        finally:
            await run.recorded()  # done by now, unless a step above failed: its save comes first
        generation.phases_ms, generation.phase_descriptions = request_phases(run, request.clock)
        # Where a request's time goes around the engine, in the app's own clock: the release
        # lookup's round trip, from the handler's start to the decision, to the answer ready.
        generation.phases_ms.update(
            {"lookup": lookup_ms, "to-decide": to_decide_ms, "in-app": request.clock.elapsed_ms()}
        )
        return generation

    async def events(self, generation: Generation) -> AsyncIterator[EngineEvent]:
        """A streamed generation's events, first to last, within the request's deadline; past
        it the engine's work is cancelled and ``DeadlineExceededError`` is raised."""
        deadline = generation.request.admission.deadline
        yield generation.run.first
        rest = aiter(generation.run.rest)
        while True:
            left = deadline.left()
            try:
                event = await (anext(rest) if left is None else asyncio.wait_for(anext(rest), left))
            except StopAsyncIteration:
                return
            except TimeoutError:  # the engine's work is cancelled with the wait
                raise exceeded() from None
            yield event

    async def finish(self, generation: Generation, completion: Completion) -> ReuseFigures | None:
        """A stream has ended with a finished choice: its figures, ledger, session and span."""
        generation.figures = await self._finish(generation, completion)
        return generation.figures

    async def sent(self, generation: Generation) -> None:
        """The surface has sent ``generation``'s answer (or its stream has ended): the work that
        only counts it (the reuse ledger) runs now, not while the answer waits."""
        generation.accounting.sent()

    async def carried(self, tenant: Tenant, generation: Generation, handles: tuple[str, ...]) -> None:
        """``handles`` now hold content that ``generation`` already sent (a Responses chain's
        session, created after the answer): when it went to a provider, that is recorded for
        them as for any source (``routing/reach.py``)."""
        run = generation.run
        if run.route_kind == RouteKind.BYOC.value or not handles:
            return
        dispatcher = self.context.dispatcher_for(generation.model)
        await dispatcher.record_sent(tenant.id, handles, run.route_name)

    def check_profile(self, tenant: Tenant, requested: str | None, *, param: str = "x-zumik-profile") -> None:
        """The profile a request runs on (``requested``, else the one served here) must be one
        the tenant may use (403 otherwise) and this pipeline's (404 when this deployment serves no
        such profile; ``api/deps.py`` hands a request for another served profile to its own)."""
        served = self.context.profile.name
        name = served if requested is None else requested
        if tenant.profiles is not None and name not in tenant.profiles:
            allowed = ", ".join(sorted(tenant.profiles)) or "none"
            raise PermissionDeniedError(
                f"Your tenant may not use profile {name!r}; it may use: {allowed}. Send {param} with one "
                "of them, or ask the operator to allow this profile for your tenant.",
                param=param,
            )
        if name != served:
            listed = ", ".join(repr(profile) for profile in self.served_profiles)
            raise NotFoundError(
                f"This deployment serves profile(s) {listed}, not {name!r}. Send {param} with one of "
                "them (GET /v2/profiles lists what is served), or call the deployment serving that profile.",
                param=param,
                code="profile_not_found",
            )

    # --- /v2/snapshots/{id}/warm -------------------------------------------------------------

    async def warm(self, tenant: Tenant, snapshot: str, admission: Admission) -> Warmed:
        """Compute a snapshot's KV once (a 1-token generation over its compiled tokens): the
        engine's KV connector stores its blocks in the profile's tiers, where any replica with
        the same compat key restores them, also after a restart."""
        ctx = self.context
        compiled = await ctx.state.store_call(
            ctx.state.compile_snapshot(tenant.id, snapshot, ctx.models.tokenizer())
        )
        token_ids = list(compiled.token_ids)
        body = {"prompt": token_ids, "max_tokens": 1, "temperature": 0}
        request = GenerationRequest(
            tenant=tenant, surface=Surface.WARM, call=EngineCall.COMPLETION, model=None, body=body,
            stream=False, refs=StateRefs(), admission=admission,
        )  # fmt: skip
        generation = await self.run(request)
        await self.sent(generation)  # nothing of it goes to the client
        probe = ctx.kv_probe
        if probe is None:
            return Warmed(generation, len(token_ids), compiled, None, None, None, None)
        report = generation.run.kv_report() or {}  # the engine's connector names its shard
        shard = report.get("shard") if isinstance(report.get("shard"), str) else None
        addresses = probe.addresses(token_ids, await ctx.salts.for_tenant(tenant.id), shard=shard)
        persisted = await _persisted(probe, addresses)
        return Warmed(
            generation, len(token_ids), compiled, probe.compat_digest, probe.block_size,
            len(addresses), persisted,
        )  # fmt: skip

    # --- steps -------------------------------------------------------------------------------

    async def _release(
        self, tenant: Tenant, model: str | None, *, pinned: str | None = None,
        early: EarlyAdmission | None = None,
    ) -> RequestRelease:  # fmt: skip
        """The release the request's ``model`` (an alias, or the served model) pins: the
        ``pinned`` one (a stored conversation's) while it is a release of that same alias, else
        the alias's current release; with the tenant's salt epoch, in one round trip, and the
        ``early`` rate admission in it when its epoch is the one read."""
        name = model if model is not None else self.context.models.default
        routing, state = self.context.routing, self.context.state
        lookup = await state.store_call(
            routing.release_for_request(
                tenant.id, name or None, pinned=pinned,
                admission=early.admission if early is not None else None,
                admission_epoch=early.epoch if early is not None else 0,
            )
        )  # fmt: skip
        if len(self._salt_epochs) > 10_000:
            self._salt_epochs.clear()
        self._salt_epochs[tenant.id] = lookup.salt_epoch
        return lookup

    async def _early_admission(self, request: GenerationRequest) -> EarlyAdmission | None:
        """The rate admission to take with the release lookup, in its round trip: only for a
        /v1 request with no state objects (its body, hence its reserved tokens, is known before
        it runs, and nothing read after the lookup can refuse it but an unknown model, which
        takes the admission back). Its KV scope is the one of the tenant's last salt epoch seen
        here (0 at first): a guess, which the lookup checks against the epoch it reads; when a
        purge has moved it on, the admission is taken on its own after the lookup."""
        quotas = self.context.quotas
        refs = request.refs
        if quotas is None or request.surface is not Surface.V1 or refs.snapshot is not None:
            return None
        if refs.session is not None:  # its check may refuse the request after the lookup
            return None
        tenant = request.tenant.id
        epoch = self._salt_epochs.get(tenant, 0)
        salt = await self.context.salts.at_epoch(tenant, epoch)
        tokens = reserved_tokens(request.body, self.context.limits.max_output_tokens)
        return EarlyAdmission(quotas.rate_admission(tenant, tokens=tokens, scope=scope_id(salt)), epoch, salt)

    async def _refund_rate(self, tenant: Tenant, reservation: RateReservation) -> None:
        """Take back an admission counted for a request refused after it; an outage keeps it."""
        quotas = self.context.quotas
        if quotas is None:
            return
        try:
            await guard(quotas.refund(tenant.id, reservation), what="quota store")
        except StoreUnavailableError:
            logger.warning("zumik: a refused request's rate admission kept (Redis unavailable)")

    async def _resolve_state(
        self, request: GenerationRequest, model: str, release: Release | None
    ) -> tuple[EngineCall, dict[str, Any], frozenset[str] | None]:
        """The engine call, its body and the routes that may take it, with the request's state
        objects resolved."""
        state, tenant = self.context.state, request.tenant.id
        allowed = frozenset(entry.name for entry in release.route_table) if release is not None else None
        if model != self.context.profile.model.served_name:
            # Another model group, or an adapter: only the engines that serve it can take it.
            allowed = None if model not in self._first_group else self._byoc_routes
        body: dict[str, Any] = {**request.body, "model": model}
        snapshot, session = request.refs.snapshot, request.refs.session
        if request.surface is Surface.V1:
            # The snapshot's read and the session's check side by side; the snapshot's error
            # first. Either may mark its object exposed though the other fails: a purge then
            # sweeps the engines' tiers for it too (more than needed, never less).
            prefix, _ = await _all(
                None if snapshot is None else state.store_call(state.snapshot_messages(tenant, snapshot)),
                None if session is None else state.store_call(state.use_session(tenant, session)),
            )
            if prefix is not None:  # a snapshot's message artifacts may hold media parts too
                check_media_urls(prefix, self.context.limits.media_hosts, param="snapshot messages")
                body["messages"] = [*prefix, *body["messages"]]
            return request.call, body, allowed
        # /v2 and warming send token ids of this deployment's own tokenizer: only its engines
        # (byoc routes) can take them.
        if model in self._first_group:  # another group has its own engines only
            allowed = self._byoc_routes if allowed is None else self._byoc_routes & allowed
        if request.surface is Surface.V2:
            messages: list[dict[str, Any]] = []
            if snapshot is not None:
                messages = list(await state.store_call(state.snapshot_messages(tenant, snapshot)))
            messages.extend(body.pop("messages", []))
            tokenizer = self.context.models.tokenizer(model)
            body["prompt"] = await state.tokenization.encode_chat(  # off the loop, size-capped
                tokenizer, messages, add_generation_prompt=True
            )
        return EngineCall.COMPLETION, body, allowed

    async def _engine_chat_ids(
        self, call: EngineCall, body: dict[str, Any], model: str, allowed: frozenset[str] | None
    ) -> list[int] | None:
        """The token ids the engine builds from a chat body, which key its prefix by the
        engine's own block hashes (``routing/scheduler.py``), when the group's engines report
        KV events and a BYOC route may take it; None: text keys (counted by reason)."""
        dispatcher = self.context.dispatcher_for(model)
        if call is not EngineCall.CHAT:
            return None
        if not dispatcher.scheduler.engine_events:  # text keys are all the engines' record needs
            dispatcher.count_chat_keys(ChatFallback.NO_EVENTS.value)
            return None
        if allowed is not None and not allowed & self._byoc_routes:
            return None
        ids: list[int] | ChatFallback = ChatFallback.ADAPTER
        if model == self.context.profile.model.served_name:  # an adapter's name is in its hashes
            models = self.context.models
            ids = await self.context.state.tokenization.engine_chat(lambda: models.tokenizer(model), body)
        dispatcher.count_chat_keys(ENGINE_KEYS if not isinstance(ids, ChatFallback) else ids.value)
        return None if isinstance(ids, ChatFallback) else ids

    async def _admit_rate(self, tenant: Tenant, body: Mapping[str, Any], salt: str) -> RateReservation | None:
        """Count the request and the tokens it may use in the tenant's per-minute window, shared
        by every gateway (429 with Retry-After past a limit); None: no quota store. The tenant's
        kv_bytes override reaches its cache scope (``salt``'s) on the way."""
        quotas = self.context.quotas
        if quotas is None:
            return None
        tokens = reserved_tokens(body, self.context.limits.max_output_tokens)
        admitted = quotas.admit_rate(tenant.id, tokens=tokens, scope=scope_id(salt))
        return await guard(admitted, what="quota store")

    async def _settle_rate(self, generation: Generation, usage: Mapping[str, Any] | None) -> None:
        """Replace the request's token reservation by the tokens the engine reports it used
        (kept as reserved when it reports none); an outage keeps the reservation."""
        quotas = self.context.quotas
        settlement = RateSettlement.of(generation.rate_reservation, used_tokens(usage))
        if quotas is None or settlement is None:
            return
        try:
            await guard(quotas.settle(generation.request.tenant.id, settlement), what="quota store")
        except StoreUnavailableError:
            logger.warning("zumik: token reservation kept (Redis unavailable)")

    async def _escalation_evidence(self, tenant: Tenant, family: str) -> Evidence:
        """What the reuse ledger recorded for this tenant and prefix family in the profile's
        window, read at most once per ``EVIDENCE_TTL_S`` per (tenant, family), so a busy family
        costs no Redis round trip per request; ``unknown`` when the profile never escalates (no
        read at all) or the ledger cannot be read."""
        if not self._escalates or not tenant.reuse_accounting:
            return NO_EVIDENCE
        key = (tenant.id, family)
        now = time.monotonic()
        cached = self._evidence.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        spec = self.context.profile.routing.escalation
        window_s, min_level = spec.window_s, EvidenceLevel.parse(spec.min_evidence)
        try:
            evidence = await guard(
                self.context.reuse.family_evidence(tenant.id, family, window_s=window_s, min_level=min_level),
                what="reuse ledger",
            )
        except StoreUnavailableError:
            logger.warning("zumik: escalation evidence unavailable; deciding on 'unknown'")
            evidence = NO_EVIDENCE
        if len(self._evidence) > 10_000:
            self._evidence.clear()
        self._evidence[key] = (now + self.evidence_ttl_s, evidence)
        return evidence

    async def _finish(
        self, generation: Generation, completion: Completion, *, recording: Awaitable[None] | None = None
    ) -> ReuseFigures | None:
        """The answer's rate settlement, reuse figures and session exchange, side by side, and
        the decision record's save when it is still under way (``recording``, which writes the
        settlement itself): all awaited, then the first failure raised, the save's first. Then
        the span."""
        request, run = generation.request, generation.run
        exchange = (
            self._record_exchange(request, completion.reply) if request.refs.session is not None else None
        )
        _, _, figures, _ = await _all(
            recording,
            self._settle_rate(generation, completion.usage) if recording is None else None,
            generation.accounting.figures(
                run, completion.usage, tenant=request.tenant.id, snapshot=request.refs.snapshot
            ),
            exchange,
        )
        self._emit_span(generation, figures)
        return figures

    async def _record_exchange(self, request: GenerationRequest, reply: str) -> None:
        """Record the exchange (the request's closing user/tool message, then the reply) on the
        session: in one step, and once per request body (a retried request adds nothing)."""
        state, session = self.context.state, request.refs.session
        assert session is not None
        turns: list[AppendTurn] = []
        messages = request.body.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, Mapping) and last.get("role") in (TurnRole.USER, TurnRole.TOOL):
            turns.append(AppendTurn(role=TurnRole(last["role"]), content=message_text(last)))
        turns.append(AppendTurn(role=TurnRole.ASSISTANT, content=reply))
        await state.store_call(state.record_exchange(request.tenant.id, session, turns, request.body))

    def _emit_span(self, generation: Generation, figures: ReuseFigures | None) -> None:
        tracing = self.context.tracing
        if not tracing.enabled:
            return
        request = generation.request
        attributes: dict[str, str | int | float | bool] = {
            "zumik.tenant": request.tenant.id,
            "zumik.qos": request.admission.qos.value,
            "zumik.surface": request.surface.value,
        }
        if generation.release is not None:
            attributes["zumik.release"] = generation.release.id
        if figures is not None:
            if figures.opportunity_level.label != "unknown":
                attributes["zumik.reuse_opportunity_tokens"] = figures.opportunity_tokens
            if figures.captured_tokens is not None:
                attributes["zumik.reuse_captured_tokens"] = figures.captured_tokens
        tracing.request(generation.run, request.clock, attributes)


async def _all(*steps: Awaitable[Any] | None) -> tuple[Any, ...]:
    """Run ``steps`` side by side (None: a step not taken, whose result is None) and wait for
    every one of them; then raise the first failure in the order given, else return the results
    in that order. A step never outlives the call that ran it, and a later step's failure never
    hides an earlier one's (as when they ran one after another, unless an earlier one failed)."""
    taken = [step for step in steps if step is not None]
    outcomes: list[Any] = []
    if taken:  # the last step runs in the caller's task: a lone step costs no task at all
        beside = [asyncio.ensure_future(step) for step in taken[:-1]]
        try:
            try:
                last = await taken[-1]
            except Exception as exc:
                last = exc
            outcomes = [*(await asyncio.gather(*beside, return_exceptions=True) if beside else ()), last]
        except BaseException:  # the caller is cancelled: so is every step still running
            for task in beside:
                task.cancel()
            raise
    taken_outcomes = iter(outcomes)
    results = [None if step is None else next(taken_outcomes) for step in steps]
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return tuple(results)


def _reply(call: EngineCall, answer: Mapping[str, Any]) -> str:
    """Choice 0's text of a whole answer (what a session records: a chat message's text and
    its tool calls, ``message_text``)."""
    choices = answer.get("choices") or []
    first = next((c for c in choices if isinstance(c, Mapping) and c.get("index", 0) == 0), None)
    if first is None:
        return ""
    if call is EngineCall.CHAT:
        message = first.get("message")
        return message_text(message) if isinstance(message, Mapping) else ""
    return str(first.get("text") or "")


WARM_PERSIST_WAIT_S = 10.0


async def _persisted(probe: KvProbe, addresses: Sequence[BlockAddress]) -> int | None:
    """How many of a warmed snapshot's blocks the Redis tier holds. The engine's connector
    stores write-behind (``kvstore/write_behind.py``): the generation returns before its
    blocks reach the tier, so this waits, up to ``WARM_PERSIST_WAIT_S``, for all of them."""
    deadline = asyncio.get_running_loop().time() + WARM_PERSIST_WAIT_S
    while True:
        persisted = await probe.count_in_redis(addresses)
        if persisted is None or persisted >= len(addresses) or asyncio.get_running_loop().time() >= deadline:
            return persisted
        await asyncio.sleep(0.05)
