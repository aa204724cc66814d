"""Reading request bodies with a size limit enforced before the whole body is read."""

from __future__ import annotations

from fastapi import Request

from zumik_serve.errors import InvalidRequestError, PayloadTooLargeError


async def read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise InvalidRequestError("The Content-Length header is not a number.") from None
        if declared_bytes > max_bytes:
            raise _too_large(max_bytes)
    chunks = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body is larger than this server's limit of {max_bytes} bytes. Send a "
        "smaller body, or store large content once as a /v2 artifact and reference it."
    )
