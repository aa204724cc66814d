"""Stored responses: a chain of responses is a Zumik conversation underneath.

    POST /v1/responses (store)     previous_response_id ──► its conversation (one read)
                                   answer ──► turns appended to its session, or to a branch
                                              forked where the previous response ended
                                              ──► the response record, built on both
    GET    /v1/responses/{id}      the record's body
    DELETE /v1/responses/{id}      the record revoked (its turns stay in the session; a purge of
                                   the session, x-zumik-session, removes everything)

The first response of a chain creates a session; a response continuing the latest one of its
session appends to it; continuing an older one forks a branch there (``StateService.
continue_conversation``). So a chain is a session you can read on /v2, freeze as a snapshot,
revoke and purge with a receipt: the purge's closure reaches every response built on it. Another
tenant's id is unknown: every key carries the tenant.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zumik_serve.errors import NotFoundError
from zumik_serve.ids import HandleKind, handle_kind, new_handle
from zumik_serve.responses.chat import ChatMessage
from zumik_serve.responses.records import StoredResponse
from zumik_serve.responses.store import RedisResponseStore
from zumik_serve.state.objects import TurnRole
from zumik_serve.state.outcomes import HandlePurged, ParentNotLive
from zumik_serve.state.requests import AppendTurn, message_text
from zumik_serve.state.service import StateService


@dataclass(frozen=True)
class Previous:
    """The response a request continues, and its whole conversation as chat messages."""

    record: StoredResponse
    messages: list[ChatMessage]


class ResponsesService:
    def __init__(self, state: StateService, store: RedisResponseStore) -> None:
        self._state = state
        self._store = store

    @staticmethod
    def new_id() -> str:
        return new_handle(HandleKind.RESPONSE)

    async def previous(self, tenant: str, response_id: str) -> Previous:
        """The stored response ``response_id`` and its conversation; 404 naming
        ``previous_response_id`` when it is unknown, deleted, purged or another tenant's."""
        record = await self._live(tenant, response_id, param="previous_response_id")
        try:  # a revoked (or purged) session takes its responses with it, as any session's use
            await self._state.store_call(self._state.use_session(tenant, record.session))
        except NotFoundError:
            raise _not_found(response_id, "previous_response_id") from None
        ancestors = await self._state.store_call(self._store.get_many(tenant, record.chain))
        if any(ancestor is None for ancestor in ancestors):
            raise _not_found(response_id, "previous_response_id")  # an earlier one was purged
        messages = [dict(m) for ancestor in (*ancestors, record) if ancestor for m in ancestor.messages]
        return Previous(record, messages)

    async def save(
        self,
        tenant: str,
        *,
        response_id: str,
        body: Mapping[str, Any],
        added: Sequence[ChatMessage],
        previous: Previous | None,
        release: str | None = None,
    ) -> StoredResponse:
        """Store a finished response: its messages as turns of the conversation, then its
        record (built on the session or branch holding them and on the response it continues,
        both still live: 404 when a delete or a purge took one while it was generated, and the
        record is not stored)."""
        after = (previous.record.session, previous.record.upto) if previous is not None else None
        turns = [_turn(message) for message in added]
        session, upto = await self._state.store_call(self._state.continue_conversation(tenant, after, turns))
        record = StoredResponse(
            id=response_id,
            session=session,
            upto=upto,
            previous_response_id=previous.record.id if previous is not None else None,
            chain=(*previous.record.chain, previous.record.id) if previous is not None else (),
            messages=tuple(dict(m) for m in added),
            body=dict(body),
            created_at=int(time.time()),
            release=release,
        )
        parents = [session] if previous is None else [session, previous.record.id]
        stored = await self._state.store_call(self._store.put(tenant, record, parents))
        if isinstance(stored, ParentNotLive):  # deleted or purged while this one was generated
            raise _not_found(stored.handle, "previous_response_id")
        if isinstance(stored, HandlePurged):  # a new random id is never a purged one's
            raise RuntimeError(f"response id {record.id} was purged before; not stored")
        return record

    async def get(self, tenant: str, response_id: str) -> StoredResponse:
        return await self._live(tenant, response_id, param="response_id")

    async def delete(self, tenant: str, response_id: str) -> None:
        if handle_kind(response_id) is not HandleKind.RESPONSE or not await self._state.store_call(
            self._store.delete(tenant, response_id)
        ):
            raise _not_found(response_id, "response_id")

    async def _live(self, tenant: str, response_id: str, *, param: str) -> StoredResponse:
        record = None
        if handle_kind(response_id) is HandleKind.RESPONSE:
            record = await self._state.store_call(self._store.get(tenant, response_id))
        if record is None:
            raise _not_found(response_id, param)
        return record


def _turn(message: ChatMessage) -> AppendTurn:
    """A chat message as a session turn (text; tool calls as their JSON, so that the session
    reads as the conversation did)."""
    role = {"system": TurnRole.SYSTEM, "user": TurnRole.USER, "tool": TurnRole.TOOL}.get(
        str(message.get("role")), TurnRole.ASSISTANT
    )
    return AppendTurn(role=role, content=message_text(message))


def _not_found(response_id: str, param: str) -> NotFoundError:
    shown = response_id if len(response_id) <= 64 else response_id[:64] + "..."
    return NotFoundError(
        f"No response with id {shown!r} found. It may have been deleted, or stored with store=false.",
        param=param,
        code="response_not_found",
    )
