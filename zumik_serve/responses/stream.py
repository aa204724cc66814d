"""A chat-completions stream as the Responses stream events, and their SSE framing.

    start()                 response.created, response.in_progress   (status in_progress)
    feed(chunk)             per output item, in the order the engine streams them:
                              message        output_item.added, content_part.added,
                                             output_text.delta ..., output_text.done,
                                             content_part.done, output_item.done
                              function_call  output_item.added,
                                             function_call_arguments.delta ...,
                                             function_call_arguments.done, output_item.done
                            an item is done when the next one starts, or at the end
    finish(completed_at)    the open item's done events, then response.completed, or
                            response.incomplete (finish reason length or content_filter)
    fail(message)           response.failed: the engine failed after the stream began
    error(message, ...)     an ``error`` event: a client's fault found after the stream began

Every event carries ``sequence_number``: 0 for response.created, one more for each next event.
The final event's Response equals ``render_response`` of the same answer whole, with ids from
an id source in the same state (text before tool calls, as engines stream them). After
``finish``, ``fail`` or ``error`` the translator is closed: any further call raises.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from zumik_serve.errors import EngineError
from zumik_serve.responses.items import ItemStatus
from zumik_serve.responses.response import (
    FUNCTION_CALL_PREFIX,
    MESSAGE_PREFIX,
    ItemIds,
    ResponseHead,
    ToolCall,
    function_call_item,
    incomplete_reason,
    message_item,
    output_text_part,
    random_item_id,
    render_usage,
    response_object,
)

Event = dict[str, Any]  # one Responses stream event, as JSON


class _Phase(Enum):
    NEW = "new"
    STREAMING = "streaming"
    ENDED = "ended"


@dataclass
class _OpenItem:
    """The output item being streamed: a message (``call_id`` None) or a function call (the
    chat tool call ``chat_index``). ``pieces``: its text or arguments so far."""

    output_index: int
    item_id: str
    call_id: str | None = None
    name: str = ""
    chat_index: int | None = None
    pieces: list[str] = field(default_factory=list)

    def call(self) -> ToolCall:
        return ToolCall(call_id=self.call_id or "", name=self.name, arguments="".join(self.pieces))


class StreamTranslator:
    """Turns one chat-completions stream (the chunks of ``chat.completion.chunk`` objects, usage
    chunk included) into Responses stream events. Not thread-safe: one stream, one task."""

    def __init__(self, head: ResponseHead, *, new_id: ItemIds = random_item_id) -> None:
        self._head = head
        self._new_id = new_id
        self._phase = _Phase.NEW
        self._sequence = 0
        self._done: list[dict[str, Any]] = []  # output items already done, in order
        self._open: _OpenItem | None = None
        self._calls_seen: set[int] = set()
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``, each with the in-progress Response."""
        self._enter(_Phase.NEW, _Phase.STREAMING)
        return [
            self._event("response.created", response=self._snapshot()),
            self._event("response.in_progress", response=self._snapshot()),
        ]

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        """The events of one chunk (often none: a role-only delta, the usage chunk). Only the
        first choice counts: the chat body never asks for more. An abnormal finish reason is
        an ``EngineError``; so is a tool call streamed out of order or without its id and name."""
        self._expect(_Phase.STREAMING)
        if chunk.get("usage"):
            self._usage = render_usage(chunk["usage"])
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(str(delta["content"]))
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason") is not None:
                incomplete_reason(choice["finish_reason"])  # an abnormal one raises here
                self._finish_reason = str(choice["finish_reason"])
        return events

    def finish(self, completed_at: int) -> list[Event]:
        """The open item's done events (an empty message when the answer had no output at all),
        then ``response.completed`` (with ``completed_at``, Unix seconds) or
        ``response.incomplete``. An ``EngineError`` when the stream ended without a finish
        reason; the translator stays open for ``fail``."""
        self._expect(_Phase.STREAMING)
        if self._finish_reason is None:
            raise EngineError(
                "The engine's stream ended before the answer did; the output is incomplete. "
                "Retry the request."
            )
        reason = incomplete_reason(self._finish_reason)
        events: list[Event] = []
        if self._open is None and not self._done:
            events += self._open_message()
        events += self._close("incomplete" if reason else "completed")
        response = response_object(
            self._head,
            status="incomplete" if reason else "completed",
            output=list(self._done),
            usage=self._usage,
            incomplete=reason,
            completed_at=None if reason else completed_at,
        )
        events.append(
            self._event("response.incomplete" if reason else "response.completed", response=response)
        )
        self._phase = _Phase.ENDED
        return events

    def fail(self, message: str) -> list[Event]:
        """``response.failed``: the Response with ``error`` {code ``server_error``, ``message``}
        and the output so far (the open item ``incomplete``). For a failure of the engine or of
        Zumik after ``start``; ``message`` should say what the client can do."""
        self._expect(_Phase.STREAMING)
        output = list(self._done)
        if self._open is not None:
            output.append(self._item(self._open, "incomplete"))
        response = response_object(
            self._head, status="failed", output=output, usage=self._usage, error=message
        )
        self._phase = _Phase.ENDED
        return [self._event("response.failed", response=response)]

    def error(self, message: str, *, code: str | None = None, param: str | None = None) -> list[Event]:
        """An ``error`` event (OpenAI's shape: code, message, param): for a fault of the request
        found after the stream began, such as a context length the engine refused."""
        if self._phase is _Phase.ENDED:
            raise RuntimeError("the Responses stream has already ended")
        self._phase = _Phase.ENDED
        return [self._event("error", code=code, message=message, param=param)]

    # --- items ------------------------------------------------------------------------------

    def _text(self, delta: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open.call_id is not None:
            events += self._close("completed")
            events += self._open_message()
        item = self._require_open()
        item.pieces.append(delta)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item.item_id,
                output_index=item.output_index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _tool_call(self, call: Mapping[str, Any]) -> list[Event]:
        index = int(call.get("index", 0))
        function = call.get("function") or {}
        events: list[Event] = []
        if self._open is None or self._open.chat_index != index:
            if index in self._calls_seen:
                raise EngineError(
                    "The engine streamed a tool call out of order; the output cannot be rendered. "
                    "Retry the request."
                )
            if not call.get("id") or not function.get("name"):
                raise EngineError(
                    "The engine streamed a tool call without its id or name. Retry the request."
                )
            events += self._close("completed")
            events += self._open_call(str(call["id"]), str(function["name"]), index)
        item = self._require_open()
        arguments = function.get("arguments")
        if arguments:
            item.pieces.append(str(arguments))
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    delta=str(arguments),
                )
            )
        return events

    def _open_message(self) -> list[Event]:
        item = _OpenItem(output_index=len(self._done), item_id=self._new_id(MESSAGE_PREFIX))
        self._open = item
        return [
            self._event(
                "response.output_item.added",
                output_index=item.output_index,
                item=message_item(item.item_id, None, "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                item_id=item.item_id,
                output_index=item.output_index,
                content_index=0,
                part=output_text_part(""),
            ),
        ]

    def _open_call(self, call_id: str, name: str, chat_index: int) -> list[Event]:
        item = _OpenItem(
            output_index=len(self._done),
            item_id=self._new_id(FUNCTION_CALL_PREFIX),
            call_id=call_id,
            name=name,
            chat_index=chat_index,
        )
        self._open = item
        self._calls_seen.add(chat_index)
        return [
            self._event(
                "response.output_item.added",
                output_index=item.output_index,
                item=self._item(item, "in_progress"),
            )
        ]

    def _close(self, status: ItemStatus) -> list[Event]:
        """The done events of the open item (none when no item is open), as ``status``."""
        item = self._open
        if item is None:
            return []
        self._open = None
        done = self._item(item, status)
        self._done.append(done)
        where = {"item_id": item.item_id, "output_index": item.output_index}
        if item.call_id is not None:
            call = item.call()
            finished = [
                self._event(
                    "response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments
                )
            ]
        else:
            text = "".join(item.pieces)
            finished = [
                self._event("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self._event(
                    "response.content_part.done", **where, content_index=0, part=output_text_part(text)
                ),
            ]
        return [
            *finished,
            self._event("response.output_item.done", output_index=item.output_index, item=done),
        ]

    def _item(self, item: _OpenItem, status: ItemStatus) -> dict[str, Any]:
        if item.call_id is not None:
            return function_call_item(item.item_id, item.call(), status)
        return message_item(item.item_id, "".join(item.pieces), status)

    def _require_open(self) -> _OpenItem:
        if self._open is None:
            raise RuntimeError("no output item is open")
        return self._open

    # --- events and phases --------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return response_object(self._head, status="in_progress", output=[])

    def _event(self, type_: str, **fields: Any) -> Event:
        event = {"type": type_, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return event

    def _expect(self, phase: _Phase) -> None:
        if self._phase is not phase:
            raise RuntimeError(f"the Responses stream is {self._phase.value}, not {phase.value}")

    def _enter(self, current: _Phase, following: _Phase) -> None:
        self._expect(current)
        self._phase = following


def sse(event: Mapping[str, Any]) -> bytes:
    """One event as OpenAI sends it: ``event: <type>``, then its JSON on one ``data:`` line."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode()
