"""The Responses wire surface a ``/v1/responses`` handler uses: parse, translate, render.

    body ──parse_request──► ResponsesRequest ──chat_body(request, history)──► pipeline
    whole answer ──render_response(head, answer, completed_at=...)──► Response
    chunks ──StreamTranslator(head): start, feed*, finish | fail | error──► events ──sse──► bytes
    stored chain: input_history(request) + output_history(response["output"]) per response

The parts live in ``request.py`` (with ``items.py`` and ``body.py``), ``chat.py``, ``response.py``
and ``stream.py``; this module only names what the handler needs, so it imports one place.
"""

from __future__ import annotations

from zumik_serve.responses.body import Unsupported
from zumik_serve.responses.chat import ChatMessage, chat_body, chat_messages, input_history, output_history
from zumik_serve.responses.items import UNSUPPORTED_CONTENT_TYPES, UNSUPPORTED_ITEM_TYPES
from zumik_serve.responses.request import (
    HINT_FIELDS,
    UNSUPPORTED_FIELDS,
    UNSUPPORTED_TOOL_CHOICE_TYPES,
    UNSUPPORTED_TOOL_TYPES,
    ResponsesRequest,
    parse_request,
)
from zumik_serve.responses.response import (
    ItemIds,
    ResponseHead,
    random_item_id,
    render_response,
    render_usage,
)
from zumik_serve.responses.stream import Event, StreamTranslator, sse

__all__ = [
    "HINT_FIELDS",
    "UNSUPPORTED_CONTENT_TYPES",
    "UNSUPPORTED_FIELDS",
    "UNSUPPORTED_ITEM_TYPES",
    "UNSUPPORTED_TOOL_CHOICE_TYPES",
    "UNSUPPORTED_TOOL_TYPES",
    "ChatMessage",
    "Event",
    "ItemIds",
    "ResponseHead",
    "ResponsesRequest",
    "StreamTranslator",
    "Unsupported",
    "chat_body",
    "chat_messages",
    "input_history",
    "output_history",
    "parse_request",
    "random_item_id",
    "render_response",
    "render_usage",
    "sse",
]
