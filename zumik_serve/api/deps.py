"""The one thing handlers take from the app: the gateway's pipeline (and, through it, its
typed ``GatewayContext``), set once by ``api/app.py``."""

from __future__ import annotations

from fastapi import Request

from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.tenancy.tenant import Tenant


def pipeline_of(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def tenant_of(request: Request) -> Tenant:
    """The authenticated tenant of ``request`` (401 without a known key)."""
    return await pipeline_of(request).authenticate(request.headers.get("authorization"))
