"""Zumik's error hierarchy: every failure a client can see, with its HTTP status and type.

    ZumikError                      status  type
    ├── InvalidRequestError           400   invalid_request_error
    │   └── ContextLengthExceededError 400  invalid_request_error / context_length_exceeded
    ├── AuthenticationError           401   authentication_error
    ├── PermissionDeniedError         403   permission_error
    ├── NotFoundError                 404   not_found_error
    │   └── ModelNotFoundError        404   invalid_request_error / model_not_found
    ├── MethodNotAllowedError         405   invalid_request_error / immutable_object
    ├── ConflictError                 409   conflict_error
    ├── PayloadTooLargeError          413   invalid_request_error / payload_too_large
    ├── UnprocessableError            422   invalid_request_error
    │   └── IdempotencyConflictError  422   idempotency_error / idempotency_key_reused
    ├── OverloadedError               429   rate_limit_error / overloaded (with Retry-After)
    ├── RateLimitExceededError        429   rate_limit_error / rate_limit_exceeded (with Retry-After)
    ├── QuotaExceededError            429   insufficient_quota / <quota>_quota_exceeded
    │                                       (x-should-retry: false: waiting does not help)
    ├── StoreUnavailableError         503   service_unavailable_error
    ├── ShuttingDownError             503   service_unavailable_error / shutting_down (with Retry-After)
    ├── DeadlineExceededError         504   timeout_error / deadline_exceeded
    └── EngineError                   5xx   server_error (or a status the engine chose)

Rule kept here: each error carries what a client needs to act on it (a message that says what
to do next, the offending parameter when there is one). Only ``api/http_errors.py`` maps these
to HTTP bodies; the domain raises them without knowing about HTTP.
"""

from __future__ import annotations


class ZumikError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    should_retry: bool | None = None  # an SDK hint (``x-should-retry``); None: the status decides

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s


class InvalidRequestError(ZumikError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(ZumikError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(ZumikError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowedError(ZumikError):
    status = 405
    type = "invalid_request_error"
    code = "immutable_object"


class ConflictError(ZumikError):
    status = 409
    type = "conflict_error"


class UnprocessableError(ZumikError):
    status = 422
    type = "invalid_request_error"


class IdempotencyConflictError(UnprocessableError):
    type = "idempotency_error"
    code = "idempotency_key_reused"


class PayloadTooLargeError(ZumikError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class PermissionDeniedError(ZumikError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class OverloadedError(ZumikError):
    """Admission refused: the class's running and queued slots are full (always with Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class RateLimitExceededError(ZumikError):
    """The tenant's requests or tokens per minute are spent (always with Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceededError(ZumikError):
    """A write would take the tenant past a storage quota. The status and type are OpenAI's for
    an exhausted quota (429 ``insufficient_quota``): the request itself is fine, the tenant's
    allowance is not, and only freeing usage (a purge) or a higher limit helps; waiting does
    not, so SDKs are told not to retry."""

    status = 429
    type = "insufficient_quota"
    should_retry = False


class DeadlineExceededError(ZumikError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class StoreUnavailableError(ZumikError):
    status = 503
    type = "service_unavailable_error"
    code = "store_unavailable"


class ShuttingDownError(ZumikError):
    """The server is draining before it stops (SIGTERM): requests in flight finish, new ones are
    refused so that a client retries elsewhere or after the restart (always with Retry-After)."""

    status = 503
    type = "service_unavailable_error"
    code = "shutting_down"


class EngineError(ZumikError):
    status = 502
    type = "server_error"
    code = "engine_error"
