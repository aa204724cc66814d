"""Reading request bodies: a size limit enforced before the whole body is read, and a time
limit on the upload.

Handlers read the body before they take an admission slot (``Pipeline.admit``), so a slow
upload holds a connection, never a slot of its QoS class. Nothing in front bounds how long a
body may take: uvicorn times out only idle keep-alive connections, Ray Serve's
``request_timeout_s`` is unset by default, and Serve's HAProxy ingress closes a client only
after ``timeout client`` (3600 s) without a byte. So ``gateway.body_timeout_s`` does: a body not
fully arrived by then is a 408 and the request ends, which also bounds how long slow uploads
occupy the gateway replica's Serve ``max_ongoing_requests``.
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from zumik_serve.api.deps import pipeline_of
from zumik_serve.errors import InvalidRequestError, PayloadTooLargeError

BODY_TIMEOUT_STATUS = 408


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, at most ``max_bytes`` (413 beyond it, from Content-Length when declared),
    within the profile's ``gateway.body_timeout_s`` (408 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise InvalidRequestError("The Content-Length header is not a number.") from None
        if declared_bytes > max_bytes:
            raise _too_large(max_bytes)
    timeout_s = pipeline_of(request).context.profile.gateway.body_timeout_s
    chunks = []
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequestError(
            f"The request body did not arrive within {timeout_s:g} s ({received} bytes received). "
            "Send the whole body promptly; store large content once as a /v2 artifact.",
            status=BODY_TIMEOUT_STATUS,
            code="body_timeout",
        ) from None
    return b"".join(chunks)


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body is larger than this server's limit of {max_bytes} bytes. Send a "
        "smaller body, or store large content once as a /v2 artifact and reference it."
    )
