"""The /v2 BYOK request bodies: pydantic models that forbid unknown fields.

Rule kept here: a body that does not fit is a 400 ``InvalidRequestError`` naming ``api_key`` and
saying what to send; neither the message, the model's ``repr`` nor a chained exception carries
the key the client sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from zumik_serve.errors import InvalidRequestError

MAX_API_KEY_CHARS = 512


class ByokKeyBody(BaseModel):
    """``PUT /v2/byok/{route}``: ``{"api_key": "<the tenant's provider key>"}``, 1 to
    ``MAX_API_KEY_CHARS`` characters, and nothing else."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    api_key: SecretStr = Field(min_length=1, max_length=MAX_API_KEY_CHARS)

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> ByokKeyBody:
        try:
            return cls.model_validate(body)
        except ValidationError:
            pass  # raised below, outside the handler: no chained error holds the key
        raise InvalidRequestError(
            f'send {{"api_key": "<your provider key>"}} (1-{MAX_API_KEY_CHARS} characters).',
            param="api_key",
        )
