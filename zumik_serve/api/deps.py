"""The one thing handlers take from the app: the gateway's pipeline (and, through it, its
typed ``GatewayContext``), set once by ``api/app.py``."""

from __future__ import annotations

from fastapi import Request

from zumik_serve.api.headers import requested_profile
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.tenancy.tenant import Tenant


def pipeline_of(request: Request) -> Pipeline:
    """The pipeline of the profile ``x-zumik-profile`` names when this gateway serves it, else
    the first profile's (whose ``check_profile`` answers a profile not served here with 404)."""
    default: Pipeline = request.app.state.pipeline
    name = requested_profile(request.headers)
    if name is None:
        return default
    pipelines: dict[str, Pipeline] = request.app.state.pipelines
    return pipelines.get(name, default)


async def tenant_of(request: Request) -> Tenant:
    """The authenticated tenant of ``request`` (401 without a known key)."""
    return await pipeline_of(request).authenticate(request.headers.get("authorization"))
