"""The snapshot compiler: a snapshot → chat messages → token ids, deterministically.

    artifacts (bundle order)                      turns (seq order, 1..upto_turn)
      system   → {"role": "system", content}        {"role": turn.role, content}
      tools    → {"role": "system", "# Tools\\n" + content}
      schema   → {"role": "system", "# Response schema\\n" + content}
      document → {"role": "system", "# Document\\n" + content}
      message  → the JSON message it holds ({"role", "content"}), else a user message
    → chat template of the profile's tokenizer (no generation prompt) → token ids

Rule kept here: the output depends only on the snapshot's frozen content, ``COMPILER_VERSION``,
the tokenizer and the chat template; the compilation pins all three (fingerprints), so a changed
tokenizer or template shows up as a new compilation, never as a silent change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from zumik_serve.errors import InvalidRequestError
from zumik_serve.state.objects import ArtifactRole, Compilation, FrozenTurn

COMPILER_VERSION = "zumik-compiler/1"
_HEADINGS = {
    ArtifactRole.TOOLS: "# Tools\n",
    ArtifactRole.SCHEMA: "# Response schema\n",
    ArtifactRole.DOCUMENT: "# Document\n",
}
TEXT_MEDIA_PREFIXES = ("text/", "application/json", "application/yaml", "application/x-yaml")

Message = dict[str, Any]


class ChatTokenizer(Protocol):
    """A tokenizer with its chat template. Fingerprints are hex digests of what defines them."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def chat_template_digest(self) -> str: ...

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]: ...


@dataclass(frozen=True)
class ArtifactContent:
    role: ArtifactRole
    media_type: str
    content: bytes


@dataclass(frozen=True)
class CompiledSnapshot:
    messages: tuple[Message, ...]
    token_ids: tuple[int, ...]
    compilation: Compilation


def snapshot_messages(artifacts: Sequence[ArtifactContent], turns: Sequence[FrozenTurn]) -> list[Message]:
    messages = [_artifact_message(artifact) for artifact in artifacts]
    messages.extend({"role": turn.role.value, "content": turn.content} for turn in turns)
    return messages


def compile_messages(messages: Sequence[Message], tokenizer: ChatTokenizer) -> CompiledSnapshot:
    token_ids = tuple(tokenizer.encode_chat(messages, add_generation_prompt=False))
    digest = hashlib.sha256(json.dumps(token_ids, separators=(",", ":")).encode()).hexdigest()
    compilation = Compilation(
        compiler_version=COMPILER_VERSION,
        tokenizer_fingerprint=tokenizer.fingerprint,
        chat_template_digest=tokenizer.chat_template_digest,
        num_tokens=len(token_ids),
        token_ids_digest=digest,
    )
    return CompiledSnapshot(messages=tuple(messages), token_ids=token_ids, compilation=compilation)


def _artifact_message(artifact: ArtifactContent) -> Message:
    if not artifact.media_type.startswith(TEXT_MEDIA_PREFIXES):
        raise InvalidRequestError(
            f"an artifact of media type {artifact.media_type!r} cannot be compiled into a prompt; "
            "use text, JSON or YAML artifacts in snapshots"
        )
    try:
        text = artifact.content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("an artifact in this snapshot is not valid UTF-8 text") from None
    if artifact.role is ArtifactRole.SYSTEM:
        return {"role": "system", "content": text}
    if artifact.role is ArtifactRole.MESSAGE:
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, an integer past Python's cap, too deep
            message = None
        if isinstance(message, dict) and isinstance(message.get("role"), str) and "content" in message:
            return {"role": message["role"], "content": message["content"]}
        return {"role": "user", "content": text}
    return {"role": "system", "content": _HEADINGS[artifact.role] + text}
