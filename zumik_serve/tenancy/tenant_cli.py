"""`zumik tenant list|key create|key list|key revoke|delete`: the operator's tenant commands.

Each command talks to the running stack's Redis (``ZUMIK_REDIS_URL``, else the embedded server
if it runs, else the embedded server started for the command). Exit codes: 0 done, 1 refused or
failed (the message says what to do), 2 a bad argument. A key is printed once, at creation, and
never again; listings show key ids and hints only.

``delete`` sweeps the KV tiers as a gateway's purge does: the profile's Redis tier from here, and
the node tiers (host RAM, disk) on every node of the Ray cluster the stack runs on, when the
command reaches it (``--ray-address``, ``RAY_ADDRESS``, or the head a running ``zumik serve``
started: ``cli.py`` wires it), else on this machine only, which the command says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from kvstore.tier import TierBackend
from kvstore.tiers.build import build_tiers
from profiles import Profile, ProfileError, resolve_profile
from zumik_serve.home import ZumikHome
from zumik_serve.purge.classes import GuaranteeClass
from zumik_serve.purge.deletion import DeletionOutcome, TenantDeletion
from zumik_serve.purge.nodes import NodeSweeper, node_tier_kinds
from zumik_serve.purge.service import PurgeService
from zumik_serve.purge.signing_keys import SigningKeys
from zumik_serve.purge.store import RedisPurgeStore
from zumik_serve.reuse.store import RedisReuseStore
from zumik_serve.routing.store import RedisRoutingStore
from zumik_serve.secret_files import secrets_dir
from zumik_serve.server_secrets import load_server_secrets
from zumik_serve.state.store import RedisStateStore
from zumik_serve.store.client import plain_client
from zumik_serve.store.local_redis import embedded_redis, running_kv_redis_url, running_redis_url
from zumik_serve.tenancy.store import RedisTenantStore, TenantDeletingError, TenantNotFoundError
from zumik_serve.tenancy.tenant import REVOCATION_BOUND_S, validate_key_id

T = TypeVar("T")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def run_tenant_list(args: argparse.Namespace, console: Console) -> int:
    async def work(client: Any) -> int:
        summaries = await RedisTenantStore(client).list_tenants()
        rows = [
            {"tenant": s.tenant.name, "tenant_id": s.tenant.id, "created_at_s": s.tenant.created_at_s,
             "keys": s.keys, "deleting": s.deleting}
            for s in summaries
        ]  # fmt: skip
        if args.json:
            print(json.dumps({"tenants": rows}))
            return EXIT_OK
        for row in rows:
            state = "  (being deleted: run `zumik tenant delete` again)" if row["deleting"] else ""
            print(f"{row['tenant']}\t{row['tenant_id']}\t{row['keys']} key(s){state}")
        if not rows:
            console.print("no tenants; create one with `zumik tenant create NAME`")
        return EXIT_OK

    return _run(work, console)


def run_key_create(args: argparse.Namespace, console: Console) -> int:
    async def work(client: Any) -> int:
        store = RedisTenantStore(client)
        info, api_key = await store.create_key(await store.require(args.tenant))
        if args.json:
            print(json.dumps({"tenant": args.tenant, "key_id": info.id, "hint": info.hint,
                              "created_at_s": info.created_at_s, "api_key": api_key}))  # fmt: skip
        else:
            console.print(
                f"created key [bold]{info.id}[/bold] of tenant {args.tenant}; the key (shown once):"
            )
            print(api_key)
        return EXIT_OK

    return _run(work, console)


def run_key_list(args: argparse.Namespace, console: Console) -> int:
    async def work(client: Any) -> int:
        store = RedisTenantStore(client)
        tenant = await store.require(args.tenant)
        keys = await store.list_keys(tenant.id)
        rows = [
            {"key_id": k.id, "hint": k.hint, "created_at_s": k.created_at_s, "legacy": k.legacy} for k in keys
        ]
        if args.json:
            print(json.dumps({"tenant": args.tenant, "keys": rows}))
            return EXIT_OK
        for row in rows:
            hint = f"...{row['hint']}" if row["hint"] else "(created before key ids: no hint)"
            print(f"{row['key_id']}\t{hint}\t{row['created_at_s'] or '-'}")
        if not rows:
            console.print(
                f"tenant {args.tenant} has no keys; `zumik tenant key create {args.tenant}` makes one"
            )
        return EXIT_OK

    return _run(work, console)


def run_key_revoke(args: argparse.Namespace, console: Console) -> int:
    try:
        key_id = validate_key_id(args.key_id)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE

    async def work(client: Any) -> int:
        store = RedisTenantStore(client)
        tenant = await store.require(args.tenant)
        if not await store.revoke_key(tenant.id, key_id):
            console.print(
                f"[red]error:[/red] tenant {args.tenant} has no key {key_id}; "
                f"`zumik tenant key list {args.tenant}` shows its keys"
            )
            return EXIT_FAILED
        if args.json:
            print(json.dumps({"tenant": args.tenant, "key_id": key_id, "revoked": True}))
        else:
            console.print(f"revoked {key_id}: every gateway refuses it within {REVOCATION_BOUND_S:g} s")
        return EXIT_OK

    return _run(work, console)


# The node sweeper of the cluster the stack runs on, for the engines' tier config; None when no
# cluster is reached (the deletion sweeps this machine's node tiers).
ClusterSweeper = Callable[[dict[str, Any]], NodeSweeper | None]


def run_tenant_delete(
    args: argparse.Namespace, console: Console, cluster_sweeper: ClusterSweeper = lambda _config: None
) -> int:
    if not args.yes:
        console.print(
            f"[red]error:[/red] deleting tenant {args.name} revokes its keys and purges all its data; "
            "it cannot be undone. Add --yes to go ahead."
        )
        return EXIT_USAGE
    try:
        profile = resolve_profile(args.profile)
    except ProfileError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    home = ZumikHome.from_env()

    async def work(client: Any, url: str) -> int:
        config = deletion_tier_config(
            profile, redis_url=url, home_root=home.root, kv_redis_url=running_kv_redis_url(home)
        )
        # The nodes get the node tiers' settings only: no Redis URL (its password) in a task's arguments.
        node_config = {name: value for name, value in config.items() if name != "redis_url"}
        nodes = cluster_sweeper(node_config) if node_tier_kinds(config) else None
        if node_tier_kinds(config) and nodes is None:
            console.print(
                "[yellow]note:[/yellow] no Ray cluster reached (--ray-address, RAY_ADDRESS or a running "
                "`zumik serve`): the host and disk KV tiers are swept on this machine only, and the "
                "receipt names it as the one node swept."
            )
        deletion = tenant_deletion(client, url=url, profile=profile, home=home, nodes=nodes)
        outcome = await deletion.delete(args.name)
        if outcome.receipt is None:
            done = ", ".join(outcome.job.done) or "none"
            console.print(
                f"[red]error:[/red] the deletion of {args.name} stopped ({outcome.job.error}); steps done: "
                f"{done}. Its keys are revoked. Run the same command again to resume it."
            )
            return EXIT_FAILED
        if not _keep_receipt(outcome, args.receipt_out, console):
            return EXIT_FAILED
        await deletion.forget(outcome)
        console.print(
            f"deleted tenant [bold]{args.name}[/bold] ({outcome.tenant.id}): receipt {outcome.job.id}, "
            f"class {outcome.receipt['guarantee_class']}, signed by {outcome.receipt['key_id']}; "
            "the name is free. Check it: zumik receipt verify FILE --public-key PEM (PEM from GET /v2/keys)."
        )
        return EXIT_OK

    return _run_with_url(work, console)


def tenant_deletion(
    client: Any,
    *,
    url: str,
    profile: Profile,
    home: ZumikHome,
    revocation_wait_s: float = REVOCATION_BOUND_S,
    nodes: NodeSweeper | None = None,
) -> TenantDeletion:
    """A ``TenantDeletion`` wired as a gateway wires its purges: the profile's ceiling and KV
    tiers, the secrets folder's signing key and cache-salt secret, the stores' traces. ``nodes``
    sweeps the node tiers on every node (None: this machine's own)."""
    folder = secrets_dir(home)
    server_secrets = load_server_secrets(folder)
    tenants = RedisTenantStore(client)
    state_store = RedisStateStore(client)
    purge_store = RedisPurgeStore(client, state_store)
    tiers, sealed = deletion_tiers(
        profile, redis_url=url, home_root=home.root, kv_redis_url=running_kv_redis_url(home)
    )

    async def salt_secret() -> bytes:
        return server_secrets.cache_salt_secret

    purges = PurgeService(
        purge_store, signing_keys=SigningKeys(folder), profile=profile.name,
        ceiling=GuaranteeClass(profile.purge.ceiling), tiers=tiers, sealed=sealed, salt_secret=salt_secret,
        salt_epoch=tenants.salt_epoch, rotate_salt_epoch=tenants.rotate_salt_epoch,
        forget_scopes=RedisReuseStore(client).forget_scopes, traces=RedisRoutingStore(client), nodes=nodes,
    )  # fmt: skip
    return TenantDeletion(tenants, purges, purge_store, revocation_wait_s=revocation_wait_s)


def deletion_tier_config(
    profile: Profile, *, redis_url: str, home_root: Path, kv_redis_url: str | None = None
) -> dict[str, Any]:
    """The connector config of ``profile``'s tiers as the engines place them
    (``engines/vllm_config.py``): the node's host tier folder (every compat key's blocks live
    under it) and disk folder with their budgets, and the KV Redis (``kv_redis_url``, as the
    gateway's user; the state Redis when the blocks live there). Empty when the tiers are off."""
    spec = profile.kv_tiers
    if not spec.enabled:
        return {}
    config: dict[str, Any] = {"host_capacity_bytes": spec.host_capacity_bytes}
    if spec.redis:
        config["redis_url"] = kv_redis_url or redis_url
    if spec.disk_root:
        config["disk_root"] = spec.disk_root.replace("$ZUMIK_HOME", str(home_root))
        config["disk_capacity_bytes"] = spec.disk_capacity_bytes
    return config


def deletion_tiers(
    profile: Profile, *, redis_url: str, home_root: Path, kv_redis_url: str | None = None
) -> tuple[list[TierBackend], bool]:
    """The KV tiers of ``profile`` (``deletion_tier_config``) as this machine reaches them, and
    whether they are sealed."""
    config = deletion_tier_config(
        profile, redis_url=redis_url, home_root=home_root, kv_redis_url=kv_redis_url
    )
    return (build_tiers(config), profile.kv_tiers.seal) if config else ([], False)


def _keep_receipt(outcome: DeletionOutcome, path: Path | None, console: Console) -> bool:
    text = json.dumps(outcome.receipt, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if path is None:
        print(text, end="", flush=True)
        return True
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except OSError as exc:
        console.print(
            f"[red]error:[/red] the deletion is done but its receipt could not be written to {path}: "
            f"{exc.strerror or exc}. Run the command again with another --receipt-out (nothing is lost)."
        )
        return False
    console.print(f"receipt written to {path}")
    return True


def _run(work: Callable[[Any], Awaitable[int]], console: Console) -> int:
    return _run_with_url(lambda client, _url: work(client), console)


def _run_with_url(work: Callable[[Any, str], Awaitable[int]], console: Console) -> int:
    home = ZumikHome.from_env().ensure()
    url = running_redis_url(home)
    temporary = None
    if url is None:  # nothing running: work on the embedded server's data directly
        temporary = embedded_redis(home).start()
        url = temporary.url

    async def main(url: str) -> int:
        client = plain_client(url)
        try:
            return await work(client, url)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main(url))
    except (TenantNotFoundError, TenantDeletingError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    finally:
        if temporary is not None:
            temporary.stop()
