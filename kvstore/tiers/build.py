"""The tiers of one connector configuration (``kv_connector_extra_config``), built the same way
in the engines (``connector.py``) and in the gateway (a purge sweeps the same tiers).

Bounds: ``host_capacity_bytes`` for the node's shared-memory folder (every process on the node
counts into it), ``disk_capacity_bytes`` for the disk folder, the KV Redis's own
``maxmemory`` (``redis_url``: a Redis of its own; ``keyring_redis_url``: the state Redis, where
the data keys and the tenants' KV limits stay, never evicted).

Redis credentials: ``redis_url`` and ``keyring_redis_url`` name the user (``zumik-kv``) but hold
no password, because vLLM logs its whole engine config; ``redis_password_file`` names the file
the password is read from, here, when the clients are built. ``rediss://`` URLs use TLS, with
redis-py's options in the query (``?ssl_ca_certs=/path/ca.pem``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore.manager import TierManager
from kvstore.tier import Keyring, Sealer, TierBackend
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.shared_memory import SharedMemoryTier


def host_tier_root(config: dict[str, Any]) -> Path:
    """Every engine of the node (of this user) shares this shared-memory folder and its budget;
    blocks of each compat key live under their own digest in it."""
    return Path(str(config.get("shm_root") or "/dev/shm")) / "zumik-kv"


class KvRedisPasswordError(RuntimeError):
    """The Redis password file named by the config is missing or unusable."""


def redis_password(config: dict[str, Any]) -> str | None:
    """The password in ``config["redis_password_file"]`` (its final newline dropped), or None
    when the config names no file (a Redis without ACL users)."""
    if not config.get("redis_password_file"):
        return None
    path = Path(str(config["redis_password_file"]))
    try:
        password = path.read_text().removesuffix("\n").removesuffix("\r")
    except (OSError, UnicodeDecodeError) as exc:
        raise KvRedisPasswordError(
            f"the engines' Redis password cannot be read from {path} ({type(exc).__name__}): it is "
            "redis-kv.password in the secrets folder (ZUMIK_SECRETS_DIR; in Kubernetes the Secret "
            "mounted at /etc/zumik/secrets); see deploy/redis/README.md"
        ) from None
    if not password:
        raise KvRedisPasswordError(f"{path} is empty: it must hold the zumik-kv user's Redis password")
    return password


def redis_client(config: dict[str, Any], url_key: str) -> Any:
    """A redis-py client for ``config[url_key]``, logged in with the config's password file."""
    import redis

    url, password = str(config[url_key]), redis_password(config)
    return redis.Redis.from_url(url, password=password, socket_timeout=2, socket_connect_timeout=2)


def build_tiers(config: dict[str, Any]) -> list[TierBackend]:
    tiers: list[TierBackend] = []
    if int(config.get("host_capacity_bytes") or 0) > 0:
        tiers.append(SharedMemoryTier(host_tier_root(config), int(config["host_capacity_bytes"])))
    if config.get("redis_url"):
        from kvstore.tiers.redis_tier import RedisTier

        limit = config.get("redis_scope_max_bytes")  # the profile's quota.kv_bytes; None: none
        scope_max_bytes = None if limit is None else int(limit)
        # The tenants' own KV limits are published in the state Redis (the keyring's); blocks
        # live in the KV Redis, unless the deployment runs one Redis for both.
        state_url = config.get("keyring_redis_url")
        separate = bool(state_url) and state_url != config["redis_url"]
        limits = redis_client(config, "keyring_redis_url") if separate else None
        tiers.append(
            RedisTier(redis_client(config, "redis_url"), scope_max_bytes=scope_max_bytes, limits=limits)
        )
    if config.get("disk_root"):
        capacity = config.get("disk_capacity_bytes")  # None: unbounded (tools' plain folders)
        tiers.append(DiskTier(Path(str(config["disk_root"])), None if capacity is None else int(capacity)))
    return tiers


def build_keyring(config: dict[str, Any]) -> Keyring | None:
    if not config.get("keyring_redis_url"):
        return None
    from kvstore.tiers.redis_keyring import RedisKeyring

    return RedisKeyring(redis_client(config, "keyring_redis_url"))


def build_manager(config: dict[str, Any]) -> TierManager:
    keyring = build_keyring(config)
    sealer: Sealer | None = None
    if keyring is not None and config.get("seal"):
        from kvstore.sealing import ScopedSealer

        sealer = ScopedSealer(keyring)
    return TierManager(build_tiers(config), sealer=sealer, keyring=keyring)
