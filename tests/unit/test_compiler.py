"""The snapshot compiler: fixed ordering, identical token ids across processes, and a changed
chat template or tokenizer shows up as a new compilation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zumik_serve.errors import InvalidRequestError
from zumik_serve.model.tiny import build_tiny_model
from zumik_serve.state.compiler import ArtifactContent, compile_messages, snapshot_messages
from zumik_serve.state.objects import ArtifactRole, FrozenTurn, TurnRole

ARTIFACTS = [
    ArtifactContent(ArtifactRole.SYSTEM, "text/plain", b"You are terse."),
    ArtifactContent(ArtifactRole.TOOLS, "application/json", b'[{"name": "search"}]'),
    ArtifactContent(ArtifactRole.SCHEMA, "application/json", b'{"type": "object"}'),
    ArtifactContent(ArtifactRole.DOCUMENT, "text/markdown", "Résumé".encode()),
    ArtifactContent(ArtifactRole.MESSAGE, "application/json", b'{"role": "assistant", "content": "ok"}'),
    ArtifactContent(ArtifactRole.MESSAGE, "text/plain", b"plain user text"),
]
TURNS = [FrozenTurn(TurnRole.USER, "hi"), FrozenTurn(TurnRole.ASSISTANT, "hello")]


def test_messages_follow_bundle_then_turn_order() -> None:
    messages = snapshot_messages(ARTIFACTS, TURNS)
    assert [m["role"] for m in messages] == [
        "system",
        "system",
        "system",
        "system",
        "assistant",
        "user",
        "user",
        "assistant",
    ]
    assert messages[1]["content"].startswith("# Tools\n")
    assert messages[2]["content"].startswith("# Response schema\n")
    assert messages[3]["content"] == "# Document\nRésumé"


def test_binary_artifact_cannot_be_compiled() -> None:
    with pytest.raises(InvalidRequestError, match="cannot be compiled"):
        snapshot_messages([ArtifactContent(ArtifactRole.DOCUMENT, "image/png", b"\x89PNG")], [])


COMPILE_SCRIPT = """
import json, sys
from pathlib import Path
from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.state.compiler import compile_messages
messages = json.loads(sys.argv[2])
compiled = compile_messages(messages, HfChatTokenizer(Path(sys.argv[1])))
print(json.dumps({"ids": compiled.token_ids, "compilation": compiled.compilation.record()}))
"""


def _compile_in_subprocess(model_dir: Path, messages: list) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(model_dir), json.dumps(messages)],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "random", "PATH": ""},
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_compilation_is_identical_across_processes(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny")
    messages = snapshot_messages(ARTIFACTS, TURNS)
    first = _compile_in_subprocess(model_dir, messages)
    second = _compile_in_subprocess(model_dir, messages)
    assert first == second
    assert first["compilation"]["num_tokens"] == len(first["ids"]) > 20


def test_changed_template_gives_a_new_compilation(tmp_path: Path) -> None:
    from zumik_serve.engines.hf_tokenizer import HfChatTokenizer

    model_dir = build_tiny_model(tmp_path / "tiny")
    messages = snapshot_messages(ARTIFACTS[:1], TURNS)
    before = compile_messages(messages, HfChatTokenizer(model_dir)).compilation
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = config["chat_template"].replace("\n", " ")
    config_path.write_text(json.dumps(config))
    after = compile_messages(messages, HfChatTokenizer(model_dir)).compilation
    assert after.key != before.key
    assert after.chat_template_digest != before.chat_template_digest
    assert after.token_ids_digest != before.token_ids_digest


@pytest.mark.parametrize("odd", [b"9" * 5000, b"[" * 100_000])
def test_a_message_artifact_python_cannot_parse_as_json_is_a_user_message_not_a_500(odd: bytes) -> None:
    """An integer past Python's cap on digits, or nesting past its recursion limit, raised out of
    the compiler (only a JSON syntax error was caught): the artifact is then plain user text."""
    text = b'{"role": "system", "content": "x", "n": ' + odd + b"}"
    (message,) = snapshot_messages([ArtifactContent(ArtifactRole.MESSAGE, "application/json", text)], [])
    assert message == {"role": "user", "content": text.decode()}
