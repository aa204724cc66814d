"""The gateway's Redis client and the one place a Redis failure becomes a Zumik error.

Callers outside the store modules never see a ``RedisError``: ``guard`` turns an outage into
``StoreUnavailableError`` (503 with ``Retry-After``), and logs the Redis error's class (no data).
Every command and pipeline of the gateway's client ends within ``COMMAND_TIMEOUT_S``, whoever
calls it: a hung Redis is a ``redis.exceptions.TimeoutError`` (a ``RedisError``), never a request
that waits forever.
A refused user is a misconfiguration, not an outage: ``check_access`` stops a deployment at
start with what to check, and ``guard`` logs the same advice should it happen later (a password
rotated in Redis but not in the gateway). So is a state Redis that may lose a write it
acknowledged (``check_durability``): Zumik answers a write only once Redis has it on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.store.redis_acl import GATEWAY_USER, RedisAccessError, access_refused_message, advice

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

GATEWAY_POOL_CONNECTIONS = 48
STALE_CONNECTION_RETRIES = 1
COMMAND_TIMEOUT_S = 15.0  # a command or pipeline, from the wait for a pooled connection to its reply
# "unchecked": start on a state Redis whose durability is not shown (the gap is logged instead).
DURABILITY_ENV = "ZUMIK_REDIS_DURABILITY"


def gateway_client(url: str) -> aioredis.Redis:
    """A client over a bounded pool that requests wait on: with admission (not Serve) bounding
    concurrency, a burst would otherwise open a connection per request at once and time out.

    A hung Redis is bounded by one ``asyncio.timeout`` per command or pipeline
    (``COMMAND_TIMEOUT_S``, the wait for a pooled connection included), not by the connections'
    ``socket_timeout``: on Python 3.11 redis-py runs every send under ``asyncio.wait_for``
    when a socket timeout is set, a task per command: about a tenth of the Python calls a
    request makes. A command cut off by the bound is cancelled, and redis-py closes a connection
    whose send or read was interrupted, so no later command reads the late reply.

    After a Redis restart every pooled connection is stale. Its first use fails (the health
    check's ping, or the command itself, meets a closed socket), so a connection error is tried
    once more, at once, on a fresh connection: a server that answers again serves the request.
    The retry is immediate and only for connection errors (never a timeout), so a command cut
    off by a crash is not run twice: its retry finds the server still down and fails as before.

    A new connection's handshake is ``HELLO`` alone: no ``CLIENT SETINFO`` and no ``CLIENT
    MAINT_NOTIFICATIONS`` (for managed Redis Enterprise failovers), which the Redis 7.0 that
    Debian and Ubuntu ship answers with errors that redis-py reads and drops: three wasted
    commands per connection, and a handshake cut off between those sends and their reads would
    leave an error for the connection's next command to read.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=GATEWAY_POOL_CONNECTIONS, timeout=None,  # bounded by COMMAND_TIMEOUT_S
        socket_timeout=None, socket_connect_timeout=5.0,  # a refused connection still fails at once
        health_check_interval=2,  # a pooled connection idle 2 s is pinged first (stale after a restart)
        retry=Retry(NoBackoff(), STALE_CONNECTION_RETRIES, supported_errors=(RedisConnectionError,)),
        driver_info=None,  # no CLIENT SETINFO (see above)
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
    )  # fmt: skip
    return BoundedRedis(connection_pool=pool)


class BoundedRedis(aioredis.Redis):
    """A client whose every command (scripts included) and pipeline ends within
    ``COMMAND_TIMEOUT_S``, or raises ``redis.exceptions.TimeoutError``."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await _bounded(super().execute_command(*args, **options), args[0])

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return BoundedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class BoundedPipeline(Pipeline):
    """A pipeline whose execution, and each command run at once while it watches keys, ends
    within ``COMMAND_TIMEOUT_S``."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        return await _bounded(super().execute(raise_on_error), "pipeline")

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        return await _bounded(super().immediate_execute_command(*args, **options), args[0])

    async def reset(self) -> None:  # type: ignore[override]  # Pipeline's, not the RESET command
        if not self.watching:  # nothing to send: the connection goes back to the pool
            return await super().reset()
        # an UNWATCH, on a connection a timed-out command left closed perhaps
        await _bounded(super().reset(), "UNWATCH")


async def _bounded(operation: Awaitable[T], what: object) -> T:
    """``operation``'s result, or ``redis.exceptions.TimeoutError`` naming ``what`` (a command's
    name) when it takes longer than ``COMMAND_TIMEOUT_S``."""
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            return await operation
    except TimeoutError:
        name = what.decode(errors="replace") if isinstance(what, bytes) else str(what)
        raise RedisTimeoutError(f"Redis did not answer {name[:40]} within {COMMAND_TIMEOUT_S:g} s") from None


def check_access(url: str, *, timeout_s: float = 5.0) -> None:
    """Raise ``RedisAccessError`` (which user, what to check) when Redis refuses the URL's user
    or its access to Zumik's keys. An unreachable Redis passes: that is an outage, which the
    gateway answers with 503 and retries, not a misconfiguration."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        client.ping()
        client.exists("zumik:access-check")  # NOPERM for a user without Zumik's keys (zumik-kv)
    except (AuthenticationError, NoPermissionError) as exc:
        raise RedisAccessError(access_refused_message(url, exc)) from None
    except RedisError:
        return
    finally:
        client.close()


class RedisDurabilityError(RuntimeError):
    """The state Redis may lose writes it acknowledged: a deployment's misconfiguration."""


def check_durability(
    url: str, *, environ: Mapping[str, str] = os.environ, timeout_s: float = 5.0
) -> str | None:
    """Raise ``RedisDurabilityError`` (why, and what to change) when the state Redis at ``url``
    may lose a write it acknowledged: its AOF is off, it fsyncs the AOF less often than before
    each reply (``appendfsync`` not ``always``: up to a second of acknowledged writes lost in a
    crash), or ``CONFIG GET`` is refused, so neither can be seen (a managed Redis). With
    ``ZUMIK_REDIS_DURABILITY=unchecked`` the reason is returned instead, for the caller to log.
    None when the writes are on disk before each reply, and for an unreachable Redis (an outage,
    as in ``check_access``). The embedded server runs ``appendfsync always``
    (``store/local_redis.py``)."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    gap: str | None
    try:
        settings = {**client.config_get("appendonly"), **client.config_get("appendfsync")}
    except (NoPermissionError, ResponseError) as exc:  # a user without +config|get, a renamed CONFIG
        gap = f"its configuration cannot be read (CONFIG GET: {str(exc)[:120]})"
    except RedisError:
        return None
    else:
        gap = aof_gap({str(k): str(v) for k, v in settings.items()})
    finally:
        client.close()
    if gap is None:
        return None
    if environ.get(DURABILITY_ENV) == "unchecked":
        return gap
    raise RedisDurabilityError(
        f"The state Redis may lose writes Zumik has acknowledged: {gap}. Run it with `appendonly yes` "
        f"and `appendfsync always` (CONFIG SET, or in redis.conf), or set {DURABILITY_ENV}=unchecked "
        "to start anyway and accept that a crash may lose the last writes."
    )


def aof_gap(config: Mapping[str, str]) -> str | None:
    """Why a server with this configuration (``CONFIG GET`` values) may lose a write it
    acknowledged, or None: the AOF is on and fsynced before each reply. Also the first test of
    what a purge may claim (``purge/store.py`` ``durability_gap``)."""
    if config.get("appendonly") != "yes":
        return "its AOF is off (appendonly no)"
    if config.get("appendfsync") != "always":
        return f"it fsyncs its AOF with appendfsync {config.get('appendfsync')!r}, not before each reply"
    return None


def plain_client(url: str) -> aioredis.Redis:
    """A client for one-off commands (the CLI)."""
    return aioredis.from_url(url)


async def guard(operation: Awaitable[T], *, what: str = "state store") -> T:
    """Await ``operation``; a Redis outage becomes a 503 the client can retry."""
    try:
        return await operation
    except (AuthenticationError, NoPermissionError) as exc:
        logger.error(
            "zumik: Redis refused the gateway's %s call (%s: %s): %s",
            what, type(exc).__name__, str(exc)[:120], advice(GATEWAY_USER),
        )  # fmt: skip
        raise StoreUnavailableError(
            f"The {what} is unavailable; nothing was changed unless a response said so. Retry shortly.",
            retry_after_s=1,
        ) from exc
    except RedisError as exc:
        logger.warning("zumik: %s call failed: %s: %s", what, type(exc).__name__, str(exc)[:200])
        raise StoreUnavailableError(
            f"The {what} is unavailable; nothing was changed unless a response said so. Retry shortly.",
            retry_after_s=1,
        ) from exc
