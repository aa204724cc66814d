"""What a stored response keeps: its rendered body, the chat messages it added to its
conversation, and where its turns live (a Zumik session or branch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class StoredResponse(BaseModel):
    """``messages``: the chat messages this response added (its input, then its output), exact,
    tool calls included; ``chain``: the responses before it, oldest first, so that its whole
    conversation is one read. ``session``/``upto``: the session or branch holding the same
    conversation as turns, and its turn number after this response. ``release``: the release it
    ran under, which the responses continuing it keep while they name the same model."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    object: Literal["response"] = "response"
    id: str
    session: str
    upto: int
    previous_response_id: str | None
    chain: tuple[str, ...]
    messages: tuple[dict[str, Any], ...]
    body: dict[str, Any]
    created_at: int
    release: str | None = None
