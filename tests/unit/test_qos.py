"""QoS classes, admission, deadlines, input limits, the cheapest-route choice of batch, the capture
split by source and the request spans: the pure parts of issue #9 and #6, no server."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from profiles import load_builtin
from profiles.model import QosClass, QosClassSpec, QosSpec
from tests.unit.test_routing import PROMPT_TOKENS, ROUTES, make_inputs, make_replica
from zumik_serve.engines.protocol import EngineResponse
from zumik_serve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PermissionDeniedError,
)
from zumik_serve.pipeline.limits import GenerationLimits, check_generation_limits
from zumik_serve.qos.admission import AdmissionController, ClassGate, choose_class
from zumik_serve.qos.deadline import Deadline
from zumik_serve.reuse.figures import ReuseFigures, capture_sources
from zumik_serve.routing.decision import DecisionRecord, candidate_for_route, decide
from zumik_serve.routing.dispatch import EngineRun
from zumik_serve.routing.replay import replay
from zumik_serve.telemetry.tracing import RequestClock, Tracing, request_phases, telemetry_object

SPEC = QosSpec()


def gate(running: int = 2, queued: int = 2) -> ClassGate:
    return ClassGate(QosClass.BATCH, max_running=running, max_queued=queued, retry_after_s=3)


# --- class choice ------------------------------------------------------------------------------


def test_class_defaults_to_the_profile_default_and_takes_a_known_class() -> None:
    assert choose_class(None, None, SPEC, param="qos") is QosClass.STANDARD
    assert choose_class("batch", None, SPEC, param="qos") is QosClass.BATCH


def test_unknown_class_is_400_naming_the_parameter() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        choose_class("urgent", None, SPEC, param="x-zumik-qos")
    assert caught.value.param == "x-zumik-qos" and "interactive" in caught.value.message


def test_a_class_outside_the_tenant_policy_is_403_and_the_default_follows_the_policy() -> None:
    allowed = frozenset({"batch"})
    with pytest.raises(PermissionDeniedError) as caught:
        choose_class("interactive", allowed, SPEC, param="qos")
    assert caught.value.status == 403 and "batch" in caught.value.message
    assert choose_class(None, allowed, SPEC, param="qos") is QosClass.BATCH


# --- admission -----------------------------------------------------------------------------------


async def test_gate_admits_running_queues_then_rejects_with_retry_after() -> None:
    g = gate(running=2, queued=2)
    first, second = (
        await g.acquire("t", wait_s=5, deadline_bound=False),
        await g.acquire("t", wait_s=5, deadline_bound=False),
    )
    waiting = [asyncio.create_task(g.acquire("t", wait_s=5, deadline_bound=False)) for _ in range(2)]
    await asyncio.sleep(0)
    assert (g.running, g.queued) == (2, 2)
    started = time.perf_counter()
    with pytest.raises(OverloadedError) as caught:
        await g.acquire("t", wait_s=5, deadline_bound=False)
    assert caught.value.status == 429 and caught.value.retry_after_s == 3
    assert time.perf_counter() - started < 1.0  # refused without waiting (a hang detector)
    first.release()
    first.release()  # idempotent: the second release must not free a second slot
    third = await waiting[0]
    assert (g.running, g.queued) == (2, 1) and not waiting[1].done()
    second.release()
    fourth = await waiting[1]
    third.release()
    fourth.release()
    assert (g.running, g.queued) == (0, 0)


async def test_waiters_are_served_in_arrival_order() -> None:
    g = gate(running=1, queued=5)
    holder = await g.acquire("t", wait_s=5, deadline_bound=False)
    order: list[int] = []

    async def wait(index: int) -> None:
        ticket = await g.acquire("t", wait_s=5, deadline_bound=False)
        order.append(index)
        ticket.release()

    tasks = [asyncio.create_task(wait(index)) for index in range(5)]
    await asyncio.sleep(0)
    holder.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and g.running == 0


async def test_queue_timeout_is_429_and_a_deadline_is_504_and_neither_leaks_a_slot() -> None:
    g = gate(running=1, queued=2)
    holder = await g.acquire("t", wait_s=5, deadline_bound=False)
    with pytest.raises(OverloadedError):
        await g.acquire("t", wait_s=0.05, deadline_bound=False)
    with pytest.raises(DeadlineExceededError) as caught:
        await g.acquire("t", wait_s=0.05, deadline_bound=True)
    assert caught.value.status == 504
    assert g.queued == 0
    holder.release()
    assert g.running == 0


async def test_a_client_leaving_while_queued_frees_its_place() -> None:
    g = gate(running=1, queued=1)
    holder = await g.acquire("t", wait_s=5, deadline_bound=False)
    waiter = asyncio.create_task(g.acquire("t", wait_s=5, deadline_bound=False))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert g.queued == 0
    holder.release()
    assert g.running == 0


async def test_a_batch_flood_cannot_take_interactive_slots() -> None:
    controller = AdmissionController(load_builtin("local-cpu").qos)
    batch = controller.spec.classes[QosClass.BATCH]
    tenants = [f"t{index}" for index in range(batch.max_running + batch.max_queued)]  # each within its share
    running, queued = tenants[: batch.max_running], tenants[batch.max_running :]
    tickets = [await controller.admit(QosClass.BATCH, tenant) for tenant in running]
    flood = [asyncio.create_task(controller.admit(QosClass.BATCH, tenant)) for tenant in queued]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await controller.admit(QosClass.BATCH, "another")
    interactive = await controller.admit(QosClass.INTERACTIVE, "another")  # at once: its own slots
    assert interactive.queued_ms == 0.0
    interactive.release()
    for ticket in tickets:
        ticket.release()
    for task in flood:
        (await task).release()
    state = controller.state()
    assert (
        state["batch"]["running"] == 0 and state["batch"]["queued"] == 0 and state["batch"]["rejected"] == 1
    )


async def test_sustained_overload_keeps_the_queue_bounded() -> None:
    g = gate(running=1, queued=3)
    holder = await g.acquire("t", wait_s=5, deadline_bound=False)
    queued = [asyncio.create_task(g.acquire("t", wait_s=5, deadline_bound=False)) for _ in range(3)]
    await asyncio.sleep(0)
    for _ in range(10_000):
        with pytest.raises(OverloadedError):
            await g.acquire("t", wait_s=5, deadline_bound=False)
    assert g.queued == 3 and g.rejected == 10_000
    holder.release()
    for task in queued:
        (await task).release()


# --- per-tenant shares --------------------------------------------------------------------------


def fair_gate(running: int = 2, queued: int = 4) -> ClassGate:
    share = QosClassSpec(max_running=running, max_queued=queued).tenant_share()
    return ClassGate(
        QosClass.BATCH, max_running=running, max_queued=queued, retry_after_s=3, max_per_tenant=share
    )


def test_the_default_share_is_every_running_slot_and_half_the_queue() -> None:
    assert QosClassSpec(max_running=2, max_queued=4).tenant_share() == 4
    assert QosClassSpec(max_running=2, max_queued=0).tenant_share() == 2  # alone: the whole class
    assert QosClassSpec(max_running=2, max_queued=4, max_per_tenant=1).tenant_share() == 1
    with pytest.raises(ValueError, match="max_per_tenant"):
        QosClassSpec.model_validate({"max_running": 2, "max_queued": 4, "max_per_tenant": "3"})


async def test_one_tenants_flood_leaves_room_for_another_tenant() -> None:
    g = fair_gate(running=2, queued=4)  # share 4: 2 running + 2 queued
    flood = [asyncio.create_task(g.acquire("a", wait_s=5, deadline_bound=False)) for _ in range(10)]
    await asyncio.sleep(0)
    refused = [task for task in flood if task.done() and task.exception() is not None]
    assert flood[0].done() and flood[1].done() and refused == flood[4:]  # 2 run, 2 wait, 6 refused
    assert g.held("a") == 4 and (g.running, g.queued) == (2, 2)
    for task in refused:
        error = task.exception()
        assert isinstance(error, OverloadedError) and error.retry_after_s == 3
        assert "its share" in error.message
    other = asyncio.create_task(g.acquire("b", wait_s=5, deadline_bound=False))
    await asyncio.sleep(0)
    assert not other.done() and g.queued == 3  # queued, not refused
    (await flood[0]).release()  # a's turn came first: its first waiter runs
    await flood[2]
    (await flood[1]).release()  # then b's turn, ahead of a's later waiter
    b_ticket = await other
    assert not flood[3].done()
    b_ticket.release()
    for task in (flood[2], flood[3]):
        (await task).release()
    assert (g.running, g.queued, g.held("a"), g.held("b")) == (0, 0, 0, 0)


async def test_freed_slots_go_round_robin_by_tenant() -> None:
    g = ClassGate(QosClass.BATCH, max_running=1, max_queued=9, retry_after_s=1, max_per_tenant=4)
    holder = await g.acquire("a", wait_s=5, deadline_bound=False)
    order: list[str] = []

    async def wait(tenant: str) -> None:
        ticket = await g.acquire(tenant, wait_s=5, deadline_bound=False)
        order.append(tenant)
        ticket.release()

    tasks = [asyncio.create_task(wait(tenant)) for tenant in ("a", "a", "a", "b", "b", "c")]
    await asyncio.sleep(0)
    holder.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "b", "a"]
    assert (g.running, g.queued, g.held("a")) == (0, 0, 0)


async def test_a_share_is_given_back_by_timeouts_and_cancellations() -> None:
    g = ClassGate(QosClass.BATCH, max_running=1, max_queued=4, retry_after_s=1, max_per_tenant=3)
    holder = await g.acquire("b", wait_s=5, deadline_bound=False)
    with pytest.raises(OverloadedError):
        await g.acquire("a", wait_s=0.01, deadline_bound=False)
    leaving = asyncio.create_task(g.acquire("a", wait_s=5, deadline_bound=False))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert g.held("a") == 0 and g.queued == 0
    again = [asyncio.create_task(g.acquire("a", wait_s=5, deadline_bound=False)) for _ in range(3)]
    await asyncio.sleep(0)
    assert g.held("a") == 3 and not any(task.done() for task in again)  # the whole share again
    holder.release()
    for task in again:
        (await task).release()
    assert (g.running, g.queued, g.held("a"), g.held("b")) == (0, 0, 0, 0)


def test_qos_spec_needs_every_class() -> None:
    with pytest.raises(ValueError, match="missing: batch"):
        QosSpec(classes={
            QosClass.INTERACTIVE: QosClassSpec(max_running=1, max_queued=1),
            QosClass.STANDARD: QosClassSpec(max_running=1, max_queued=1),
        })  # fmt: skip


# --- deadlines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "abc", "1e9", True])
def test_bad_timeouts_are_400(value: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        Deadline.parse(value, param="timeout_s", started=time.monotonic())
    assert caught.value.param == "timeout_s"


async def test_deadline_cancels_the_work_and_answers_504() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    deadline = Deadline.parse("0.05", param="timeout_s", started=time.monotonic())
    with pytest.raises(DeadlineExceededError):
        await deadline.run(slow())
    assert cancelled.is_set()
    assert await Deadline(None).run(asyncio.sleep(0, result=7)) == 7


# --- input limits --------------------------------------------------------------------------------

LOCAL = load_builtin("local-cpu")
LIMITS = GenerationLimits.of(LOCAL)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 10**9}, "n"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"max_completion_tokens": 10**12}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x"}] * 10_000}, "messages"),
        ({"prompt": ["x"] * 1000}, "prompt"),
    ],
)
def test_input_limits_name_the_parameter_and_never_echo_the_input(
    body: dict[str, object], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        check_generation_limits(body, LIMITS)
    assert caught.value.param == param
    assert len(caught.value.message) < 200 and "10000" not in caught.value.message.replace(",", "")


def test_requests_within_the_limits_pass() -> None:
    check_generation_limits(
        {"n": 2, "max_tokens": 16, "messages": [{"role": "user", "content": "x"}]}, LIMITS
    )
    check_generation_limits({"prompt": list(range(3000))}, LIMITS)  # token ids are one prompt


def test_a_media_part_an_engine_would_fetch_is_refused_unless_its_host_is_listed() -> None:
    """An engine loads an http(s) media URL itself, from inside the cluster (a cloud's metadata
    service, the Ray dashboard): refused (400 naming the message, not echoing the URL) unless
    the profile lists its host in ``engine.vllm_args.allowed_media_domains``; inline media pass."""

    def chat(kind: str, url: str) -> dict[str, object]:
        part = {"type": kind, kind: {"url": url}}
        return {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": [part]}]}

    remote = (
        ("image_url", "http://169.254.169.254/latest/meta-data/"),
        ("video_url", "HTTPS://dashboard.internal:8265/"),
        ("audio_url", " http://10.0.0.1/a.wav"),
    )
    for kind, url in remote:
        with pytest.raises(InvalidRequestError) as caught:
            check_generation_limits(chat(kind, url), LIMITS)
        assert caught.value.param == "messages[1].content" and url.strip() not in caught.value.message
    check_generation_limits(chat("image_url", "data:image/png;base64,iVBORw0KGgo="), LIMITS)
    engine = LOCAL.engine.model_copy(update={"vllm_args": {"allowed_media_domains": ["Images.example.com"]}})
    listed = GenerationLimits.of(LOCAL.model_copy(update={"engine": engine}))  # as a gateway builds it
    assert listed.media_hosts == {"images.example.com"}
    check_generation_limits(chat("image_url", "https://Images.Example.com/cat.png"), listed)
    for url in ("https://images.example.com.evil.net/cat.png", "http://[::1/x"):  # the last: no URL at all
        with pytest.raises(InvalidRequestError):
            check_generation_limits(chat("image_url", url), listed)


# --- batch takes the cheapest route --------------------------------------------------------------


def test_batch_takes_the_cheapest_route_and_the_record_replays() -> None:
    candidates = (  # r0 holds the whole prompt: on it, the request costs least
        candidate_for_route(ROUTES["managed"]), candidate_for_route(ROUTES["byok"]),
        make_replica("r0", matched=PROMPT_TOKENS // 32), make_replica("r1"),
    )  # fmt: skip
    standard = decide("dec_std", make_inputs(*candidates))
    batch = decide("dec_batch", replace(make_inputs(*candidates), qos="batch", prefer_cheapest=True))
    costs = {
        (verdict["route"], verdict["replica"]): verdict["scores"]["expected_cost_pusd"]
        for verdict in batch.to_json()["candidates"]
    }
    assert batch.pick is not None and batch.pick_reason == "cheapest: qos batch"
    assert costs[(batch.pick.route, batch.pick.replica)] == min(costs.values())
    assert standard.pick is not None and standard.pick.route == "managed"  # the default, not the cheapest
    assert costs[("managed", None)] > min(costs.values())
    stored = json.loads(json.dumps(batch.to_json()))
    equal, recomputed = replay(stored)
    assert equal and DecisionRecord.from_json(recomputed).pick == batch.pick


# --- capture by source ---------------------------------------------------------------------------


def test_capture_split_adds_up_to_cached_tokens_and_never_claims_more() -> None:
    report = {"engine_tokens": 32, "tiers": {"redis": 64, "host": 32}}
    assert capture_sources(report, 128) == (("engine", 32), ("host", 32), ("redis", 64))
    assert sum(tokens for _, tokens in capture_sources(report, 80)) == 80  # a load that failed
    figures = ReuseFigures.of(prompt_tokens=200, opportunity_tokens=96, route_kind="byoc", cached_tokens=128,
                              kv_report=report)  # fmt: skip
    assert figures.to_json()["captured_by_source"] == {"engine": 32, "host": 32, "redis": 64}
    provider = ReuseFigures.of(
        prompt_tokens=200, opportunity_tokens=96, route_kind="managed", cached_tokens=128, kv_report=report
    )
    assert provider.captured_sources == ()  # a provider's figure is reported, never split


# --- telemetry -----------------------------------------------------------------------------------


def make_run(kv: dict[str, object] | None) -> EngineRun:
    body: dict[str, object] = {"choices": [], "usage": {"completion_tokens": 8}}
    if kv is not None:
        body["kv_transfer_params"] = {"zumik_kv": kv}

    async def nothing():  # type: ignore[no-untyped-def]
        return
        yield

    return EngineRun(
        decision_id="dec_x",  # type: ignore[arg-type]
        replica_id="r0", first=EngineResponse(body), rest=nothing(),
        timing_ms={"decide": 0.2, "first-output": 40.0, "record": 1.0},
    )  # fmt: skip


def test_phases_include_queue_and_the_tier_restore_with_its_description() -> None:
    clock = RequestClock()
    clock.phases_ms["queue"] = 3.0
    run = make_run({"engine_tokens": 0, "tiers": {"redis": 64}, "bytes": 4096, "ms": 1.5})
    phases, descriptions = request_phases(run, clock)
    assert list(phases) == ["queue", "decide", "first-output", "record", "restore"]
    assert phases["restore"] == 1.5 and descriptions["restore"] == "redis 64 tokens, 4096 bytes"
    telemetry = telemetry_object(run, clock, {"completion_tokens": 8})
    assert telemetry["restore"] == {"tiers": {"redis": 64}, "bytes": 4096, "engine_cached_tokens": 0}
    assert telemetry["output_tokens_per_s"] == 200.0
    assert "restore" not in request_phases(make_run(None), clock)[0]


def test_spans_carry_the_decision_id_with_a_child_per_phase() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing("console", exporter=exporter)
    clock = RequestClock()
    clock.phases_ms["queue"] = 2.0
    tracing.request(make_run({"tiers": {"disk": 32}, "ms": 0.5}), clock, {"zumik.qos": "interactive"})
    tracing.shutdown()
    spans = {span.name: span for span in exporter.get_finished_spans()}
    phases = ("queue", "decide", "first-output", "record", "restore")
    assert set(spans) == {"zumik.request", *(f"zumik.{phase}" for phase in phases)}
    root = spans["zumik.request"]
    assert root.attributes is not None and root.attributes["zumik.decision_id"] == "dec_x"
    assert root.attributes["zumik.qos"] == "interactive"
    for name, span in spans.items():
        if name != "zumik.request":
            assert span.parent is not None and span.parent.span_id == root.context.span_id
            assert span.start_time >= root.start_time and span.end_time <= root.end_time


def test_tracing_is_off_by_default_and_rejects_an_unknown_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZUMIK_TRACES", raising=False)
    assert not Tracing("none").enabled
    with pytest.raises(ValueError, match="telemetry.traces"):
        Tracing("jaeger")
