"""The one place that maps errors to HTTP: OpenAI error objects on /v1, native ones on /v2."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zumik_serve.api.v1.wire import render_error
from zumik_serve.errors import ZumikError

_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


MAX_MESSAGE_CHARS = 1024  # with the other fields capped too, an error body stays under 8 KiB
MAX_FIELD_CHARS = 128


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (saying so): an error may quote a name or a path the
    client sent, and never sends a large input back."""
    return text if len(text) <= limit else text[: limit - 16] + " ...(truncated)"


def error_response(request: Request, error: ZumikError) -> JSONResponse:
    headers = {}
    message = _bounded(error.message, MAX_MESSAGE_CHARS)
    param = None if error.param is None else _bounded(error.param, MAX_FIELD_CHARS)
    code = None if error.code is None else _bounded(error.code, MAX_FIELD_CHARS)
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, int(error.retry_after_s)))
    if error.should_retry is not None:  # the OpenAI SDKs read it before the status
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    path = request.url.path
    root = request.scope.get("root_path") or ""
    if root and path.startswith(root):  # an app served under a route prefix (e.g. /gw/v1/...)
        path = path[len(root) :]
    if path.startswith("/v1"):
        body = render_error(message, error.type, param, code)
    else:
        native = {"type": error.type, "message": message}
        if param is not None:
            native["param"] = param
        if code is not None:
            native["code"] = code
        body = {"error": native}
    return JSONResponse(body, status_code=error.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ZumikError)
    async def _zumik_error(request: Request, exc: ZumikError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {
            404: f"Unknown path {request.url.path}. See the API reference for the routes.",
            405: f"Method {request.method} is not allowed on {request.url.path}.",
        }.get(exc.status_code, str(exc.detail))
        error = ZumikError(message, status=exc.status_code)
        error.type = _HTTP_TYPES.get(exc.status_code, "server_error")
        return error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ()}
        if first["loc"] and first["loc"][0] == "path":
            error = ZumikError(
                f"Unknown path {request.url.path}. See the API reference for the routes.", status=404
            )
            error.type = _HTTP_TYPES[404]
        else:
            error = ZumikError("The request is not valid.", status=400)
            error.type = _HTTP_TYPES[400]
        return error_response(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error = ZumikError(
            "The server failed while handling the request. Retry it; if it keeps failing, "
            "check the server logs."
        )
        return error_response(request, error)
