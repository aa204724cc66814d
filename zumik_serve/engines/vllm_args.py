"""A profile's ``engine.vllm_args``, checked and converted by vLLM's own argument parser.

The profile loader cannot import vLLM (profiles stand alone), so it checks only the shape of
``vllm_args`` (names, and no name that a profile field owns). Here each argument goes through
the parser of ``vllm serve`` itself (``make_arg_parser``) exactly as the same flag on the
command line would, followed by the serve-time checks vLLM runs before loading a model
(``validate_parsed_serve_args``, the registered tool and reasoning parsers). What comes out are
the values vLLM's engine and OpenAI front end are built with (``ray.serve.llm`` passes them to
``AsyncEngineArgs`` and ``FrontendArgs``).

Importing vLLM's argument parser takes several seconds; it happens once per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

from zumik_serve.engines.vllm_config import vllm_arg_tokens


class VllmArgsError(ValueError):
    """A ``vllm_args`` entry vLLM would refuse; the message names ``engine.vllm_args.<name>``."""


def parse_vllm_args(args: Mapping[str, Any], *, field: str = "engine.vllm_args") -> dict[str, Any]:
    """The values vLLM parses ``args`` into (``{name: value}``, only the names given), or
    ``VllmArgsError`` naming the first argument vLLM refuses and why."""
    if not args:
        return {}
    parser, known, actions = _parser()
    for name in args:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise VllmArgsError(f"{field}.{name}: vLLM has no engine or server argument {name!r}{hint}")
    every: list[str] = []
    for name, value in args.items():  # one at a time, so that an error names its argument
        action = actions.get(name)
        try:
            tokens = _tokens(action, name, value)
        except ValueError as exc:
            raise VllmArgsError(f"{field}.{name}: {exc}") from None
        _check_scalar_type(action, name, value, field)
        try:
            parser.parse_args(tokens)
        except (_ParseError, SystemExit, TypeError, ValueError) as exc:
            raise VllmArgsError(f"{field}.{name}: {_reason(exc)}") from None
        every.extend(tokens)
    try:
        namespace = parser.parse_args(every)
        _serve_checks(namespace)
    except (_ParseError, SystemExit, TypeError, ValueError, KeyError) as exc:
        raise VllmArgsError(f"{field}: {_reason(exc)}") from None
    return {name: getattr(namespace, name) for name in args}


def engine_kwargs_for_vllm(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` (plain data from ``vllm_config``) with the values vLLM wants as objects made
    so: ``lora_modules`` entries as ``LoRAModulePath``."""
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    converted = dict(kwargs)
    modules = converted.get("lora_modules")
    if modules:
        converted["lora_modules"] = [
            module if isinstance(module, LoRAModulePath) else LoRAModulePath(**module) for module in modules
        ]
    return converted


# vLLM arguments that change how an engine renders a chat request, or with which tokenizer: with
# any of them the gateway does not rebuild its chat prompts (``engines/chat_prompt.py``).
CHAT_RENDERING_ARGS = frozenset({
    "chat_template", "chat_template_content_format", "default_chat_template_kwargs", "tokenizer",
    "tokenizer_mode", "tokenizer_revision", "revision", "code_revision", "trust_remote_code",
    "hf_overrides", "hf_config_path", "skip_tokenizer_init", "enable_prompt_embeds",
})  # fmt: skip


def chat_content_format(tokenizer_dir: Path, args: Mapping[str, Any]) -> Literal["string", "openai"] | None:
    """What vLLM's chat front end resolves ``chat_template_content_format: auto`` to for the
    chat template of ``tokenizer_dir`` (its own detection, from the template's syntax tree): the
    shape a message's content takes in the template. None: the gateway does not rebuild chat
    prompts for these engines (``args`` change the rendering, or there is no single template)."""
    if CHAT_RENDERING_ARGS & set(args):
        return None
    from transformers import AutoTokenizer

    try:  # a private function of vLLM's: another vLLM may move it (then chat keeps text keys)
        from vllm.renderers.hf import _detect_content_format
    except ImportError:
        return None
    template = AutoTokenizer.from_pretrained(str(tokenizer_dir)).chat_template
    if not isinstance(template, str):
        return None
    return _detect_content_format(template, default="string")


class _ParseError(Exception):
    pass


@functools.cache
def _parser() -> tuple[Any, list[str], dict[str, argparse.Action]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs, make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm_args"))

    def error(message: str) -> NoReturn:
        raise _ParseError(message)

    parser.error = error  # type: ignore[method-assign]  # raise, never exit the process
    # What ray.serve.llm accepts in engine_kwargs: the front end's and the engine's fields.
    known = sorted(
        {f.name for f in dataclasses.fields(FrontendArgs)}
        | {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    )
    return parser, known, {action.dest: action for action in parser._actions}


def _tokens(action: argparse.Action | None, name: str, value: Any) -> list[str]:
    """A plain on/off flag (``store_true``) has no ``--no-`` form: false is its default."""
    if value is False and isinstance(action, argparse._StoreTrueAction):
        return []
    if isinstance(value, bool) and action is not None and action.nargs != 0:
        raise ValueError(f"expected a value, not {str(value).lower()}")
    return vllm_arg_tokens(name, value)


def _check_scalar_type(action: argparse.Action | None, name: str, value: Any, field: str) -> None:
    """The command line turns "4" into 4; a profile is typed, so an int or float argument must
    be given as a number (and never as true/false)."""
    wanted = getattr(action, "type", None)
    if wanted not in (int, float):
        return
    expected = "an integer" if wanted is int else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (wanted is int and isinstance(value, float))
    ):
        raise VllmArgsError(f"{field}.{name}: expected {expected}, got {value!r}"[:300])


def _serve_checks(namespace: Any) -> None:
    """What ``vllm serve`` checks before it loads a model."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    validate_parsed_serve_args(namespace)
    parsers = ToolParserManager.list_registered()
    if namespace.tool_call_parser is not None and namespace.tool_call_parser not in parsers:
        raise _ParseError(
            f"tool_call_parser {namespace.tool_call_parser!r} is not one of vLLM's tool parsers "
            f"({', '.join(sorted(parsers))})"
        )
    reasoning = getattr(namespace, "reasoning_parser", None)
    if reasoning and reasoning not in ReasoningParserManager.list_registered():
        raise _ParseError(f"reasoning_parser {reasoning!r} is not one of vLLM's reasoning parsers")


def _reason(exc: BaseException) -> str:
    text = str(exc).removeprefix("Error: ").strip()
    return text[:400] or type(exc).__name__
