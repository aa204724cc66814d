"""The Zumik app for Ray Serve config files (KubeRay ``serveConfigV2``, ``serve run``, ``serve deploy``).

    applications:
      - name: zumik
        route_prefix: /
        import_path: zumik_serve.app.serve_app:build
        args:
          profile: llama-8b-h100                  # a built-in name or a YAML path on every node
          redis_url: redis://zumik-redis:6379/0   # else $ZUMIK_REDIS_URL (where a password belongs:
                                                  # a Serve config is no place for one)
          kv_redis_url: redis://zumik-redis-kv:6379/0  # the KV tier's own Redis (maxmemory, an LRU
                                                  # policy); else $ZUMIK_KV_REDIS_URL; a profile
                                                  # whose KV tiers use Redis needs one of them

The builder runs where Serve's controller schedules its build task (``num_cpus=0``, no node
pinned: any node of the cluster, the head included): a profile's ``model.source`` directory must
exist at the same path on every node that may build it or run an engine. So must the secrets
folder (``$ZUMIK_SECRETS_DIR``, e.g. a Kubernetes Secret mounted at ``/etc/zumik/secrets`` on
every pod): gateways read the server's secrets from it and do not start without them
(``server_secrets.py``); nothing here generates them.
``ZUMIK_DEV_KEY`` in the environment enables the development key; leave it unset in production.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve

from profiles import resolve_profile
from zumik_serve.app.application import build_serve_app
from zumik_serve.home import ZumikHome
from zumik_serve.model.resolve import resolve_model_dir
from zumik_serve.store.local_redis import KV_REDIS_URL_ENV, REDIS_URL_ENV


def build(args: dict[str, Any]) -> serve.Application:
    profile = resolve_profile(str(args.get("profile") or "local-cpu"))
    redis_url = args.get("redis_url") or os.environ.get(REDIS_URL_ENV)
    if not redis_url:
        raise ValueError(
            f"no Redis for Zumik's state: set args.redis_url in the Serve config or {REDIS_URL_ENV} "
            "(deploy/redis has a persistent Redis)"
        )
    home = ZumikHome.from_env()
    model_dir = resolve_model_dir(profile, home)
    return build_serve_app(
        profile,
        model_dir=model_dir,
        redis_url=str(redis_url),
        dev_key=os.environ.get("ZUMIK_DEV_KEY") or None,
        home=home,
        kv_redis_url=str(args.get("kv_redis_url") or os.environ.get(KV_REDIS_URL_ENV) or "") or None,
    )
