"""/v1 chat prompts keyed by the engine's own block hashes (``engines/chat_prompt.py``).

Invariants held here:
- the token ids the gateway builds from a chat body (``HfChatTokenizer.encode_engine_chat``)
  equal those vLLM's own chat renderer builds from it, for the tiny model's template (BOS from
  the template, a string-format template, developer turned system and merged) and for templates
  that iterate content parts ("openai" format), name the developer role or take
  ``reasoning_effort``, and one that writes ``tools`` and every message as JSON (each key, its
  order and value); with and without ``add_generation_prompt``; text content parts; ``name``,
  tool results and empty assistant content; tools (None fields, ``strict``, ``defer_loading``,
  extras) under each tool_choice that renders them, assistant tool calls (arguments as JSON
  text, empty, invalid or not an object; extras; an empty list) and reasoning;
- requests whose rendering the gateway does not reproduce (tools with tool_choice "none" or
  that vLLM rejects, malformed tool calls, template arguments, images, unknown roles, prompts
  past the tokenizing limit, engines whose vllm_args change the rendering) give a reason, never
  an error;
- through the gateway's request path, with the group's engines reporting KV events, a chat
  request's recorded prefix keys are ``engine_block_keys`` of vLLM's token ids under the
  request's cache salt, the engine still gets the chat body, and ``chat_keys`` counts it, a
  request with tools too; one with tool_choice "none" keeps text keys and is counted by its
  reason; without KV events nothing is tokenized.
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from profiles import load_builtin
from tests.support.fake_engine import FakeEngine
from tests.support.inprocess import DEV_KEY, InProcessGateway, gateway_settings, shared_secrets_dir
from zumik_serve.api.app import build_app
from zumik_serve.app.context import Metrics, build_context
from zumik_serve.engines.chat_prompt import ChatFallback, engine_conversation
from zumik_serve.engines.hf_tokenizer import HfChatTokenizer
from zumik_serve.engines.vllm_args import chat_content_format
from zumik_serve.routing.block_hashes import engine_block_keys
from zumik_serve.server_secrets import generate_missing
from zumik_serve.state.tokenizing import Tokenization

OPENAI_FORMAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}[{{ part['text'] }}]{% endfor %}{% endif %}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEVELOPER_TEMPLATE = (
    "{{ bos_token }}{% if reasoning_effort is defined %}<|system|>\neffort<|end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'developer' %}<|developer|>\n"
    "{% else %}<|{{ message['role'] }}|>\n{% endif %}{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Writes what the template gets, keys in order: equal ids mean an equal conversation and tools.
JSON_TEMPLATE = (
    "{{ bos_token }}{% if tools is not none %}<|tools|>\n{{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message | tojson }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find an order",
        "parameters": {"type": "object", "properties": {"order": {"type": "string"}}},
    },
}
TOOL_CALLS = [
    {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"order": "42"}'}},
    {"type": "function", "function": {"arguments": "", "name": "lookup"}, "id": "c2"},
    {"id": "c3", "type": "function", "function": {"name": "lookup", "arguments": "{not json"}},
    {"id": "c4", "type": "function", "function": {"name": "lookup", "arguments": "[1, 2]"}},
    {"id": "c5", "type": "function", "function": {"name": "f", "arguments": "{}", "x": 1}, "index": 0},
]
TOOL_TURNS = [
    {"role": "system", "content": "you look orders up"},
    {"role": "user", "content": "where is order 42?"},
    {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS, "reasoning_content": "look"},
    {"role": "tool", "content": "shipped", "tool_call_id": "c1"},
    {"role": "assistant", "content": "it shipped", "tool_calls": [], "reasoning": "done"},
    {"role": "user", "content": "thanks"},
]

BODIES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "hello there"}]},
    {"messages": [{"role": "user", "content": "hello"}], "add_generation_prompt": False},
    {
        "messages": [
            {"role": "system", "content": "you are terse"},
            {"role": "developer", "content": "answer in French"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}],
            },
        ]
    },
    {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "sys"}]},
            {"role": "user", "content": "look it up", "name": "bob"},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": [{"type": "text", "text": "42"}], "tool_call_id": "call_1"},
            {"role": "user", "content": "and again?"},
        ],
        "temperature": 0,
        "max_tokens": 3,
    },
    {"messages": TOOL_TURNS},
    {"messages": TOOL_TURNS[:2], "tools": [LOOKUP]},
    {"messages": TOOL_TURNS, "tools": [LOOKUP], "tool_choice": "auto", "parallel_tool_calls": False},
    {
        "messages": TOOL_TURNS[:2],
        "tools": [
            {"function": {"name": "bare"}, "defer_loading": True, "cache_control": {}},
            {"type": "function", "function": {"name": "s", "strict": False, "parameters": {}, "y": 2}},
        ],
        "tool_choice": None,
    },
    {"messages": TOOL_TURNS, "tools": [LOOKUP], "tool_choice": "required"},
    {
        "messages": TOOL_TURNS,
        "tools": [LOOKUP],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
    },
]


def _with_template(source: Path, target: Path, template: str) -> Path:
    shutil.copytree(source, target)
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, sort_keys=True))
    return target


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("templates")
    return {
        "tiny": tiny_model_dir,
        "openai": _with_template(tiny_model_dir, root / "openai", OPENAI_FORMAT_TEMPLATE),
        "developer": _with_template(tiny_model_dir, root / "developer", DEVELOPER_TEMPLATE),
        "json": _with_template(tiny_model_dir, root / "json", JSON_TEMPLATE),
    }


@functools.cache
def _vllm_chat_renderer(model_dir: Path) -> Any:
    """vLLM's chat front end for ``model_dir`` as an engine with a tool parser deploys it (so
    every tool_choice renders; the parser adjusts a request only after its prompt is built)."""
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers.hf import HfRenderer
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.tokenizers import get_tokenizer

    model_config = ModelConfig(model=str(model_dir), tokenizer=str(model_dir))
    renderer = HfRenderer(VllmConfig(model_config=model_config), get_tokenizer(str(model_dir)))
    return OnlineRenderer(
        model_config, renderer, request_logger=None, chat_template=None,
        chat_template_content_format="auto", enable_auto_tools=True, tool_parser="pythonic",
    )  # fmt: skip


def vllm_chat_ids(model_dir: Path, body: dict[str, Any]) -> list[int]:
    """The prompt token ids vLLM's own chat front end (``render_chat``) builds for ``body``."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(**json.loads(json.dumps({"model": "m", **body})))  # vLLM's copy
    rendered = asyncio.run(_vllm_chat_renderer(model_dir).render_chat(request))
    assert isinstance(rendered, tuple), rendered
    _, (prompt,) = rendered
    return list(prompt["prompt_token_ids"])


def engine_tokenizer(model_dir: Path) -> HfChatTokenizer:
    """The gateway's tokenizer of ``model_dir``, with the content format found at deploy."""
    return HfChatTokenizer(model_dir, chat_content_format=chat_content_format(model_dir, {}))


@pytest.mark.parametrize("template", ["tiny", "openai", "developer", "json"])
def test_engine_chat_ids_equal_vllms_own_rendering(model_dirs: dict[str, Path], template: str) -> None:
    tokenizer = engine_tokenizer(model_dirs[template])
    for body in BODIES:
        ours = tokenizer.encode_engine_chat(body)
        assert ours == vllm_chat_ids(model_dirs[template], body), (template, body)
    bos = tokenizer._tokenizer.convert_tokens_to_ids("<|bos|>")
    assert tokenizer.encode_engine_chat(BODIES[0])[:1] == [bos]  # once: the template's
    assert chat_content_format(model_dirs[template], {}) == ("openai" if template == "openai" else "string")


def test_engines_that_render_with_their_own_arguments_keep_text_keys(tiny_model_dir: Path) -> None:
    assert chat_content_format(tiny_model_dir, {"chat_template": "{{ messages }}"}) is None
    assert HfChatTokenizer(tiny_model_dir).encode_engine_chat(BODIES[0]) is ChatFallback.ENGINE_TEMPLATE


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "tools": []}, ChatFallback.TOOLS),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [LOOKUP], "tool_choice": "none"},
            ChatFallback.TOOLS,
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}, ChatFallback.TOOLS),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"function": {"name": 1}}]},
            ChatFallback.TOOLS,
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"function": {"name": "f", "strict": "true"}}],
            },
            ChatFallback.TOOLS,
        ),
        ({"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}, ChatFallback.TOOLS),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {}}]},
                ]
            },
            ChatFallback.TOOLS,
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ]
            },
            ChatFallback.TOOLS,
        ),
        (
            {"messages": [{"role": "developer", "content": "x", "tools": [LOOKUP]}]},
            ChatFallback.TOOLS,
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": 1}},
            ChatFallback.TEMPLATE_ARGS,
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
            ChatFallback.TEMPLATE_ARGS,
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            },
            ChatFallback.CONTENT,
        ),
        ({"messages": [{"role": "narrator", "content": "x"}]}, ChatFallback.MESSAGE),
        ({"messages": ["not a message"]}, ChatFallback.MESSAGE),
    ],
)
def test_requests_not_reproduced_give_their_reason(body: dict[str, Any], reason: ChatFallback) -> None:
    assert engine_conversation(body, content_format="string", developer_role=False) == reason


def test_engine_chat_past_the_limit_or_failing_is_a_reason_not_an_error(tiny_model_dir: Path) -> None:
    tokenization = Tokenization(max_bytes=10)
    body = {"messages": [{"role": "user", "content": "far more than ten bytes"}]}
    result = asyncio.run(tokenization.engine_chat(lambda: engine_tokenizer(tiny_model_dir), body))
    assert result is ChatFallback.TOO_LARGE

    def no_tokenizer() -> HfChatTokenizer:
        raise OSError("no tokenizer here")

    assert asyncio.run(Tokenization(10_000).engine_chat(no_tokenizer, body)) is ChatFallback.NO_TOKENIZER

    class Failing:
        def encode_engine_chat(self, body: object) -> list[int]:
            raise KeyError("a body no rule foresaw")

    assert asyncio.run(Tokenization(10_000).engine_chat(Failing, body)) is ChatFallback.RENDER_ERROR


class DecisionCounts:
    """The gateway's decision metrics, counted here (``app/metrics.py`` exports them to Ray)."""

    def __init__(self) -> None:
        self.chat: dict[str, int] = {}

    def observe(self, *, route: str, reason: str, decide_us: float) -> None:
        pass

    def chat_keys(self, kind: str) -> None:
        self.chat[kind] = self.chat.get(kind, 0) + 1


def _gateway(
    redis_url: str, model_dir: Path, *, engine_events: bool, decisions: DecisionCounts | None = None
) -> InProcessGateway:
    generate_missing(shared_secrets_dir())
    profile = load_builtin("local-cpu")
    settings = gateway_settings(redis_url, model_dir, profile, shared_secrets_dir())
    engines = {"r0": FakeEngine()}
    settings = replace(
        settings, engine_kv_events=engine_events, chat_content_format=chat_content_format(model_dir, {})
    )
    context = build_context(settings, dict(engines), Metrics(decisions=decisions))
    return InProcessGateway(build_app(context), context, engines, redis_url)


CONVERSATION = [
    {"role": "system", "content": "You are the support agent of a bike shop. " * 12},
    {"role": "user", "content": "My chain skips on the third gear, what should I check first?"},
]


@pytest.mark.redis
def test_chat_keys_are_the_engine_block_hashes_of_vllms_token_ids(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    metrics = DecisionCounts()
    gateway = _gateway(module_redis_url, tiny_model_dir, engine_events=True, decisions=metrics)
    scheduler = gateway.context.dispatcher.scheduler
    block_size = gateway.context.profile.engine.block_size

    async def run() -> None:
        async with gateway.client(DEV_KEY) as client:
            answer = await client.post(
                "/v1/chat/completions", json={"model": "zumik-tiny", "messages": CONVERSATION}
            )
            assert answer.status_code == 200, answer.text
            sent = gateway.engine.bodies[-1]
            assert sent["messages"] == CONVERSATION and "prompt" not in sent  # vLLM still gets chat
            ids = await asyncio.to_thread(vllm_chat_ids, tiny_model_dir, {"messages": CONVERSATION})
            expected = engine_block_keys(
                ids, block_size=block_size, cache_salt=sent["cache_salt"], max_blocks=1_000
            )
            assert len(expected) >= 4 and scheduler.residency.keys("r0") == tuple(reversed(expected))
            assert scheduler.chat_keys == {"engine": 1}

            with_tools = {"messages": CONVERSATION + [{"role": "user", "content": "?"}], "tools": [LOOKUP]}
            answer = await client.post("/v1/chat/completions", json={"model": "zumik-tiny", **with_tools})
            assert answer.status_code == 200, answer.text
            assert gateway.engine.bodies[-1]["tools"] == [LOOKUP]
            ids = await asyncio.to_thread(vllm_chat_ids, tiny_model_dir, with_tools)
            expected = engine_block_keys(
                ids, block_size=block_size, cache_salt=sent["cache_salt"], max_blocks=1_000
            )
            assert set(expected) <= set(scheduler.residency.keys("r0"))
            assert scheduler.chat_keys == {"engine": 2}

            not_reproduced = {**with_tools, "tool_choice": "none"}  # the engines' flag decides
            answer = await client.post("/v1/chat/completions", json={"model": "zumik-tiny", **not_reproduced})
            assert answer.status_code == 200, answer.text
            assert scheduler.chat_keys == {"engine": 2, "tools": 1}
            assert metrics.chat == {"engine": 2, "tools": 1}  # the metric counts the same
            text_keys = _text_keys(gateway, with_tools["messages"], sent["cache_salt"])
            assert text_keys and set(text_keys) <= set(scheduler.residency.keys("r0"))

    asyncio.run(run())


def _text_keys(gateway: InProcessGateway, messages: list[dict[str, Any]], salt: str) -> list[str]:
    from zumik_serve.engines.protocol import EngineCall
    from zumik_serve.routing.scheduler import prefix_keys

    text = gateway.context.dispatcher.prompt(EngineCall.CHAT, {"messages": messages}, salt=salt).text
    return prefix_keys(
        text, block_size=gateway.context.profile.engine.block_size, salt=salt, max_blocks=1_000
    )


@pytest.mark.redis
def test_without_engine_events_chat_prompts_are_not_tokenized(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    gateway = _gateway(module_redis_url, tiny_model_dir, engine_events=False)

    async def run() -> None:
        async with gateway.client(DEV_KEY) as client:
            answer = await client.post(
                "/v1/chat/completions", json={"model": "zumik-tiny", "messages": CONVERSATION}
            )
            assert answer.status_code == 200, answer.text

    asyncio.run(run())
    assert gateway.context.dispatcher.scheduler.chat_keys == {"no_events": 1}  # counted as text
    assert gateway.context.models._tokenizers == {}  # never loaded


def test_tool_call_arguments_python_cannot_parse_are_empty_as_vllm_makes_them() -> None:
    from zumik_serve.engines.chat_prompt import _arguments

    assert _arguments('{"n": ' + "9" * 5000 + "}") == {} and _arguments("[" * 100_000) == {}
    assert _arguments('{"city": "Paris"}') == {"city": "Paris"}
