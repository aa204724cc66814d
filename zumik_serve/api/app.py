"""build_app(service): the FastAPI application, the only place HTTP pieces are wired."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from zumik_serve import __version__
from zumik_serve.api.http_errors import install_error_handlers
from zumik_serve.api.v1 import handlers as v1
from zumik_serve.api.v2 import generate as v2_generate
from zumik_serve.api.v2 import objects as v2_objects
from zumik_serve.api.v2 import purge as v2_purge
from zumik_serve.api.v2 import routing as v2_routing
from zumik_serve.pipeline.service import GatewayService
from zumik_serve.purge.service import PurgeService
from zumik_serve.state.service import StateService

logger = logging.getLogger("ray.serve")


def build_app(
    service: GatewayService, state_service: StateService, purge_service: PurgeService, *, max_body_bytes: int
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Purges a crash or an outage left unfinished are finished in the background.
        task = asyncio.create_task(_resume_purges(purge_service))
        yield
        task.cancel()

    app = FastAPI(title="Zumik", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.state.state_service = state_service
    app.state.purge_service = purge_service
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2_purge.router)  # before v2_objects, whose /v2/{kind}/{id} would match too
    app.include_router(v2_routing.router)
    app.include_router(v2_generate.router)
    app.include_router(v2_objects.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


async def _resume_purges(purge_service: PurgeService) -> None:
    try:
        finished = await purge_service.resume_pending()
    except Exception:
        logger.exception("zumik: resuming unfinished purges failed; they resume on the next start")
        return
    if finished:
        logger.info("zumik: finished %d purge(s) left unfinished", finished)
