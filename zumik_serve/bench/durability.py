"""``zumik bench durability`` (T9): writers create /v2 artifacts and append session turns without
pause while redis-server and the gateway process are killed with -9, one after the other; every
write the server acknowledged must still be there, with its exact content, after each cycle and
at the end (a Jepsen set checker).

Each write is sent once, with a fresh Idempotency-Key and without a retry, so that its outcome
is the server's answer to it alone:

    acknowledged   a 201: it must be present from then on; absent (or other content) is LOST
    indeterminate  an outage answer (429/5xx from the gateway or the ingress) or a transport
                   error: present or absent, both allowed, both counted
    refused        any other answer (a 401, a 400 ...): the bench fails

One cycle: at least ``writes_between`` more acknowledged writes, the kill (Redis: SIGKILL, then a
new redis-server on the same port and data directory, as the stack starts it; gateway: SIGKILL
of a Serve replica process of the deployment that terminates HTTP, which Serve's controller
replaces), the first acknowledged write after it (the recovery time), then the store check of
everything acknowledged so far. The final check reads every acknowledged write through the HTTP
API as well. Turns are also checked for the other set-checker outcomes: a turn no writer sent
(unexpected), a turn stored twice (duplicate), a gap or reorder in the numbering.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from zumik_serve.bench.churn import UNAVAILABLE_STATUSES, Disruption, restart_redis, write_summary

MAX_KEPT_SAMPLES = 20
TURNS_PER_SESSION = 1000  # a new session then: the profile's turn quota is per session
CheckFn = Callable[["WriteLog", str], Awaitable["Check"]]


@dataclass
class SessionLog:
    id: str
    sent: set[str] = field(default_factory=set)  # every turn content sent (acknowledged or not)
    acked: dict[int, str] = field(default_factory=dict)  # seq -> content


@dataclass
class WriteLog:
    """What the writers sent and what the server acknowledged (shared by all writers)."""

    acked_artifacts: dict[str, str] = field(default_factory=dict)  # id -> content
    unacked_artifacts: set[str] = field(default_factory=set)  # contents without a 201
    sessions: list[SessionLog] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)  # acknowledged, indeterminate, refused
    causes: Counter[str] = field(default_factory=Counter)  # why a write was indeterminate
    refusals: list[str] = field(default_factory=list)

    @property
    def acked(self) -> int:
        return self.outcomes["acknowledged"]

    def refuse(self, what: str, response: httpx.Response) -> None:
        self.outcomes["refused"] += 1
        if len(self.refusals) < MAX_KEPT_SAMPLES:
            self.refusals.append(f"{what}: {response.status_code} {response.text[:300]}")


@dataclass(frozen=True)
class Check:
    """One pass of the set checker over everything acknowledged when it started."""

    at: str
    acknowledged: int
    lost: int
    unacked_present: int
    unacked_absent: int
    unexpected: int  # turns present that no writer sent
    duplicates: int  # turns present twice
    lost_samples: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.lost == self.unexpected == self.duplicates == 0


@dataclass(frozen=True)
class Cycle:
    index: int
    kind: str
    took_s: float  # the kill and the restart action
    recovered_s: float  # from the kill to the first acknowledged write after it
    check: Check


@dataclass
class DurabilityRun:
    log: WriteLog
    cycles: list[Cycle] = field(default_factory=list)
    final: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        checks = [c.check for c in self.cycles] + self.final
        # Both kinds of write must have been acknowledged, or the check was vacuous for one.
        both = bool(self.log.acked_artifacts) and any(s.acked for s in self.log.sessions)
        return both and bool(self.final) and all(c.ok for c in checks) and self.log.outcomes["refused"] == 0

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, list[Cycle]] = {}
        for cycle in self.cycles:
            by_kind.setdefault(cycle.kind, []).append(cycle)
        return {
            "ok": self.ok,
            "writes": dict(self.log.outcomes),
            "indeterminate_causes": dict(sorted(self.log.causes.items())),
            "refusals": self.log.refusals,
            "kills": {
                kind: {
                    "cycles": len(cycles),
                    "recovered_s_max": max(c.recovered_s for c in cycles),
                    "recovered_s_mean": round(sum(c.recovered_s for c in cycles) / len(cycles), 2),
                    "lost": sum(c.check.lost for c in cycles),
                }  # fmt: skip
                for kind, cycles in by_kind.items()
            },
            "cycles": [{**asdict(c), "check": asdict(c.check)} for c in self.cycles],
            "final": [asdict(check) for check in self.final],
        }


# --- the writers -------------------------------------------------------------------------


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any], log: WriteLog, what: str) -> Any:
    """The 201 body, or None when the write is indeterminate or refused (logged either way). Each
    write carries a fresh Idempotency-Key (as careful clients send; it is never sent again)."""
    try:
        response = await client.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    except httpx.TransportError as exc:
        log.outcomes["indeterminate"] += 1
        log.causes[type(exc).__name__] += 1
        return None
    if response.status_code == 201:
        log.outcomes["acknowledged"] += 1
        return response.json()
    if response.status_code in UNAVAILABLE_STATUSES:
        log.outcomes["indeterminate"] += 1
        log.causes[str(response.status_code)] += 1
    else:
        log.refuse(what, response)
    return None


async def _new_session(client: httpx.AsyncClient, log: WriteLog, stop: asyncio.Event) -> SessionLog | None:
    while not stop.is_set():
        created = await _post(client, "/v2/sessions", {}, log, "session")
        if created is not None:
            session = SessionLog(str(created["id"]))
            log.sessions.append(session)
            return session
        await asyncio.sleep(0.1)
    return None


async def write_until_stopped(
    client: httpx.AsyncClient, index: int, log: WriteLog, stop: asyncio.Event
) -> None:
    """One writer: an artifact, then a turn with the same content, without pause."""
    session = None
    n = 0
    while not stop.is_set():
        if session is None or len(session.sent) >= TURNS_PER_SESSION:
            session = await _new_session(client, log, stop)
            if session is None:
                return
        n += 1
        content = f"w{index}-{n}-{uuid.uuid4().hex}"
        body = {"role": "document", "content": content}
        created = await _post(client, "/v2/artifacts", body, log, "artifact")
        if created is not None:
            log.acked_artifacts[str(created["id"])] = content
        else:
            log.unacked_artifacts.add(content)
        session.sent.add(content)
        turn = await _post(client, f"/v2/sessions/{session.id}/turns", {"role": "user", "content": content},
                           log, "turn")  # fmt: skip
        if turn is not None:
            session.acked[int(turn["seq"])] = content
        if created is None or turn is None:
            await asyncio.sleep(0.05)  # an outage: do not spin


# --- the checker -------------------------------------------------------------------------


def _judge_turns(
    at: str, session: SessionLog, acked: dict[int, str], stored: list[str], tally: Counter[str],
    lost: list[str],
) -> None:  # fmt: skip
    """Count one session's outcomes: ``acked`` as when the check started, ``stored`` its turns'
    contents in seq order, read since; ``session`` is the live log (writers may go on: what
    they sent is read after ``stored``, so a turn stored meanwhile is not "unexpected")."""
    for seq, content in acked.items():
        tally["acknowledged"] += 1
        if seq > len(stored) or stored[seq - 1] != content:
            tally["lost"] += 1
            lost.append(f"{at}: turn {seq} of {session.id}")
    acked_now = set(session.acked.values())
    tally["unexpected"] += sum(1 for content in stored if content not in session.sent)
    tally["duplicates"] += len(stored) - len(set(stored))
    present = {content for content in stored if content in session.sent and content not in acked_now}
    tally["unacked_present"] += len(present)
    tally["unacked_absent"] += len(session.sent - acked_now - present)


def _check(at: str, tally: Counter[str], lost: list[str]) -> Check:
    return Check(
        at=at, acknowledged=tally["acknowledged"], lost=tally["lost"],
        unacked_present=tally["unacked_present"], unacked_absent=tally["unacked_absent"],
        unexpected=tally["unexpected"], duplicates=tally["duplicates"],
        lost_samples=tuple(lost[:MAX_KEPT_SAMPLES]),
    )  # fmt: skip


def _snapshot(log: WriteLog) -> tuple[dict[str, str], set[str], list[tuple[SessionLog, dict[int, str]]]]:
    """What was acknowledged and sent when a check starts (the writers go on meanwhile): each
    live session with a copy of its acknowledged turns."""
    sessions = [(s, dict(s.acked)) for s in log.sessions]
    return dict(log.acked_artifacts), set(log.unacked_artifacts), sessions


async def check_store(redis_url: str, tenant: str, log: WriteLog, at: str) -> Check:
    """The set checker over the store itself (``RedisStateStore``, as the gateway reads it):
    cheap enough to run over every acknowledged write after every cycle."""
    from zumik_serve.state.objects import Artifact, content_digest
    from zumik_serve.state.requests import TEXT_MEDIA_TYPE
    from zumik_serve.state.store import RedisStateStore
    from zumik_serve.store.client import gateway_client

    artifacts, unacked, sessions = _snapshot(log)
    tally: Counter[str] = Counter()
    lost: list[str] = []
    client = gateway_client(redis_url)
    try:
        store = RedisStateStore(client)
        ids = list(artifacts)
        for start in range(0, len(ids), 500):
            batch = ids[start : start + 500]
            records = await store.get_records(tenant, batch)
            digests = [r.digest if isinstance(r, Artifact) else "" for r in records]
            blobs = await store.get_blobs(tenant, digests)
            for handle, blob in zip(batch, blobs, strict=True):
                tally["acknowledged"] += 1
                if blob is None or blob.decode() != artifacts[handle]:
                    tally["lost"] += 1
                    lost.append(f"{at}: artifact {handle}")
        sent = sorted(unacked)
        present = await store.get_blobs(tenant, [content_digest(c.encode(), TEXT_MEDIA_TYPE) for c in sent])
        tally["unacked_present"] += sum(1 for blob in present if blob is not None)
        tally["unacked_absent"] += sum(1 for blob in present if blob is None)
        for session, acked in sessions:
            stored = [turn.content for turn in await store.own_turns(tenant, session.id)]
            _judge_turns(at, session, acked, stored, tally, lost)
    finally:
        await client.aclose()
    return _check(at, tally, lost)


async def _read(client: httpx.AsyncClient, path: str, give_up_s: float = 60.0) -> httpx.Response | None:
    """GET ``path``, again while the answer is an outage; None if it stays one."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            response = await client.get(path)
            if response.status_code not in UNAVAILABLE_STATUSES:
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(0.5)


async def check_api(client: httpx.AsyncClient, log: WriteLog, at: str, concurrency: int = 16) -> Check:
    """The set checker through the HTTP API: every acknowledged artifact read back by id, every
    session's turns listed. Unacknowledged artifacts have no id to read: ``check_store`` counts them."""
    artifacts, _, sessions = _snapshot(log)
    tally: Counter[str] = Counter()
    lost: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(handle: str, content: str) -> None:
        async with gate:
            response = await _read(client, f"/v2/artifacts/{handle}")
        tally["acknowledged"] += 1
        if response is None or response.status_code != 200 or response.json().get("content") != content:
            tally["lost"] += 1
            answer = "no answer" if response is None else f"{response.status_code} {response.text[:200]}"
            lost.append(f"{at}: artifact {handle}: {answer}")

    await asyncio.gather(*(one(handle, content) for handle, content in artifacts.items()))
    for session, acked in sessions:
        response = await _read(client, f"/v2/sessions/{session.id}")
        if response is None or response.status_code != 200:
            tally["acknowledged"] += len(acked)
            tally["lost"] += len(acked)
            lost.append(f"{at}: session {session.id} unreadable")
            continue
        turns = response.json()["turns"]
        if [t["seq"] for t in turns] != list(range(1, len(turns) + 1)):
            tally["lost"] += 1  # a gap or a reorder loses a turn's place
            lost.append(f"{at}: session {session.id} numbering {[t['seq'] for t in turns][:20]}")
        _judge_turns(at, session, acked, [t["content"] for t in turns], tally, lost)
    return _check(at, tally, lost)


# --- the cycles --------------------------------------------------------------------------


async def run_cycles(
    make_client: Callable[[], httpx.AsyncClient],
    kills: Sequence[Disruption],
    check: CheckFn,
    *,
    writers: int = 4,
    writes_between: int = 50,
    recover_timeout_s: float = 300.0,
    on_cycle: Callable[[Cycle], None] = lambda _: None,
) -> DurabilityRun:
    """Writers run throughout; ``kills`` run one by one, each followed by ``check``; at the end the
    writers stop and ``check`` runs once more, then the HTTP read-back (``check_api``)."""
    log = WriteLog()
    run = DurabilityRun(log)
    stop = asyncio.Event()
    clients = [make_client() for _ in range(writers)]
    tasks = [asyncio.create_task(write_until_stopped(c, i, log, stop)) for i, c in enumerate(clients)]

    async def acked_beyond(count: int, what: str) -> None:
        deadline = time.monotonic() + recover_timeout_s
        while log.acked < count:
            if time.monotonic() > deadline or all(t.done() for t in tasks):
                raise RuntimeError(f"no acknowledged write for {recover_timeout_s:.0f} s {what}; "
                                   f"outcomes {dict(log.outcomes)}, causes {dict(log.causes)}")  # fmt: skip
            await asyncio.sleep(0.05)

    try:
        for index, (kind, kill) in enumerate(kills, start=1):
            await acked_beyond(log.acked + writes_between, f"before kill {index} ({kind})")
            started = time.monotonic()
            await kill()
            took_s = time.monotonic() - started
            await acked_beyond(log.acked + 1, f"after kill {index} ({kind})")
            recovered_s = time.monotonic() - started
            cycle = Cycle(index, kind, round(took_s, 2), round(recovered_s, 2),
                          await check(log, f"cycle {index} ({kind})"))  # fmt: skip
            run.cycles.append(cycle)
            on_cycle(cycle)
        await acked_beyond(log.acked + writes_between, "after the last kill")
        stop.set()
        for task in tasks:
            if (error := await asyncio.gather(task, return_exceptions=True)) != [None]:
                raise RuntimeError("a writer failed") from error[0]
        run.final.append(await check(log, "final (store)"))
        run.final.append(await check_api(clients[0], log, "final (api)"))
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()
    return run


def alternate(cycles: int, redis: Disruption, gateway: Disruption) -> list[Disruption]:
    """``cycles`` kills of each, Redis first, one after the other."""
    return [kill for _ in range(cycles) for kill in (redis, gateway)]


# --- killing a replica process -----------------------------------------------------------


def replica_pids(app: str, deployment: str) -> set[int]:
    """Pids of this process's descendants that run a Serve replica of ``app``/``deployment``
    (Ray titles a replica's worker ``ray::ServeReplica:<app>:<deployment>``); only a Ray head
    this process started has its workers among them."""
    import psutil

    title = f"ServeReplica:{app}:{deployment}"
    pids = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if title in " ".join(process.cmdline()):
                pids.add(process.pid)
        except psutil.Error:  # exited meanwhile
            continue
    return pids


def kill_replica_process(app: str, deployment: str, replicas: int, timeout_s: float = 180.0) -> None:
    """SIGKILL one replica process of ``app``/``deployment``; returns once Serve has started a
    replacement (``replicas`` replica processes other than the killed one)."""
    pids = replica_pids(app, deployment)
    if not pids:
        raise RuntimeError(f"no replica process of {app}/{deployment} under this process's Ray head")
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while len(replica_pids(app, deployment) - {victim}) < replicas:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{app}/{deployment} got no new replica process in {timeout_s:.0f} s")
        time.sleep(0.2)


# --- the CLI command ---------------------------------------------------------------------


def run_durability_bench(args: Any, console: Any) -> int:
    import logging

    from rich.progress import Progress
    from rich.table import Table

    from profiles import GatewayPlacement, resolve_profile
    from zumik_serve.app.application import APP_NAME
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.store.local_redis import free_port

    logging.getLogger("httpx").setLevel(logging.WARNING)
    profile = resolve_profile(args.profile)
    placement = GatewayPlacement(args.placement)
    update: dict[str, Any] = {"placement": placement}
    if placement is GatewayPlacement.SEPARATE:
        update["num_replicas"] = args.gateway_replicas
    profile = profile.model_copy(update={"gateway": profile.gateway.model_copy(update=update)})
    # The process that terminates HTTP: the Gateway replica, or the engine replica it lives in.
    deployment = "Gateway" if placement is GatewayPlacement.SEPARATE else "EngineReplica"
    replicas = args.gateway_replicas if placement is GatewayPlacement.SEPARATE else 1
    stack = LocalStack(StackConfig.from_env(profile, port=free_port(), dev_key=None))
    started = time.monotonic()
    try:
        with console.status("starting the Zumik stack (about 2 minutes)"):
            stack.start(lambda message: console.log(message))
        tenant, key = asyncio.run(new_tenant(stack.redis_url, "durability"))
        redis_kill: Disruption = ("redis", lambda: asyncio.to_thread(restart_redis, stack))
        gateway_kill: Disruption = (
            "gateway",
            lambda: asyncio.to_thread(kill_replica_process, APP_NAME, deployment, replicas),
        )
        kills = alternate(args.cycles, redis_kill, gateway_kill)

        def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {key}"},
                                     timeout=args.timeout_s)  # fmt: skip

        async def check(log: WriteLog, at: str) -> Check:
            return await check_store(stack.redis_url, tenant, log, at)

        with Progress(console=console) as progress:
            task = progress.add_task(f"kill -9 cycles (redis, {deployment} process)", total=len(kills))

            def on_cycle(cycle: Cycle) -> None:
                c = cycle.check
                console.log(
                    f"cycle {cycle.index}/{len(kills)} {cycle.kind}: recovered in {cycle.recovered_s:.1f} s; "
                    f"acknowledged {c.acknowledged}, lost {c.lost}, unacknowledged present "
                    f"{c.unacked_present} / absent {c.unacked_absent}"
                )
                progress.advance(task)

            run = asyncio.run(run_cycles(
                make_client, kills, check, writers=args.writers, writes_between=args.writes_between,
                on_cycle=on_cycle,
            ))  # fmt: skip
    finally:
        stack.stop()
    settings = {name: getattr(args, name) for name in ("profile", "placement", "gateway_replicas",
                                                        "cycles", "writers", "writes_between")}  # fmt: skip
    settings.update(killed_deployment=deployment, wall_s=round(time.monotonic() - started, 1))
    path = write_summary(args.out, "durability", settings, run.summary())
    summary = run.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        kills_table = Table(title=f"kill -9 cycles ({args.cycles} of each, alternating)")
        for column in ("killed", "cycles", "recovery mean (s)", "recovery max (s)", "lost"):
            kills_table.add_column(column)
        for kind, row in summary["kills"].items():
            kills_table.add_row(kind, str(row["cycles"]), f"{row['recovered_s_mean']:.1f}",
                                f"{row['recovered_s_max']:.1f}", str(row["lost"]))  # fmt: skip
        console.print(kills_table)
        checks = Table(title="set checker at the end (turns and artifacts)")
        for column in ("read through", "acknowledged", "lost", "unacked present", "unacked absent",
                       "unexpected", "duplicates"):  # fmt: skip
            checks.add_column(column)
        for c in run.final:
            counts = (c.acknowledged, c.lost, c.unacked_present, c.unacked_absent, c.unexpected, c.duplicates)
            checks.add_row(c.at, *(str(v) for v in counts))
        console.print(checks)
        console.print(
            f"writes: {summary['writes']}; indeterminate by cause: {summary['indeterminate_causes']}"
        )
        for line in [s for c in run.final for s in c.lost_samples][:10] + run.log.refusals[:10]:
            console.print(f"[red]violation[/red] {line}")
        console.print(f"wrote {path}")
    return 0 if run.ok else 1


async def new_tenant(redis_url: str, prefix: str) -> tuple[str, str]:
    """A new tenant named ``<prefix>-<random>`` (through the real tenant store): its id and API key."""
    from zumik_serve.store.client import gateway_client
    from zumik_serve.tenancy.store import RedisTenantStore

    client = gateway_client(redis_url)
    try:
        tenant, key = await RedisTenantStore(client).create_tenant(f"{prefix}-{uuid.uuid4().hex[:8]}")
    finally:
        await client.aclose()
    return str(tenant.id), key
