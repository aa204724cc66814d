"""build_app(service): the FastAPI application, the only place HTTP pieces are wired."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from zumik_serve import __version__
from zumik_serve.api import v1_openai, v2_native
from zumik_serve.api.http_errors import install_error_handlers
from zumik_serve.service import GatewayService
from zumik_serve.state_service import StateService


def build_app(service: GatewayService, state_service: StateService, *, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="Zumik", version=__version__, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.state_service = state_service
    app.state.max_body_bytes = max_body_bytes
    install_error_handlers(app)
    app.include_router(v1_openai.router)
    app.include_router(v2_native.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app
