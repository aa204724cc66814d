"""Zumik's replica choice inside one group deployment (app/request_router.py, app/replica_group.py),
without a cluster.

Invariants held here:
- Zumik's router ranks the picked replica alone when it runs, every replica otherwise (a pick
  whose replica left, or a pick of the group as a whole); its config pickles the way Serve ships
  it (by value) and the copy still reports to the gateway's own membership;
- the routers' view of the running replicas reaches the gateway's scheduler on its own loop:
  a replica that joins is chosen from, one that leaves is forgotten, no redeploy;
- a request while the group has no running replica is queued and waits a bounded time, then is
  withdrawn and answered 503 with Retry-After through the real dispatcher; a replica that
  appears meanwhile takes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.request_router import PendingRequest

from profiles import load_builtin
from zumik_serve.app.replica_group import HINT, GroupEngineClient, GroupMembership
from zumik_serve.app.request_router import ZumikRequestRouter, ranked, zumik_router_config
from zumik_serve.engines.protocol import (
    EngineCall,
    EngineEvent,
    EngineFailure,
    EngineResponse,
    ReplicaAssigned,
)
from zumik_serve.errors import EngineError
from zumik_serve.qos.quota import RateSettlement
from zumik_serve.routing.decision import DecisionRecord
from zumik_serve.routing.dispatch import Dispatcher, RouteContext
from zumik_serve.routing.retry import Attempt
from zumik_serve.routing.scheduler import ANY_REPLICA, ProfileScheduler

DEPLOYMENT = DeploymentID(name="EngineReplica", app_name="zumik")


@dataclass(frozen=True)
class Replica:
    """What the router reads of Serve's ``RunningReplica`` (building one needs a live actor)."""

    replica_id: ReplicaID


def make_replica(unique_id: str) -> Any:
    return Replica(ReplicaID(unique_id=unique_id, deployment_id=DEPLOYMENT))


def ids(ranks: list[list[Any]]) -> list[list[str]]:
    return [[replica.replica_id.unique_id for replica in rank] for rank in ranks]


def test_the_picked_replica_is_ranked_alone_and_a_gone_one_leaves_serve_the_choice() -> None:
    replicas = [make_replica(name) for name in ("a", "b", "c")]
    assert ids(ranked(replicas, "b")) == [["b"]]
    assert ids(ranked(replicas, "gone")) == [["a", "b", "c"]]
    assert ids(ranked(replicas, ANY_REPLICA)) == [["a", "b", "c"]]
    assert ids(ranked(replicas, None)) == [["a", "b", "c"]]


def test_the_router_reads_the_pick_from_the_calls_keywords() -> None:
    router = object.__new__(ZumikRequestRouter)  # its __init__ wants a running Serve
    replicas = [make_replica(name) for name in ("a", "b")]

    async def run(kwargs: dict[str, Any]) -> list[list[str]]:
        pending = PendingRequest(args=["chat", {}], kwargs=kwargs, metadata=None)  # type: ignore[arg-type]
        return ids(await router.choose_replicas(replicas, pending))

    assert asyncio.run(run({HINT: "b"})) == [["b"]]
    assert asyncio.run(run({})) == [["a", "b"]]


def test_membership_reaches_the_scheduler_on_its_loop_without_a_redeploy() -> None:
    scheduler = ProfileScheduler(load_builtin("local-cpu-2x"), replicas={"local": []})
    members = GroupMembership()

    async def run() -> list[list[str]]:
        members.listen(lambda replicas: scheduler.set_replicas("local", replicas))
        seen = []
        for replicas in (("a", "b"), ("a", "b", "c"), ("c",)):
            members.update(replicas)  # as the router does, from another thread in Serve
            await asyncio.sleep(0)
            seen.append(list(scheduler.replicas["local"]))
        return seen

    assert asyncio.run(run()) == [["a", "b"], ["a", "b", "c"], ["c"]]


class _Sink:
    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    async def save(
        self, tenant: str, record: DecisionRecord, attempts: Sequence[Attempt], sources: Sequence[str] = (),
        settlement: RateSettlement | None = None,
    ) -> None:  # fmt: skip
        self.records.append(record)


class _Handle:
    """The group deployment's handle as the client calls it (``handle.complete.remote(...)``):
    like Serve, it holds a call until a replica runs."""

    def __init__(self, members: GroupMembership) -> None:
        self.members = members
        self.calls: list[dict[str, Any]] = []
        self.cancelled = 0
        self.complete = self

    async def remote(self, call: str, body: dict[str, Any], **kwargs: Any) -> list[EngineEvent]:
        self.calls.append(kwargs)
        try:
            while not self.members.replicas:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return [ReplicaAssigned(self.members.replicas[0]), EngineResponse({"id": "cmpl-1", "choices": []})]


def test_a_group_without_replicas_waits_then_answers_503_with_retry_after() -> None:
    profile = load_builtin("local-cpu-2x")
    members = GroupMembership()
    members.update(())  # known: none running
    scheduler = ProfileScheduler(profile, replicas={"local": []})
    sink = _Sink()
    handle = _Handle(members)

    class Engines(dict[str, Any]):
        def __missing__(self, replica: str) -> GroupEngineClient:
            return GroupEngineClient(handle, None, members, replica, wait_s=0.2)

    dispatcher = Dispatcher(scheduler, engines=Engines(), decisions=sink)
    context = RouteContext(allowed_routes=frozenset({"local"}))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1}

    async def call() -> Any:
        return await dispatcher.start(
            EngineCall.COMPLETION, body, stream=False, tenant="t", salt="s", context=context
        )

    with pytest.raises(EngineError) as failed:
        asyncio.run(call())
    assert failed.value.status == 503 and failed.value.retry_after_s
    assert "No engine replica" in failed.value.message
    assert handle.calls == [{HINT: ANY_REPLICA}] and handle.cancelled == 1  # queued, then withdrawn
    assert sink.records[-1].pick is not None and sink.records[-1].pick.replica == ANY_REPLICA

    async def joins_meanwhile() -> Any:
        async def join() -> None:
            await asyncio.sleep(0.05)
            members.update(("a",))

        joined = asyncio.create_task(join())
        run = await call()
        await joined
        return run

    scheduler.breakers.clear()
    run = asyncio.run(joins_meanwhile())
    assert run.replica_id == "a" and handle.calls[-1] == {HINT: ANY_REPLICA} and handle.cancelled == 1


def test_a_failure_value_not_an_exception_when_no_replica() -> None:
    members = GroupMembership()
    members.update(())
    client = GroupEngineClient(_Handle(members), None, members, "a", wait_s=0.0)
    events = asyncio.run(client.complete(EngineCall.CHAT, {}))
    assert isinstance(events[0], EngineFailure) and events[0].status == 503


def test_an_autoscaled_group_is_one_deployment_with_serves_autoscaling_config() -> None:
    """The LLMConfig of a profile whose engine group autoscales carries Serve's
    autoscaling_config (as app/application.py builds it); a minimum above the maximum fails at
    load, naming it."""
    from pathlib import Path

    from ray.serve.config import AutoscalingConfig
    from ray.serve.llm import LLMConfig

    from profiles import ProfileError, parse_profile
    from zumik_serve.engines.vllm_config import llm_config_kwargs

    data = load_builtin("local-cpu-2x").model_dump(mode="json")
    data["engine"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2}
    profile = parse_profile(json.dumps(data), source="test")
    deployment = LLMConfig(**llm_config_kwargs(profile, Path("/models/tiny"), None)).deployment_config
    assert "num_replicas" not in deployment  # (Serve's options from it would start Ray here)
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    assert deployment["autoscaling_config"]["target_ongoing_requests"] == 2
    assert deployment["autoscaling_config"]["downscale_delay_s"] == 600  # Serve's default, written
    data["engine"]["autoscaling"] = {
        "min_replicas": 2, "max_replicas": 3, "initial_replicas": 3, "upscale_delay_s": 5,
        "downscale_delay_s": 10, "look_back_period_s": 15,
    }  # fmt: skip
    profile = parse_profile(json.dumps(data), source="test")
    config = LLMConfig(**llm_config_kwargs(profile, Path("/models/tiny"), None)).deployment_config
    served = AutoscalingConfig.model_validate(config["autoscaling_config"])  # Serve's own schema
    assert (served.initial_replicas, served.upscale_delay_s, served.downscale_delay_s) == (3, 5, 10)
    assert served.look_back_period_s == 15
    data["engine"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3, "look_back_period_s": 10}
    with pytest.raises(ProfileError, match="look_back_period_s .* above Serve's metrics interval"):
        parse_profile(json.dumps(data), source="test")
    data["engine"]["autoscaling"] = {"min_replicas": 4, "max_replicas": 3}
    with pytest.raises(ProfileError, match="min_replicas"):
        parse_profile(json.dumps(data), source="test")
    data["engine"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 4}
    with pytest.raises(ProfileError, match="initial_replicas"):
        parse_profile(json.dumps(data), source="test")


def test_the_router_config_ships_as_serve_ships_it_and_its_copy_reports_here() -> None:
    """Serve pickles the router's module by value into each handle's process: the copy must
    pickle, and still publish membership into the one registry the gateway listens to."""
    import subprocess
    import sys

    config = zumik_router_config()
    check = (
        "import pickle, sys; from zumik_serve.app import replica_group; "
        "cls = pickle.loads(sys.stdin.buffer.read()); "
        "assert cls.update_replicas.__globals__['replica_group'] is replica_group; "
        "assert cls.choose_replicas.__globals__['replica_group'].HINT == replica_group.HINT; "
        "print(cls.__name__)"
    )
    shipped = subprocess.run(
        [sys.executable, "-c", check], input=config.get_serialized_request_router_cls(),
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    assert shipped.returncode == 0 and shipped.stdout.strip() == b"ZumikRequestRouter", shipped.stderr[-2000:]


def test_a_group_replica_gives_its_engine_an_events_endpoint_of_its_own() -> None:
    """ray.serve.llm caches the engine config it builds from engine_kwargs (building the
    deployment options does, and starts Ray, so not here): each replica's own endpoint must
    drop that cache to reach the engine (it did not, once: no event was published)."""
    from pathlib import Path

    from ray.serve.llm import LLMConfig

    from zumik_serve.engines.replica import _own_kv_events_endpoints, with_kv_events
    from zumik_serve.engines.vllm_config import llm_config_kwargs

    kwargs = llm_config_kwargs(load_builtin("local-cpu-2x"), Path("/models/tiny"), None)
    kwargs["engine_kwargs"] = with_kv_events(kwargs["engine_kwargs"])
    config = LLMConfig(**kwargs)
    assert (
        _own_kv_events_endpoints(
            LLMConfig(**llm_config_kwargs(load_builtin("local-cpu-2x"), Path("/m"), None))
        )
        is None
    )
    endpoints = []
    for _ in range(2):
        copy = config.model_copy(deep=True)
        copy._engine_config = "built before the endpoint was set"  # type: ignore[assignment]
        own = _own_kv_events_endpoints(copy)
        assert own is not None
        assert copy._engine_config is None  # rebuilt from the kwargs below on first use
        events = copy.engine_kwargs["kv_events_config"]
        assert (events["endpoint"], events["replay_endpoint"]) == own
        assert copy.engine_kwargs["prefix_caching_hash_algo"] == "sha256_cbor"
        endpoints.extend(own)
    assert len(set(endpoints)) == 4 and all(e.startswith("ipc://") for e in endpoints)
