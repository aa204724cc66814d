"""ChatTokenizer over a local Hugging Face tokenizer directory (transformers)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstore.fingerprint import tokenizer_fingerprint


class HfChatTokenizer:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(directory))
        template = self._tokenizer.chat_template
        if not isinstance(template, str):
            raise ValueError(f"the tokenizer in {directory} has no single chat template")
        self._template_digest = hashlib.sha256(template.encode()).hexdigest()
        self._fingerprint = tokenizer_fingerprint(Path(directory))

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
