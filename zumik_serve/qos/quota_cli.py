"""`zumik tenant quota set|show`: a tenant's own limits, over the profile's ``quota`` defaults.

Overrides live in Redis (``qos/store.py``), where every gateway's write scripts and rate window
read them on the next request. The command talks to the running stack's Redis
(``ZUMIK_REDIS_URL``, else the embedded server if it runs, else the embedded server started
for the command). Exit codes: 0 done, 1 refused (an unknown tenant), 2 a bad argument.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from rich.console import Console

from profiles import Profile, resolve_profile
from profiles.model import QuotaSpec
from zumik_serve.home import ZumikHome
from zumik_serve.qos.quota import Quota, QuotaOverrides, limits_in_force, parse_override
from zumik_serve.qos.store import RedisQuotaStore
from zumik_serve.store.client import plain_client
from zumik_serve.store.local_redis import embedded_redis, running_redis_url
from zumik_serve.tenancy.store import RedisTenantStore


def run_tenant_quota(args: argparse.Namespace, console: Console) -> int:
    """``set`` (when ``args`` has the limit options) or ``show``."""
    setting = hasattr(args, "stored_bytes")
    changes: dict[str, object] = {}
    reset: set[str] = set()
    profile: Profile | None = None
    try:
        for quota in Quota if setting else ():
            text = getattr(args, quota.value)
            if text is not None:
                value = parse_override(text)
                if value is None:
                    reset.add(quota.value)
                else:
                    changes[quota.value] = value
        overrides = QuotaOverrides.model_validate(changes)
        if not setting:
            profile = resolve_profile(args.profile)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if setting and not changes and not reset:
        console.print("[red]error:[/red] name at least one limit, e.g. --objects 1000")
        return 2
    home = ZumikHome.from_env().ensure()
    url = running_redis_url(home)
    temporary = None
    if url is None:  # nothing running: read and write the embedded server's AOF directly
        temporary = embedded_redis(home).start()
        url = temporary.url

    async def run(url: str) -> dict[str, object]:
        client = plain_client(url)
        try:
            tenant_id = args.tenant
            if not tenant_id.startswith("ten_"):
                tenant_id = (await RedisTenantStore(client).require(args.tenant)).id
            store = RedisQuotaStore(client, profile.quota if profile is not None else QuotaSpec())
            if setting:
                await store.set_overrides(tenant_id, overrides, reset=frozenset(reset))
            stored = await store.overrides(tenant_id)
            usage = await store.usage(tenant_id)
        finally:
            await client.aclose()
        shown: dict[str, object] = {"tenant_id": tenant_id, "overrides": stored.stored()}
        if profile is not None:
            limits = limits_in_force(profile.quota, stored)
            shown["limits"] = {quota.value: limit for quota, limit in limits.items()}
        shown["usage"] = {"stored_bytes": usage.stored_bytes, "objects": usage.objects}
        return shown

    try:
        shown = asyncio.run(run(url))
    except ValueError as exc:  # an unknown tenant name
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        if temporary is not None:
            temporary.stop()
    if args.json:
        print(json.dumps(shown))
    else:
        for key, part in shown.items():
            console.print(f"{key}: {part}")
    return 0
