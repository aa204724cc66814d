"""`zumik decision replay ID`: replay a recorded routing decision from the operator's shell.

The record is read from the running stack's Redis (``ZUMIK_REDIS_URL``, else the embedded
server if it runs, else the embedded server started for the command), replayed from its
recorded inputs under its own policy version (``routing/replay.py``) and printed. Exit codes:
0 the replay is byte-equal to the record, 1 it differs (the fields that differ are named),
2 a bad argument (no such decision, or not the named tenant's).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from rich.console import Console

from zumik_serve.home import ZumikHome
from zumik_serve.ids import HandleKind, handle_kind
from zumik_serve.routing.replay import replay
from zumik_serve.routing.store import RedisRoutingStore, StoredDecision
from zumik_serve.store.client import plain_client
from zumik_serve.store.local_redis import embedded_redis, running_redis_url
from zumik_serve.tenancy.store import RedisTenantStore, TenantNotFoundError

EXIT_EQUAL, EXIT_DIFFERS, EXIT_USAGE = 0, 1, 2


def run_decision_replay(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console(stderr=True)
    if handle_kind(args.decision_id) is not HandleKind.DECISION:
        console.print(f"[red]error:[/red] {args.decision_id!r} is not a decision id (they look like dec_...)")
        return EXIT_USAGE
    home = ZumikHome.from_env().ensure()
    url = running_redis_url(home)
    temporary = None
    if url is None:  # nothing running: read the embedded server's data directly
        temporary = embedded_redis(home).start()
        url = temporary.url
    try:
        found = asyncio.run(_find(url, args.decision_id, args.tenant))
    except TenantNotFoundError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    finally:
        if temporary is not None:
            temporary.stop()
    if found is None:
        whose = f" of tenant {args.tenant!r}" if args.tenant else ""
        console.print(
            f"[red]error:[/red] no decision {args.decision_id!r}{whose} is recorded (records are kept "
            "30 days; a purge removes those of its objects)"
        )
        return EXIT_USAGE
    tenant, stored = found
    equal, recomputed = replay(stored.record)
    differing = sorted(
        k for k in recomputed.keys() | stored.record.keys() if recomputed.get(k) != stored.record.get(k)
    )
    if args.json:
        print(json.dumps({"decision_id": args.decision_id, "tenant": tenant, "equal": equal,
                          "differing_fields": differing, "record": recomputed}))  # fmt: skip
    else:
        print(json.dumps(recomputed, indent=2))
        if equal:
            console.print(f"[green]equal[/green]: {args.decision_id} replays byte for byte ({tenant})")
        else:
            console.print(
                f"[red]differs[/red]: {args.decision_id} ({tenant}) replays unequal in: "
                + ", ".join(differing)
            )
    return EXIT_EQUAL if equal else EXIT_DIFFERS


async def _find(url: str, decision_id: str, tenant_name: str | None) -> tuple[str, StoredDecision] | None:
    client = plain_client(url)
    try:
        store = RedisRoutingStore(client)
        if tenant_name is None:
            return await store.find_decision(decision_id)
        tenant = await RedisTenantStore(client).require(tenant_name)
        stored = await store.decision(tenant.id, decision_id)
        return None if stored is None else (tenant.id, stored)
    finally:
        await client.aclose()
