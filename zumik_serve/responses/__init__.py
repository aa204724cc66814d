"""OpenAI's Responses API (``POST /v1/responses``) as a translation over chat completions.

A Responses request is parsed (``request.py``), turned into a chat-completions body (``chat.py``)
that the existing pipeline runs, and the chat answer, whole or streamed, is turned back into a
``Response`` object (``response.py``) or the Responses stream events (``stream.py``).
``wire.py`` is the surface the HTTP handler imports.

Rule kept here: this package is pure translation. No HTTP, no Redis, no engine; time, ids and the
earlier responses of a chain come in as arguments, and every body it builds carries only keys of
the official OpenAI schema.
"""
