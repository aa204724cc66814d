"""OpenAI's Responses API (``POST /v1/responses``) as a translation over chat completions.

A Responses request is parsed (``request.py``, with its input items in ``items.py`` and the
shared parsing rules in ``body.py``), turned into a chat-completions body (``chat.py``) that the
existing pipeline runs, and the chat answer, whole or streamed, is turned back into a ``Response``
object (``response.py``) or the Responses stream events (``stream.py``). ``wire.py`` names what a
handler needs of them. Keeping responses for ``previous_response_id`` is described by the
storage modules of this package.

Rule kept by the translation modules: they are pure. No HTTP, no Redis, no engine; time, ids and
the earlier messages of a chain come in as arguments, and every body they build carries only keys
of the official OpenAI schema.
"""
