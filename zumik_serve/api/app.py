"""build_app(context): the FastAPI application over a gateway's typed context, the only place
HTTP pieces are wired. Handlers reach the context through ``api/deps.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from zumik_serve import __version__
from zumik_serve.api.drain import install_drain
from zumik_serve.api.http_errors import install_error_handlers
from zumik_serve.api.v1 import handlers as v1
from zumik_serve.api.v1 import responses as v1_responses
from zumik_serve.api.v2 import generate as v2_generate
from zumik_serve.api.v2 import objects as v2_objects
from zumik_serve.api.v2 import purge as v2_purge
from zumik_serve.api.v2 import routing as v2_routing
from zumik_serve.pipeline.accounting import settle
from zumik_serve.pipeline.context import GatewayContext
from zumik_serve.pipeline.pipeline import Pipeline
from zumik_serve.purge.service import PurgeService

logger = logging.getLogger("ray.serve")

App = FastAPI  # what wiring code names the app by (only the API imports the web framework)

LEDGER_SETTLE_S = 5.0  # how long a stopping replica waits for its reuse-ledger writes


def build_app(context: GatewayContext, *, more: Sequence[GatewayContext] = ()) -> FastAPI:
    """The app over ``context``'s profile, and ``more`` profiles beside it: a request's
    ``x-zumik-profile`` picks the pipeline (``api/deps.py``), the first profile without one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Purges a crash or an outage left unfinished are finished in the background.
        task = asyncio.create_task(_resume_purges(context.purges))
        yield
        task.cancel()
        # Serve stops a replica (a scale-down, a redeploy) through this too, not only after
        # ``drain_app``: the reuse-ledger writes its requests left still get their moment.
        await settle(LEDGER_SETTLE_S)

    app = FastAPI(title="Zumik", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    pipelines = [Pipeline(served) for served in (context, *more)]
    names = [pipeline.context.profile.name for pipeline in pipelines]
    if len(set(names)) != len(names):
        raise ValueError(f"a profile is served twice: {names}")
    for pipeline in pipelines:
        pipeline.served_profiles = tuple(names)
    app.state.pipeline = pipelines[0]
    app.state.pipelines = dict(zip(names, pipelines, strict=True))
    install_error_handlers(app)
    drain = install_drain(app)  # SIGTERM: in-flight requests finish, new ones get 503 (api/drain.py)
    app.include_router(v1.router)
    app.include_router(v1_responses.router)
    app.include_router(v2_purge.router)  # before v2_objects, whose /v2/{kind}/{id} would match too
    app.include_router(v2_routing.router)
    app.include_router(v2_generate.router)
    app.include_router(v2_objects.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        # The requests this process is serving, this check left out (what a drain waits for).
        return JSONResponse({"status": "ok", "in_flight": drain.in_flight - 1})

    return app


async def _resume_purges(purge_service: PurgeService) -> None:
    try:
        finished = await purge_service.resume_pending()
    except Exception:
        logger.exception("zumik: resuming unfinished purges failed; they resume on the next start")
        return
    if finished:
        logger.info("zumik: finished %d purge(s) left unfinished", finished)
