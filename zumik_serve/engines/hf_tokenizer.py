"""ChatTokenizer over a local Hugging Face tokenizer directory (transformers)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvstore.fingerprint import tokenizer_fingerprint
from zumik_serve.engines.chat_prompt import ChatFallback, ContentFormat, engine_conversation


class HfChatTokenizer:
    def __init__(self, directory: Path, *, chat_content_format: ContentFormat | None = None) -> None:
        """``chat_content_format``: the content format the engines' vLLM renders this template's
        chat requests with (``engines/vllm_args.py`` ``chat_content_format``, found at deploy);
        None: ``encode_engine_chat`` does not rebuild them."""
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        template = self._tokenizer.chat_template
        if not isinstance(template, str):
            raise ValueError(f"the tokenizer in {directory} has no single chat template")
        self._template = template
        self._template_digest = hashlib.sha256(template.encode()).hexdigest()
        self._fingerprint = tokenizer_fingerprint(Path(directory))
        self._content_format = chat_content_format

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def chat_template_digest(self) -> str:
        return self._template_digest

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def encode_engine_chat(self, body: Mapping[str, Any]) -> list[int] | ChatFallback:
        """The token ids vLLM's chat endpoint builds from ``body`` (a /v1 chat body) with this
        tokenizer and its template (``engines/chat_prompt.py``), or why they are not rebuilt
        here. CPU work: run it off the event loop (``state/tokenizing.py``)."""
        content_format = self._content_format
        if content_format is None:
            return ChatFallback.ENGINE_TEMPLATE
        chat = engine_conversation(
            body, content_format=content_format, developer_role=_names_developer(self._template)
        )
        if isinstance(chat, ChatFallback):
            return chat
        try:  # vLLM's template arguments (those it leaves unset, None, are not passed)
            ids = self._tokenizer.apply_chat_template(
                list(chat.conversation), tools=None if chat.tools is None else list(chat.tools),
                chat_template=self._template, tokenize=True,
                return_dict=False, add_generation_prompt=chat.add_generation_prompt,
                continue_final_message=False,
            )  # fmt: skip
        except Exception:  # the template refused the request: vLLM answers it, keys do not matter
            return ChatFallback.RENDER_ERROR
        return list(ids)


def _names_developer(template: str) -> bool:
    """vLLM's ``_detect_developer_role_support``: the template names the developer role."""
    return '"developer"' in template or "'developer'" in template
