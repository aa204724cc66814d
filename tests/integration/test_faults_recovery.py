"""Faults the other fault tests leave out: Redis down, a Gateway replica killed under retrying
clients, the engine replica's Ray actor killed. Issue #9 (T4, T9's Redis part, T10, T11).

Invariants:

- Redis down: /v1 and /v2 answer 503 with an integer ``Retry-After`` and an error object that
  says to retry, within seconds (never a hang, never a 500); after the restart every request
  succeeds again and what was acknowledged before the kill is still there.
- Gateway replica killed while clients create /v2 objects and retry each create with the same
  ``Idempotency-Key``: every logical create yields exactly one object (one artifact per content,
  one bundle per artifact, in the store's own indexes), the same key replays the same id, the
  same key with another body is a 422. /v1 clients with the SDK's default retries never hang:
  each call is a success or an SDK exception.
- Engine replica actor killed: in-flight requests end fast (an OpenAI error from a gateway that
  survives, or a dropped connection from the colocated replica that died with the engine),
  Serve notices within health_check_period_s + health_check_timeout_s + slack, and once the
  new replica serves, every request succeeds.

The shared stack colocates the gateway in the engine replica (profile ``local-cpu``), so a
Gateway deployment of its own (two replicas) is deployed here as the app ``zumik-gw`` under
``/gw`` (the ``separate`` topology's Gateway class, reaching the shared engine through a Serve
handle): killing a replica costs seconds, not a vLLM reload. Runs last (marker ``disruptive``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import redis

from tests.integration.conftest import DEV_KEY, _create_tenant
from tests.support.waiting import wait_until
from zumik_serve.providers.sse import sse_lines_sync
from zumik_serve.state.store import bydigest_key, derived_key
from zumik_serve.store.local_redis import embedded_redis
from zumik_serve.tenancy.tenant import hash_api_key

pytestmark = [pytest.mark.redis, pytest.mark.ray, pytest.mark.vllm, pytest.mark.disruptive]

MAIN_APP = "zumik"
GW_APP = "zumik-gw"
GW_PREFIX = "/gw"
HANG_S = 10.0  # a hang detector, not a latency claim
GATEWAY_KILLS = 3
GATEWAY_REPLICAS = 2
WRITERS = 3
SLACK_S = 10.0


# --- helpers -------------------------------------------------------------------------------


def replica_actors(app: str, deployment: str) -> dict[str, str]:
    """Live Serve replica actors of ``app``/``deployment``: name -> namespace."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        a["name"]: a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    }


def kill_replica(app: str, deployment: str) -> str:
    """``ray.kill`` one replica actor of ``app``/``deployment`` (Serve's controller replaces it)."""
    import ray

    actors = replica_actors(app, deployment)
    assert actors, f"no replica actor of {app}/{deployment}"
    name = sorted(actors)[0]
    ray.kill(ray.get_actor(name, namespace=actors[name]), no_restart=True)
    return name


def wait_for_new_replica(app: str, deployment: str, killed: str, replicas: int, timeout_s: float) -> float:
    """Seconds until ``replicas`` replica actors other than ``killed`` exist (the controller has
    noticed the death and started a replacement)."""
    t0 = time.monotonic()
    while len(set(replica_actors(app, deployment)) - {killed}) < replicas:
        assert time.monotonic() - t0 < timeout_s, f"{app}/{deployment} got no new replica in {timeout_s} s"
        time.sleep(0.2)
    return time.monotonic() - t0


def wait_for_running(app: str, deployment: str, replicas: int, timeout_s: float) -> float:
    """Seconds until ``serve.status()`` shows ``replicas`` replicas RUNNING and no other."""
    from ray import serve

    t0 = time.monotonic()
    while True:
        states = serve.status().applications[app].deployments[deployment].replica_states
        if dict(states) == {"RUNNING": replicas}:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout_s, f"{app}/{deployment} replicas {states} after {timeout_s} s"
        time.sleep(0.2)


def deployment_config(app: str, deployment: str) -> dict[str, Any]:
    """The deployment config Serve's controller runs (what ``serve status`` reports)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details: Any = ray.get(controller.get_serve_instance_details.remote())
    config: dict[str, Any] = details["applications"][app]["deployments"][deployment]["deployment_config"]
    return config


def wait_until_ok(
    client: httpx.Client,
    method: str,
    path: str,
    timeout_s: float,
    not_yet: tuple[int, ...] = (),
    **kwargs: Any,
) -> float:
    """Seconds until ``method path`` answers 2xx (transport errors, 5xx and ``not_yet``
    statuses count as not yet)."""
    t0 = time.monotonic()
    while True:
        try:
            response = client.request(method, path, **kwargs)
            if response.is_success:
                return time.monotonic() - t0
            assert response.status_code >= 500 or response.status_code in not_yet, response.text
        except httpx.TransportError:
            pass
        assert time.monotonic() - t0 < timeout_s, f"{method} {path} did not recover in {timeout_s} s"
        time.sleep(0.25)


def timed(client: httpx.Client, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    response = client.request(method, path, **kwargs)
    return response, time.monotonic() - t0


def assert_openai_503(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "retry" in error["message"].lower(), error  # says what to do


def assert_native_503(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text)
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert "retry" in error["message"].lower(), error


def is_ingress_error(response: httpx.Response) -> bool:
    """HAProxy's own answer when no replica took the request (Serve renders 502/503/504 as this)."""
    return response.status_code == 500 and response.text == "Internal Server Error"


def chat(model: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": max_tokens,
        **extra,
    }


@pytest.fixture(scope="module")
def gateway_app(running_stack) -> Iterator[str]:
    """A Gateway deployment of its own (two replicas) in front of the shared engine replica.

    Two, so that the prefix always has a running replica: while an app under a prefix has
    none, Serve's HAProxy ingress hands its requests to the "/" app, which answers 404."""
    from ray import serve

    from profiles import load_builtin
    from zumik_serve.app.context import GatewaySettings
    from zumik_serve.app.gateway import Gateway
    from zumik_serve.engines.vllm_config import engine_kv_transfer
    from zumik_serve.model.resolve import resolve_model_dir
    from zumik_serve.secret_files import secrets_dir

    profile = load_builtin("local-cpu")  # the shared engine's profile
    home = running_stack.home
    model_dir = resolve_model_dir(profile, home)
    kv = engine_kv_transfer(
        profile, model_dir=model_dir, redis_url=running_stack.redis_url, home_root=home.root
    )
    kv_config = kv["kv_connector_extra_config"] if kv else None
    settings = GatewaySettings(
        profile_name=profile.name,
        served_model=profile.model.served_name,
        model_created_s=int(time.time()),
        redis_url=running_stack.redis_url,
        max_body_bytes=profile.gateway.max_body_bytes,
        max_artifact_bytes=profile.gateway.max_artifact_bytes,
        model_dir=str(model_dir),
        compat_digest=kv_config["compat_digest"] if kv_config else "",
        block_size=profile.engine.block_size,
        kv_redis_tier=profile.kv_tiers.enabled and profile.kv_tiers.redis,
        purge_ceiling=profile.purge.ceiling,
        kv_tiers=kv_config,
        profile_json=profile.model_dump_json(),
        dev_key=DEV_KEY,
        secrets_dir=str(secrets_dir(home)),  # the shared stack's, as application.py passes it
    )
    engine = serve.get_deployment_handle("EngineReplica", app_name=MAIN_APP)
    gateway: Any = Gateway
    serve.run(
        gateway.options(num_replicas=GATEWAY_REPLICAS).bind(settings, {"r0": engine}),
        name=GW_APP,
        route_prefix=GW_PREFIX,
    )
    with httpx.Client(base_url=running_stack.url, timeout=10) as client:
        # 404 until the ingress routes the new prefix (the "/" app answers meanwhile).
        wait_until_ok(client, "GET", f"{GW_PREFIX}/healthz", timeout_s=120, not_yet=(404,))
    try:
        yield GW_PREFIX
    finally:
        serve.delete(GW_APP, _blocking=False)  # its replicas drain for 30 s; nothing waits on that


# --- 1. Redis down -------------------------------------------------------------------------


def test_redis_down_gives_fast_503_then_recovers(running_stack, http: httpx.Client) -> None:
    stack = running_stack.stack
    content = f"acknowledged before the outage {uuid.uuid4()}"
    art = http.post("/v2/artifacts", json={"role": "document", "content": content})
    assert art.status_code == 201, art.text
    bundle = http.post("/v2/bundles", json={"artifacts": [art.json()["id"]]})
    assert bundle.status_code == 201, bundle.text
    # A tenant no gateway has seen: its key is in no authentication cache, so it meets Redis.
    fresh_key = asyncio.run(_create_tenant(running_stack.redis_url, f"faults-{uuid.uuid4().hex[:8]}"))
    fresh = {"Authorization": f"Bearer {fresh_key}"}
    dev = {"Authorization": f"Bearer {DEV_KEY}"}  # authenticated without Redis: meets it later
    model = running_stack.model

    assert stack.redis is not None
    port = stack.redis.port
    stack.redis.kill()
    seconds: dict[str, float] = {}
    try:
        with httpx.Client(base_url=running_stack.url, timeout=HANG_S + 20) as client:
            for who, headers in (("tenant", fresh), ("dev", dev)):
                response, seconds[f"/v1 chat ({who})"] = timed(
                    client, "POST", "/v1/chat/completions", json=chat(model, 4), headers=headers
                )
                assert_openai_503(response)
                response, seconds[f"/v2 create ({who})"] = timed(
                    client, "POST", "/v2/artifacts", json={"role": "document", "content": "x"},
                    headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
                )  # fmt: skip
                assert_native_503(response)
            # /v1/models needs only the caller's tenant: a Redis lookup for a tenant key (503),
            # none for the development key (200).
            response, seconds["/v1/models (tenant)"] = timed(client, "GET", "/v1/models", headers=fresh)
            assert_openai_503(response)
            response, seconds["/v1/models (dev)"] = timed(client, "GET", "/v1/models", headers=dev)
            assert response.status_code == 200, response.text
    finally:
        stack.redis = embedded_redis(running_stack.home, port=port).start()
    print(f"\n[redis down] seconds to answer: {json.dumps({k: round(v, 2) for k, v in seconds.items()})}")
    assert max(seconds.values()) < HANG_S, seconds

    recovered_s = wait_until_ok(
        http, "POST", "/v2/artifacts", timeout_s=30, json={"role": "document", "content": "after"}
    )
    print(f"[redis down] first /v2 create succeeded {recovered_s:.2f} s after the restart")
    with httpx.Client(base_url=running_stack.url, timeout=60, headers=fresh) as client:
        assert client.post("/v1/chat/completions", json=chat(model, 4)).status_code == 200
        assert client.get("/v1/models").status_code == 200
    read = http.get(f"/v2/artifacts/{art.json()['id']}")
    assert read.status_code == 200 and read.json()["content"] == content
    read = http.get(f"/v2/bundles/{bundle.json()['id']}")
    assert read.status_code == 200 and read.json()["artifacts"] == [art.json()["id"]]


# --- 2. Gateway replica killed under retrying clients --------------------------------------


@dataclass
class LogicalCreate:
    """One artifact and one bundle over it, each sent with its own key until acknowledged."""

    content: str
    artifact_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    bundle_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    artifact_id: str = ""
    bundle_id: str = ""
    retried: bool = False  # some attempt failed: the create crossed a kill

    def artifact_body(self) -> dict[str, Any]:
        return {"role": "document", "content": self.content}

    def bundle_body(self) -> dict[str, Any]:
        return {"artifacts": [self.artifact_id]}


class Writer(threading.Thread):
    """Creates without pause, each retried with its key until a 201 (as a client should after
    a dropped connection or a 5xx)."""

    def __init__(self, url: str, key: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.index, self.stop = url, index, stop
        self.headers = {"Authorization": f"Bearer {key}"}
        self.creates: list[LogicalCreate] = []
        self.retries: dict[str, int] = {}  # what made a retry: a status or an exception name
        self.slowest: tuple[float, str] = (0.0, "")  # the slowest attempt: seconds, its outcome
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    create = LogicalCreate(content=f"w{self.index}-{n}-{uuid.uuid4()}")
                    create.artifact_id = self._until_acked(
                        client, "/v2/artifacts", create.artifact_body(), create.artifact_key, create
                    )
                    create.bundle_id = self._until_acked(
                        client, "/v2/bundles", create.bundle_body(), create.bundle_key, create
                    )
                    self.creates.append(create)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def _until_acked(
        self, client: httpx.Client, path: str, body: dict[str, Any], key: str, create: LogicalCreate
    ) -> str:
        deadline = time.monotonic() + 90
        while True:
            t0 = time.monotonic()
            try:
                response = client.post(f"{GW_PREFIX}{path}", json=body, headers={"Idempotency-Key": key})
            except httpx.TransportError as exc:
                cause = type(exc).__name__
            else:
                cause = f"{response.status_code} {response.headers.get('content-type', '')}"
            self.slowest = max(self.slowest, (round(time.monotonic() - t0, 2), cause))
            if cause.startswith("201 "):
                return str(response.json()["id"])
            if not cause[0].isalpha():  # a status, not a transport error
                assert response.status_code in (502, 503, 504) or is_ingress_error(response), cause
            create.retried = True
            self.retries[cause] = self.retries.get(cause, 0) + 1
            assert time.monotonic() < deadline, f"{path} with key {key} never acknowledged"
            time.sleep(0.1)


def _wait_for_creates(writers: list[Writer], what: str, creates: int = 3) -> None:
    """Until the writers have had ``creates`` more logical creates fully acknowledged."""

    def done() -> int:
        return sum(1 for w in writers for c in w.creates if c.bundle_id)

    start = done()
    wait_until(lambda: done() >= start + creates, timeout_s=120, what=what)


class SdkCaller(threading.Thread):
    """/v1 through the official SDK with its default retries (max_retries=2), without pause."""

    def __init__(self, url: str, key: str, model: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.model, self.stop = model, stop
        self.attempts = 0
        self.http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._count]})
        self.client = openai.OpenAI(
            base_url=f"{url}{GW_PREFIX}/v1", api_key=key, timeout=HANG_S, http_client=self.http_client
        )
        self.outcomes: list[tuple[str, float]] = []  # ("ok" or the exception's class, seconds)
        self.error: BaseException | None = None

    def _count(self, _: Any) -> None:
        self.attempts += 1

    def run(self) -> None:
        assert self.client.max_retries == 2  # the SDK's default
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    self.client.chat.completions.create(
                        model=self.model, max_tokens=16, messages=[{"role": "user", "content": "hi"}]
                    )
                    outcome = "ok"
                except openai.APIError as exc:  # every SDK exception, timeouts included
                    outcome = type(exc).__name__
                self.outcomes.append((outcome, time.monotonic() - t0))
        except BaseException as exc:
            self.error = exc
        finally:
            self.http_client.close()


def _count(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_gateway_killed_under_idempotent_retries_creates_each_object_once(
    running_stack, http: httpx.Client, gateway_app: str
) -> None:
    url, key = running_stack.url, running_stack.tenant_key
    stop = threading.Event()
    writers = [Writer(url, key, i, stop) for i in range(WRITERS)]
    sdk_callers = [SdkCaller(url, key, running_stack.model, stop) for _ in range(2)]
    restarts_s: list[float] = []
    for thread in [*writers, *sdk_callers]:
        thread.start()
    try:
        for _ in range(GATEWAY_KILLS):
            _wait_for_creates(writers, "creates acknowledged before the next kill")
            killed = kill_replica(GW_APP, "Gateway")
            t0 = time.monotonic()
            wait_for_new_replica(GW_APP, "Gateway", killed, GATEWAY_REPLICAS, timeout_s=120)
            wait_for_running(GW_APP, "Gateway", GATEWAY_REPLICAS, timeout_s=120)
            restarts_s.append(time.monotonic() - t0)
        _wait_for_creates(writers, "creates acknowledged after the last restart")
    finally:
        stop.set()
        for thread in [*writers, *sdk_callers]:
            thread.join(timeout=120)

    assert [w.error for w in writers if w.error is not None] == []
    assert [c.error for c in sdk_callers if c.error is not None] == []
    creates = [create for writer in writers for create in writer.creates]
    retries = _count([cause for w in writers for cause, n in w.retries.items() for _ in range(n)])
    outcomes = [outcome for caller in sdk_callers for outcome in caller.outcomes]
    print(
        f"\n[gateway kills] {GATEWAY_KILLS} kills of {GATEWAY_REPLICAS} replicas, each replaced "
        f"(RUNNING) after {[round(s, 1) for s in restarts_s]} s; {len(creates)} logical creates "
        f"({2 * len(creates)} objects, {sum(c.retried for c in creates)} retried), retries by cause "
        f"{retries}, slowest attempt {max(w.slowest for w in writers)}; SDK calls "
        f"{_count([name for name, _ in outcomes])} in {sum(c.attempts for c in sdk_callers)} HTTP "
        f"attempts, slowest {max(s for _, s in outcomes):.1f} s"
    )
    assert sum(retries.values()) > 0, "the kills were not felt; the test proves nothing"

    # /v1: no hang (a timeout is one), every call a success or an SDK exception.
    assert outcomes and all(name != "APITimeoutError" for name, _ in outcomes), _count(
        [name for name, _ in outcomes]
    )
    assert any(name == "ok" for name, _ in outcomes)

    # Every acknowledged object is there, through the API for every create that crossed a kill
    # and a sample of the others, and the same key replays the same object.
    assert len({c.artifact_id for c in creates}) == len(creates)
    assert len({c.bundle_id for c in creates}) == len(creates)
    checked = [c for c in creates if c.retried] + [c for c in creates if not c.retried][:30]
    for create in checked:
        read = http.get(f"/v2/artifacts/{create.artifact_id}")
        assert read.status_code == 200 and read.json()["content"] == create.content
        read = http.get(f"/v2/bundles/{create.bundle_id}")
        assert read.status_code == 200 and read.json()["artifacts"] == [create.artifact_id]
        for path, body, idem, expected in (
            ("/v2/artifacts", create.artifact_body(), create.artifact_key, create.artifact_id),
            ("/v2/bundles", create.bundle_body(), create.bundle_key, create.bundle_id),
        ):
            again = http.post(path, json=body, headers={"Idempotency-Key": idem})
            assert again.status_code == 201 and again.json()["id"] == expected, again.text

    # The same key with another body is a 422.
    first, other = creates[0], creates[1]
    for path, body, idem in (
        ("/v2/bundles", other.bundle_body(), first.bundle_key),
        ("/v2/artifacts", other.artifact_body(), first.artifact_key),
    ):
        conflict = http.post(path, json=body, headers={"Idempotency-Key": idem})
        assert conflict.status_code == 422, conflict.text
        assert conflict.json()["error"]["type"] == "idempotency_error"
        assert conflict.json()["error"]["code"] == "idempotency_key_reused"

    # In the store, for every create: its objects exist, and it made exactly one object of
    # each kind (the content's index names one artifact, the artifact's dependants one bundle;
    # an attempt cut short by a kill must not leave a second one behind).
    store = redis.Redis.from_url(running_stack.redis_url, decode_responses=True)
    tenant = store.get(f"zumik:apikey:{hash_api_key(key)}")
    assert isinstance(tenant, str)
    records: list[Any] = store.mget([f"z:{{{tenant}}}:o:{c.artifact_id}" for c in creates])
    bundles: list[Any] = store.mget([f"z:{{{tenant}}}:o:{c.bundle_id}" for c in creates])
    assert None not in records and None not in bundles, "an acknowledged object is missing"
    digests = [json.loads(record)["digest"] for record in records]
    blobs = store.mget([f"z:{{{tenant}}}:blob:{digest}" for digest in digests])
    with store.pipeline(transaction=False) as pipe:
        for create, digest in zip(creates, digests, strict=True):
            pipe.smembers(bydigest_key(tenant, digest))
            pipe.smembers(derived_key(tenant, create.artifact_id))
        indexed = pipe.execute()
    duplicated = []
    for index, create in enumerate(creates):
        assert blobs[index] == create.content
        assert json.loads(bundles[index])["artifacts"] == [create.artifact_id]
        if indexed[2 * index] != {create.artifact_id} or indexed[2 * index + 1] != {create.bundle_id}:
            duplicated.append((create, indexed[2 * index], indexed[2 * index + 1]))
    assert duplicated == [], (
        f"{len(duplicated)} of {len(creates)} creates left more than one object: "
        + "; ".join(
            f"acknowledged {c.artifact_id}, {c.bundle_id} (retried: {c.retried}), stored {arts}, {bnds}"
            for c, arts, bnds in duplicated
        )
    )


# --- 3. Engine replica actor killed ---------------------------------------------------------


class Probe(threading.Thread):
    """One request in a thread: its response or transport error, and when it ended."""

    def __init__(self, url: str, key: str, path: str, body: dict[str, Any], timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.body, self.timeout_s = url, path, body, timeout_s
        self.headers = {"Authorization": f"Bearer {key}"}
        self.response: httpx.Response | None = None
        self.error: httpx.TransportError | None = None
        self.ended = 0.0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout_s) as client:
            try:
                self.response = client.post(self.path, json=self.body)
            except httpx.TransportError as exc:
                self.error = exc
        self.ended = time.monotonic()

    def outcome(self) -> str:
        if self.response is not None:
            return f"{self.response.status_code} {self.response.text[:160]}"
        return type(self.error).__name__


@dataclass
class EngineKill:
    """One kill of the engine replica while two long answers run on it, and what followed."""

    in_flight: Probe  # through the Gateway app, which survives the engine
    outage: list[Probe]  # sent while no engine replica exists
    lines: list[str]  # the colocated stream's, up to its end
    stream_error: str | None  # the transport error that ended it, or None (it ended with events)
    t_kill: float
    stream_end_s: float
    notice_s: float
    notice_bound_s: float  # the health check's period and timeout, plus slack
    serving_s: float

    def both_answered_before_the_kill(self) -> bool:
        """Nothing was left for the kill to cut: the gateway's call answered 200 with its whole
        answer, and the stream ended with its whole answer, no error. Seen once in a full run
        on this 2-core machine: the stream's third event reached the client only when the
        engine was done with both answers (its fourth held the other 1,797 tokens, merged by
        vLLM), and the gateway's answer came in the same instant; the stall before it was not
        traced (the stream's headers wait for the decision's save in Redis, fsynced). An answer
        cut by the kill never ends with ``finish_reason`` ``"length"``."""
        answer = self.in_flight.response
        if answer is None or answer.status_code != 200 or self.stream_error is not None:
            return False
        whole = answer.json()["choices"][0]["finish_reason"] == "length"
        events = [json.loads(line.removeprefix("data: ")) for line in self.lines if line != "data: [DONE]"]
        return whole and any(
            choice.get("finish_reason") == "length" for event in events for choice in event.get("choices", ())
        )


def _kill_engine_during_two_long_answers(running_stack, http: httpx.Client, gateway_app: str) -> EngineKill:
    url, key, model = running_stack.url, running_stack.tenant_key, running_stack.model
    config = deployment_config(MAIN_APP, "EngineReplica")
    notice_bound_s = config["health_check_period_s"] + config["health_check_timeout_s"] + SLACK_S

    # In flight through the Gateway app (which survives the engine): a long non-streaming call.
    in_flight = Probe(url, key, f"{gateway_app}/v1/chat/completions", chat(model, 1800), timeout_s=300)
    in_flight.start()
    # No outside signal says the call reached the engine (a whole answer's headers come at its
    # end); a second is ample here, and a call that had not arrived fails the same way.
    time.sleep(1.0)

    # In flight on the colocated replica itself: a stream, cut after a few events by the kill.
    killed: list[str] = []
    lines: list[str] = []
    stream_error: str | None = None
    t_kill = 0.0
    try:
        with http.stream("POST", "/v1/chat/completions", json=chat(model, 1800, stream=True)) as response:
            assert response.status_code == 200
            for line in sse_lines_sync(response.iter_bytes()):
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 3:
                    killed.append(kill_replica(MAIN_APP, "EngineReplica"))
                    t_kill = time.monotonic()
    except httpx.TransportError as exc:  # the process that was writing the stream is gone
        stream_error = type(exc).__name__
    assert killed, "the stream ended before the kill"
    stream_end_s = time.monotonic() - t_kill

    # Sent while no engine replica exists: what the ingress and the gateway do meanwhile.
    completion = {"model": model, "prompt": "hi", "max_tokens": 2}
    outage = [
        Probe(url, key, "/v1/completions", completion, timeout_s=30),
        Probe(url, key, f"{gateway_app}/v1/completions", completion, timeout_s=30),
    ]
    for probe in outage:
        probe.start()
    notice_s = wait_for_new_replica(MAIN_APP, "EngineReplica", killed[0], 1, timeout_s=notice_bound_s)
    # Only "not yet" answers (5xx, transport errors) until it serves: a 401 for this valid key
    # fails here (issue #18; the churn tests hold the same under aborts and restarts).
    wait_until_ok(http, "POST", "/v1/completions", timeout_s=300, json=completion)
    serving_s = time.monotonic() - t_kill
    for probe in [in_flight, *outage]:
        probe.join(timeout=300)
        assert not probe.is_alive(), f"{probe.path} hangs"
        refused = probe.response is not None and probe.response.status_code in (401, 403)
        assert not refused, f"a valid key was refused during the restart: {probe.outcome()}"
    return EngineKill(
        in_flight, outage, lines, stream_error, t_kill, stream_end_s, notice_s, notice_bound_s, serving_s
    )


def test_engine_replica_actor_killed_fails_in_flight_fast_then_recovers(
    running_stack, http: httpx.Client, gateway_app: str
) -> None:
    model = running_stack.model
    kill = _kill_engine_during_two_long_answers(running_stack, http, gateway_app)
    if kill.both_answered_before_the_kill():
        # The scenario did not happen (nothing was in flight at the kill): once more, on the
        # new replica. Every assertion below holds the second one to the same standard.
        print("\n[engine kill] both answers were whole before the kill; the kill is repeated")
        kill = _kill_engine_during_two_long_answers(running_stack, http, gateway_app)
    in_flight, outage, lines, stream_error = kill.in_flight, kill.outage, kill.lines, kill.stream_error
    t_kill, stream_end_s, notice_s, serving_s = kill.t_kill, kill.stream_end_s, kill.notice_s, kill.serving_s
    notice_bound_s = kill.notice_bound_s
    print(
        f"\n[engine kill] colocated stream ended {stream_end_s:.2f} s after the kill "
        f"({stream_error or 'events'}); in flight through the gateway: ended "
        f"{in_flight.ended - t_kill:.2f} s after the kill with {in_flight.outcome()}; "
        f"new replica actor after {notice_s:.1f} s (bound {notice_bound_s:.0f} s); "
        f"serving again {serving_s:.1f} s after the kill; sent during the outage: "
        + "; ".join(f"{p.path} -> {p.outcome()} after {p.ended - t_kill:.1f} s" for p in outage)
    )

    # Recovered: every request succeeds, on the colocated ingress and through the gateway.
    statuses = [
        http.post(path, json=chat(model, 4)).status_code
        for path in ["/v1/chat/completions"] * 10 + [f"{gateway_app}/v1/chat/completions"] * 5
    ]
    assert statuses == [200] * 15, statuses

    # The colocated stream: an error event then [DONE], or a dropped connection (the process
    # that would write the event died with the engine); never a made-up finish_reason.
    if stream_error is None:
        assert lines[-1] == "data: [DONE]"
        assert "error" in json.loads(lines[-2].removeprefix("data: ")), lines[-2]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events if e.get("choices"))
    assert stream_end_s < HANG_S

    # Through the gateway: a 5xx soon after the kill, as an OpenAI error object.
    failed = in_flight.response
    assert failed is not None, in_flight.outcome()
    assert in_flight.ended - t_kill < HANG_S
    assert failed.status_code >= 500, failed.text
    assert set(failed.json()["error"]) == {"message", "type", "param", "code"}, failed.text
