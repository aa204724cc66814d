"""``zumik bench churn``: many tenants read their own objects while the stack churns; no answer
may ever say a valid key is invalid or hand one tenant another's data.

Each tenant stores objects whose content names the tenant and the object; readers (one per
tenant) then send, back to back: reads of their own objects (the content must be exactly the
object's), reads of another tenant's object (must be 404) and ``GET /v1/models`` (must be 200),
and abort a share of them mid-flight (the request is cancelled, as a client that gives up).
Meanwhile disruptions run one after another: Redis killed with -9 and restarted, the engine
replica's actor killed (the gateway dies with it in the colocated placement).

    outcome        answers
    ok             the expected answer
    unavailable    503/502/504/500 from the ingress, a transport error, 429: allowed during churn
    aborted        cancelled by the reader itself
    violation      401/403 for a valid key, another tenant's content, another tenant's object
                   readable, an own object missing (404), any other status

The bench fails (exit 1) on any violation; every violation keeps its status and body.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

UNAVAILABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_KEPT_VIOLATIONS = 50
ProgressHook = Callable[[int], None]
Disruption = tuple[str, Callable[[], Awaitable[None]]]


@dataclass(frozen=True)
class StoredObject:
    tenant: str
    artifact_id: str
    content: str


@dataclass(frozen=True)
class ChurnTenant:
    name: str
    api_key: str
    objects: tuple[StoredObject, ...]


@dataclass(frozen=True)
class Violation:
    tenant: str
    what: str  # own-read, foreign-read, models
    status: int
    detail: str


@dataclass
class ChurnTally:
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    disruptions: list[dict[str, Any]] = field(default_factory=list)
    violation_count: int = 0

    def violate(self, violation: Violation) -> None:
        self.outcomes["violation"] += 1
        self.violation_count += 1
        if len(self.violations) < MAX_KEPT_VIOLATIONS:
            self.violations.append(violation)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "statuses": dict(sorted(self.statuses.items())),
            "violations": self.violation_count,
            "violation_samples": [v.__dict__ for v in self.violations],
            "disruptions": self.disruptions,
        }


def object_content(tenant: str, index: int) -> str:
    return f"tenant={tenant} object={index} nonce={uuid.uuid4().hex}"


async def store_objects(
    client: httpx.AsyncClient, tenant: str, count: int, *, deadline_s: float = 60.0
) -> tuple[StoredObject, ...]:
    """``count`` artifacts of ``tenant`` (``client`` carries its key), each naming the tenant."""
    stored = []
    for index in range(count):
        content = object_content(tenant, index)
        give_up = time.monotonic() + deadline_s
        while True:
            response = await client.post(
                "/v2/artifacts",
                json={"role": "document", "content": content},
                headers={"Idempotency-Key": f"{tenant}-{index}-{content[-8:]}"},
            )
            if response.status_code == 201:
                break
            if response.status_code not in UNAVAILABLE_STATUSES or time.monotonic() > give_up:
                raise RuntimeError(
                    f"storing {tenant}'s object {index}: {response.status_code} {response.text}"
                )
            await asyncio.sleep(0.5)
        stored.append(StoredObject(tenant, response.json()["id"], content))
    return tuple(stored)


async def read_under_churn(
    tenants: Sequence[ChurnTenant],
    make_client: Callable[[str], httpx.AsyncClient],
    *,
    disruptions: Sequence[Disruption],
    seconds: float,
    abort_share: float = 0.25,
    seed: int = 0,
    on_progress: ProgressHook = lambda _: None,
) -> ChurnTally:
    """Read for ``seconds`` (and until every disruption has run), one reader per tenant."""
    tally = ChurnTally()
    stop = asyncio.Event()
    rng = random.Random(seed)

    async def disrupt() -> None:
        started = time.monotonic()
        gap_s = seconds / (len(disruptions) + 1)
        for name, action in disruptions:
            await asyncio.sleep(max(0.0, started + gap_s * (len(tally.disruptions) + 1) - time.monotonic()))
            t0 = time.monotonic()
            await action()
            tally.disruptions.append({"what": name, "at_s": round(t0 - started, 1),
                                      "took_s": round(time.monotonic() - t0, 1)})  # fmt: skip
        await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
        stop.set()

    async def reader(tenant: ChurnTenant, others: list[StoredObject], reader_rng: random.Random) -> None:
        async with make_client(tenant.api_key) as client:
            while not stop.is_set():
                await _one_request(client, tenant, others, reader_rng, abort_share, tally)
                on_progress(1)

    readers = []
    for tenant in tenants:
        others = [obj for other in tenants if other.name != tenant.name for obj in other.objects]
        readers.append(reader(tenant, others, random.Random(rng.random())))
    await asyncio.gather(disrupt(), *readers)
    return tally


async def _one_request(
    client: httpx.AsyncClient, tenant: ChurnTenant, others: list[StoredObject], rng: random.Random,
    abort_share: float, tally: ChurnTally,
) -> None:  # fmt: skip
    draw = rng.random()
    if draw < 0.15 and others:
        what, target = "foreign-read", rng.choice(others)
    elif draw < 0.25:
        what, target = "models", None
    else:
        what, target = "own-read", rng.choice(tenant.objects)
    path = "/v1/models" if target is None else f"/v2/artifacts/{target.artifact_id}"
    request = client.get(path)
    try:
        if rng.random() < abort_share:  # a client that gives up mid-flight
            response = await asyncio.wait_for(request, timeout=rng.uniform(0.0, 0.02))
        else:
            response = await request
    except TimeoutError:
        tally.outcomes["aborted"] += 1
        return
    except httpx.TransportError as exc:
        tally.outcomes["unavailable"] += 1
        tally.statuses[type(exc).__name__] += 1
        await asyncio.sleep(0.05)
        return
    status = response.status_code
    tally.statuses[str(status)] += 1
    verdict = _judge(what, target, tenant, response)
    if verdict is None:
        tally.outcomes["ok"] += 1
    elif verdict == "unavailable":
        tally.outcomes["unavailable"] += 1
        await asyncio.sleep(0.05)
    else:
        tally.violate(Violation(tenant.name, what, status, f"{verdict}: {response.text[:300]}"))


def _judge(
    what: str, target: StoredObject | None, tenant: ChurnTenant, response: httpx.Response
) -> str | None:
    """None when the answer is the expected one; "unavailable" when allowed during churn; else
    why it is a violation."""
    status = response.status_code
    if status in UNAVAILABLE_STATUSES:
        return "unavailable"
    if status in (401, 403):
        return "a valid key was refused"
    if what == "models":
        return None if status == 200 else f"unexpected status {status}"
    assert target is not None
    if what == "foreign-read":
        if status == 200:
            return f"{tenant.name} read {target.tenant}'s object"
        return None if status == 404 else f"unexpected status {status}"
    if status == 404:
        return "an own object is missing"
    if status != 200:
        return f"unexpected status {status}"
    content = response.json().get("content")
    if content != target.content:
        return f"wrong content (expected {target.tenant}'s object {target.artifact_id})"
    return None


def write_summary(out: Path, name: str, settings: dict[str, Any], summary: dict[str, Any]) -> Path:
    """``out/<name>.json``: the run's settings and its summary (the churn and durability benches)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"settings": settings, **summary}, indent=2) + "\n")
    return path


# --- the CLI command: a stack of its own, Redis and replica restarts --------------------------


def run_churn_bench(args: Any, console: Any) -> int:
    import logging

    from rich.progress import Progress

    from profiles import resolve_profile
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.store.local_redis import free_port

    logging.getLogger("httpx").setLevel(logging.WARNING)
    profile = resolve_profile(args.profile)
    stack = LocalStack(StackConfig.from_env(profile, port=free_port(), dev_key=None))
    try:
        with console.status("starting the Zumik stack (about 2 minutes)"):
            stack.start(lambda message: console.log(message))
        tenants = asyncio.run(prepare_tenants(stack.url, stack.redis_url, args.tenants, args.objects))
        disruptions: list[Disruption] = []
        redis_restart: Disruption = (
            "redis kill -9 + restart",
            lambda: asyncio.to_thread(restart_redis, stack),
        )
        replica_kill: Disruption = ("engine replica killed", lambda: asyncio.to_thread(kill_engine_replica))
        for cycle in range(max(args.redis_restarts, args.replica_restarts)):
            if cycle < args.redis_restarts:
                disruptions.append(redis_restart)
            if cycle < args.replica_restarts:
                disruptions.append(replica_kill)
        with Progress(console=console) as progress:
            task = progress.add_task(f"{args.tenants} tenants reading under churn", total=None)

            def make_client(key: str) -> httpx.AsyncClient:
                return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"},
                                         timeout=args.timeout_s)  # fmt: skip

            tally = asyncio.run(read_under_churn(
                tenants, make_client, disruptions=disruptions, seconds=args.seconds,
                abort_share=args.abort_share, seed=args.seed, on_progress=lambda n: progress.advance(task, n),
            ))  # fmt: skip
    finally:
        stack.stop()
    names = (
        "profile",
        "tenants",
        "objects",
        "seconds",
        "redis_restarts",
        "replica_restarts",
        "abort_share",
        "seed",
    )
    settings = {name: getattr(args, name) for name in names}
    path = write_summary(args.out, "churn", settings, tally.summary())
    summary = tally.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        console.print(f"requests {summary['requests']}: {summary['outcomes']}")
        console.print(f"statuses: {summary['statuses']}")
        console.print(f"disruptions: {summary['disruptions']}")
        for violation in tally.violations[:10]:
            console.print(f"[red]violation[/red] {violation}")
        console.print(f"wrote {path}")
    return 0 if tally.violation_count == 0 else 1


async def prepare_tenants(url: str, redis_url: str, tenants: int, objects: int) -> list[ChurnTenant]:
    """``tenants`` new tenants (through the real tenant store), each with ``objects`` objects."""
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    prepared = []
    client = aioredis.from_url(redis_url)
    try:
        for index in range(tenants):
            name = f"churn-{index}-{uuid.uuid4().hex[:6]}"
            _, key = await RedisTenantStore(client).create_tenant(name)
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
                prepared.append(ChurnTenant(name, key, await store_objects(http, name, objects)))
    finally:
        await client.aclose()
    return prepared


def restart_redis(stack: Any) -> None:
    """kill -9 the stack's embedded redis-server and start it again on the same port and data."""
    from zumik_serve.store.local_redis import embedded_redis

    if stack.redis is None:
        raise RuntimeError("the stack uses an external Redis; this bench restarts only its own")
    port = stack.redis.port
    stack.redis.kill()
    stack.redis = embedded_redis(stack.config.home, port=port).start()


def kill_engine_replica(app: str = "zumik", deployment: str = "EngineReplica") -> None:
    """``ray.kill`` the first replica actor of ``app``/``deployment``; Serve starts a new one."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    actors = sorted(
        (a["name"], a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    )
    if not actors:
        raise RuntimeError(f"no replica actor of {app}/{deployment}")
    name, namespace = actors[0]
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
