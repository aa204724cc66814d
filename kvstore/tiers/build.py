"""The tiers of one connector configuration (``kv_connector_extra_config``), built the same way
in the engines (``connector.py``) and in the gateway (a purge sweeps the same tiers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore.manager import TierManager
from kvstore.tier import Keyring, Sealer, TierBackend
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.shared_memory import SharedMemoryTier


def host_tier_root(config: dict[str, Any]) -> Path:
    """Engines of one node with the same compat key share this shared-memory folder."""
    return Path(str(config.get("shm_root") or "/dev/shm")) / f"zumik-kv-{config['compat_digest'][:16]}"


def build_tiers(config: dict[str, Any]) -> list[TierBackend]:
    tiers: list[TierBackend] = []
    if int(config.get("host_capacity_bytes") or 0) > 0:
        tiers.append(SharedMemoryTier(host_tier_root(config), int(config["host_capacity_bytes"])))
    if config.get("redis_url"):
        import redis

        from kvstore.tiers.redis_tier import RedisTier

        client = redis.Redis.from_url(str(config["redis_url"]), socket_timeout=2, socket_connect_timeout=2)
        tiers.append(RedisTier(client))
    if config.get("disk_root"):
        tiers.append(DiskTier(Path(str(config["disk_root"]))))
    return tiers


def build_keyring(config: dict[str, Any]) -> Keyring | None:
    if not config.get("keyring_redis_url"):
        return None
    import redis

    from kvstore.tiers.redis_keyring import RedisKeyring

    url = str(config["keyring_redis_url"])
    return RedisKeyring(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2))


def build_manager(config: dict[str, Any]) -> TierManager:
    keyring = build_keyring(config)
    sealer: Sealer | None = None
    if keyring is not None and config.get("seal"):
        from kvstore.sealing import ScopedSealer

        sealer = ScopedSealer(keyring)
    return TierManager(build_tiers(config), sealer=sealer, keyring=keyring)
