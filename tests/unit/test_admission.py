"""Admission through the real HTTP app, in process (real Redis, the shared FakeEngine).

Invariants held here:
- within a class, one tenant's flood takes at most its share: its excess gets 429 with
  Retry-After while another tenant's request in the same class is admitted and served;
- a request's body is read before it takes a slot: clients that send headers and then stall
  their bodies hold no slot, and a body slower than ``gateway.body_timeout_s`` is a 408;
- ``/v2/snapshots/{id}/compile`` and ``/warm`` take a slot of their class like generation does;
- tokenization runs off the event loop (other requests are answered while it runs) and never
  past ``gateway.max_tokenize_bytes`` (413 before any tokenizing);
- every integer that sets an amount of the engine's work is taken only as a JSON integer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from profiles import Profile, load_builtin
from profiles.model import QosClass, QosClassSpec
from tests.support.inprocess import InProcessGateway, make_gateway, wait_until
from zumik_serve.qos.admission import ClassGate, Ticket
from zumik_serve.state.compiler import ChatTokenizer

pytestmark = pytest.mark.redis

MODEL = "zumik-tiny"


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def profile_with(batch: QosClassSpec | None = None, **gateway: Any) -> Profile:
    """local-cpu with the ``batch`` class and gateway fields given."""
    base = load_builtin("local-cpu")
    classes = dict(base.qos.classes)
    if batch is not None:
        classes[QosClass.BATCH] = batch
    return base.model_copy(update={
        "qos": base.qos.model_copy(update={"classes": classes}),
        "gateway": base.gateway.model_copy(update=gateway),
    })  # fmt: skip


def batch_gate(gateway: InProcessGateway) -> ClassGate:
    return gateway.context.admission.gates[QosClass.BATCH]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:300]
    error: dict[str, Any] = response.json()["error"]
    if code is not None:
        assert error["code"] == code, error
    return error


async def _snapshot(http: httpx.AsyncClient, content: str) -> str:
    artifact = (await http.post("/v2/artifacts", json={"role": "system", "content": content})).json()["id"]
    bundle = (await http.post("/v2/bundles", json={"artifacts": [artifact]})).json()["id"]
    response = await http.post("/v2/snapshots", json={"bundle": bundle})
    assert response.status_code == 201, response.text[:300]
    snapshot: str = response.json()["id"]
    return snapshot


# --- one tenant's share of a class ------------------------------------------------------------


async def test_a_tenants_flood_gets_429_while_another_tenant_in_the_class_is_served(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    # batch: 1 running + 2 queued; a tenant's share is 1 + 2 // 2 = 2.
    gateway = make_gateway(
        module_redis_url, tiny_model_dir, profile=profile_with(QosClassSpec(max_running=1, max_queued=2))
    )
    gateway.engine.hold = asyncio.Event()
    flooder, other = await gateway.create_tenant("flooder"), await gateway.create_tenant("other")
    headers = {"x-zumik-qos": "batch"}
    gate = batch_gate(gateway)
    async with gateway.client(flooder) as a_http, gateway.client(other) as b_http:
        held = [asyncio.create_task(a_http.post("/v1/chat/completions", json=chat(), headers=headers))
                for _ in range(2)]  # fmt: skip
        await wait_until(lambda: _is(gate.running == 1 and gate.queued == 1), what="a's share in use")
        excess = [await a_http.post("/v1/chat/completions", json=chat(), headers=headers) for _ in range(4)]
        for response in excess:
            error = assert_error(response, 429, "overloaded")
            assert int(response.headers["retry-after"]) >= 1 and "share" in error["message"]
        b_request = asyncio.create_task(b_http.post("/v1/chat/completions", json=chat(), headers=headers))
        await wait_until(lambda: _is(gate.queued == 2), what="b's request queued")
        gateway.engine.hold.set()
        b_response = await b_request
        assert b_response.status_code == 200, b_response.text[:300]
        assert b_response.headers["x-zumik-qos"] == "batch"
        assert [(await task).status_code for task in held] == [200, 200]
    assert (gate.running, gate.queued) == (0, 0)


async def _is(value: bool) -> bool:
    return value


async def test_a_streamed_answers_slot_is_only_ever_touched_on_the_event_loop(
    module_redis_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch: 1 running + 2 queued (a tenant's share: 2). A slot given back hands itself to a
    # waiting request by completing that request's future, which only the loop's own thread
    # may do, and the ticket's "given back once" check is no lock: every release, the stream's
    # own and the background task's (the one for a client gone before the stream began), runs
    # on the loop. Starlette runs a plain function's background task on a worker thread.
    gateway = make_gateway(
        module_redis_url, tiny_model_dir, profile=profile_with(QosClassSpec(max_running=1, max_queued=2))
    )
    gateway.engine.hold = asyncio.Event()
    gate = batch_gate(gateway)
    released_on: list[int] = []
    release = Ticket.release

    def recorded_release(ticket: Ticket) -> None:
        released_on.append(threading.get_ident())
        release(ticket)

    monkeypatch.setattr(Ticket, "release", recorded_release)
    headers = {"x-zumik-qos": "batch"}
    async with gateway.client() as http:
        streams = [
            asyncio.create_task(http.post("/v1/chat/completions", json=chat(stream=True), headers=headers))
            for _ in range(2)
        ]
        await wait_until(lambda: _is(gate.running == 1 and gate.queued == 1), what="one running, one queued")
        gateway.engine.hold.set()
        responses = [await stream for stream in streams]
    for response in responses:
        assert response.status_code == 200, response.text[:300]
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-200:]
    assert len(released_on) >= 2 and set(released_on) == {threading.get_ident()}
    assert (gate.running, gate.queued) == (0, 0)


# --- the body before the slot -----------------------------------------------------------------


class Stalls:
    """Request bodies that send their first 9 bytes, then stall until ``go`` is set;
    ``waiting`` counts those the app is waiting on (it asked for their next chunk)."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = 0

    async def body(self, rest: bytes) -> AsyncIterator[bytes]:
        yield b'{"model":'
        self.waiting += 1
        await self.go.wait()
        self.waiting -= 1
        yield rest


async def test_stalled_bodies_hold_no_slot_and_a_normal_request_is_served(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    # batch: 2 slots in all (1 running + 1 queued); 5 clients stall their bodies.
    gateway = make_gateway(
        module_redis_url, tiny_model_dir, profile=profile_with(QosClassSpec(max_running=1, max_queued=1))
    )
    stalls = Stalls()
    rest = b'"zumik-tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
    headers = {"x-zumik-qos": "batch", "content-type": "application/json"}
    gate = batch_gate(gateway)
    async with gateway.client() as http:
        stalled = [
            asyncio.create_task(http.post("/v1/chat/completions", content=stalls.body(rest), headers=headers))
            for _ in range(5)
        ]
        await wait_until(lambda: _is(stalls.waiting == 5), what="5 bodies stalled inside the app")
        assert (gate.running, gate.queued) == (0, 0)
        normal = await http.post("/v1/chat/completions", json=chat(), headers={"x-zumik-qos": "batch"})
        assert normal.status_code == 200, normal.text[:300]
        responses = await http.post("/v1/responses", json={"model": MODEL, "input": "hi"},
                                    headers={"x-zumik-qos": "batch"})  # fmt: skip
        assert responses.status_code == 200, responses.text[:300]
        stalls.go.set()
        statuses = [(await task).status_code for task in stalled]
    assert set(statuses) <= {200, 429} and 200 in statuses  # admitted once their bodies arrived
    assert (gate.running, gate.queued) == (0, 0)


async def test_a_body_slower_than_the_body_timeout_is_408_and_holds_nothing(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile_with(body_timeout_s=0.2))
    stalls = Stalls()  # never released
    async with gateway.client() as http:
        for path in ("/v1/chat/completions", "/v2/generate", "/v2/artifacts"):
            late = await asyncio.wait_for(  # a hang detector: without the bound it never answers
                http.post(path, content=stalls.body(b"}"), headers={"content-type": "application/json"}), 60
            )
            error = assert_error(late, 408, "body_timeout")
            assert "0.2 s" in error["message"] and "9 bytes received" in error["message"]
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200
    assert all(gate.running == 0 for gate in gateway.context.admission.gates.values())


# --- /compile and /warm are admitted ----------------------------------------------------------


async def test_compile_and_warm_take_a_slot_of_their_class(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(
        module_redis_url, tiny_model_dir, profile=profile_with(QosClassSpec(max_running=1, max_queued=0))
    )
    other = await gateway.create_tenant("slot-holder")
    gate = batch_gate(gateway)
    async with gateway.client() as http, gateway.client(other) as other_http:
        snapshot = await _snapshot(http, "You compile.")
        gateway.engine.hold = asyncio.Event()
        holder = asyncio.create_task(
            other_http.post("/v1/chat/completions", json=chat(), headers={"x-zumik-qos": "batch"})
        )
        await wait_until(lambda: _is(gate.running == 1), what="the batch slot taken")
        for action in ("compile", "warm"):
            full = await http.post(f"/v2/snapshots/{snapshot}/{action}", json={"qos": "batch"})
            assert_error(full, 429, "overloaded")
            assert int(full.headers["retry-after"]) >= 1
        gateway.engine.hold.set()
        assert (await holder).status_code == 200
        compiled = await http.post(f"/v2/snapshots/{snapshot}/compile", json={"qos": "batch"})
        assert compiled.status_code == 200 and compiled.json()["num_tokens"] > 0, compiled.text[:300]
        warmed = await http.post(f"/v2/snapshots/{snapshot}/warm", json={"qos": "batch"})
        assert warmed.status_code == 200, warmed.text[:300]
        assert (await http.post(f"/v2/snapshots/{snapshot}/compile")).status_code == 200  # no body: default
        bad = await http.post(f"/v2/snapshots/{snapshot}/compile", json={"qos": "urgent"})
        assert assert_error(bad, 400)["param"] == "qos"
    assert (gate.running, gate.queued) == (0, 0)


# --- tokenization off the loop, within a cap --------------------------------------------------


class BlockingTokenizer:
    """The real tokenizer, entered only once ``release`` is set; notes when it is entered and
    when it finishes (``log``)."""

    def __init__(self, inner: ChatTokenizer, log: list[str]) -> None:
        self.inner, self.log = inner, log
        self.entered, self.release = threading.Event(), threading.Event()

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def chat_template_digest(self) -> str:
        return self.inner.chat_template_digest

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        self.entered.set()
        self.release.wait(timeout=15)  # on the loop (the failure this test catches) it ends, late
        self.log.append("tokenized")
        return self.inner.encode_chat(messages, add_generation_prompt=add_generation_prompt)


def install_tokenizer(gateway: InProcessGateway, make: Any) -> Any:
    models = gateway.context.models
    wrapped = make(models.tokenizer())
    models._tokenizers[models.group(models.default)] = wrapped
    return wrapped


@pytest.mark.parametrize("route", ["compile", "generate"])
async def test_a_tokenization_does_not_stall_other_requests(
    module_redis_url: str, tiny_model_dir: Path, route: str
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    log: list[str] = []
    tokenizer: BlockingTokenizer = install_tokenizer(gateway, lambda inner: BlockingTokenizer(inner, log))
    gate = gateway.context.admission.gates[QosClass.INTERACTIVE]
    async with gateway.client() as http:
        snapshot = await _snapshot(http, "A long document. " * 100)
        if route == "compile":
            slow = http.post(f"/v2/snapshots/{snapshot}/compile", json={"qos": "interactive"})
        else:
            slow = http.post("/v2/generate", json={"input": "hi", "snapshot": snapshot, "qos": "interactive"})
        task = asyncio.create_task(slow)
        assert await asyncio.to_thread(tokenizer.entered.wait, 15)
        assert gate.running == 1  # it tokenizes inside its slot
        assert (await http.get("/v1/models")).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat())).status_code == 200
        log.append("others answered")
        tokenizer.release.set()
        response = await task
    assert response.status_code == 200, response.text[:300]
    assert log == ["others answered", "tokenized"]
    assert gate.running == 0


class CountingTokenizer:
    def __init__(self, inner: ChatTokenizer) -> None:
        self.inner, self.calls = inner, 0
        self.fingerprint, self.chat_template_digest = inner.fingerprint, inner.chat_template_digest

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        self.calls += 1
        return self.inner.encode_chat(messages, add_generation_prompt=add_generation_prompt)


async def test_text_beyond_the_tokenizing_cap_is_413_before_any_tokenizing(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir, profile=profile_with(max_tokenize_bytes=4096))
    tokenizer: CountingTokenizer = install_tokenizer(gateway, CountingTokenizer)
    async with gateway.client() as http:
        big = await _snapshot(http, "x" * 5000)
        small = await _snapshot(http, "x" * 3000)
        for response in (
            await http.post(f"/v2/snapshots/{big}/compile"),
            await http.post(f"/v2/snapshots/{big}/warm"),
            await http.post("/v2/generate", json={"input": "y" * 5000}),
            await http.post("/v2/generate", json={"input": "y" * 2000, "snapshot": small}),  # together
        ):
            error = assert_error(response, 413, "prompt_too_large")
            assert "4096 bytes" in error["message"] and "xxxx" not in error["message"]
        assert tokenizer.calls == 0 and gateway.engine.calls == []
        assert (await http.post(f"/v2/snapshots/{small}/compile")).status_code == 200
        assert tokenizer.calls == 1


# --- integer types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(logprobs=True, top_logprobs="5"), "top_logprobs"),
        ("/v1/chat/completions", chat(seed="7"), "seed"),
        ("/v1/chat/completions", chat(logprobs="true"), "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": "5"}, "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}, "seed"),
        ("/v1/chat/completions", chat(max_completion_tokens="8"), "max_completion_tokens"),
        ("/v2/generate", {"input": "hi", "seed": "7"}, "seed"),
        ("/v2/generate", {"input": "hi", "max_tokens": "9000"}, "max_tokens"),
    ],
)
async def test_work_integers_must_be_json_integers(
    module_redis_url: str, tiny_model_dir: Path, path: str, body: dict[str, Any], param: str
) -> None:
    gateway = make_gateway(module_redis_url, tiny_model_dir)
    async with gateway.client() as http:
        error = assert_error(await http.post(path, json=body), 400)
        assert error["param"] == param and "integer" in error["message"]
        assert gateway.engine.calls == []
        fine = {**body, param: 5} if param != "logprobs" or path != "/v1/chat/completions" else {
            **body, param: True}  # fmt: skip
        if param == "top_logprobs":
            fine["logprobs"] = True
        assert (await http.post(path, json=fine)).status_code == 200
