"""Deploying a built-in profile's whole Serve app beside the shared stack's, in the same Ray
cluster, under a route prefix of its own (its own engines; the shared Redis and tenants)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from profiles import Profile, load_builtin
from zumik_serve.model.resolve import resolve_model_dir


@contextmanager
def deployed_beside(
    running_stack: Any, profile_name: str, *, app: str, prefix: str, more: Sequence[Profile] = ()
) -> Iterator[str]:
    """Run ``profile_name``'s app as ``app`` under ``prefix`` while the block runs, serving the
    ``more`` profiles beside it (``x-zumik-profile`` chooses); yields the prefix."""
    from ray import serve

    from tests.integration.conftest import DEV_KEY
    from zumik_serve.app.application import build_serve_app

    profile = load_builtin(profile_name)
    built = build_serve_app(
        profile,
        model_dir=resolve_model_dir(profile, running_stack.home),
        redis_url=running_stack.redis_url,
        dev_key=DEV_KEY,
        home=running_stack.home,
        kv_redis_url=running_stack.stack.kv_redis_url,
        more=[(other, resolve_model_dir(other, running_stack.home)) for other in more],
    )
    serve.run(built, name=app, route_prefix=prefix)
    try:
        yield prefix
    finally:
        serve.delete(app)
