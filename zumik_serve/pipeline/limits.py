"""Input limits of a generation request, checked before any engine sees it (each a 400 naming
the parameter, never echoing the input): ``n``, ``max_tokens`` / ``max_completion_tokens`` (JSON
integers only, none above the limit), every other integer that sets an amount of work (JSON
integers only: ``INTEGER_FIELDS``), the number of messages and of prompts, and media parts the
engine would fetch by URL (``check_media_urls``). The body size (413,
before the whole body is read) is in ``api/body.py``, the JSON depth and number sizes in
``api/v1/wire.parse_json_body``; header sizes are the HTTP server's (Ray Serve's ingress answers
400/431 before the app runs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from profiles import Profile
from zumik_serve.errors import InvalidRequestError


@dataclass(frozen=True)
class GenerationLimits:
    max_n: int
    max_output_tokens: int  # the engine's context: nothing longer can be generated
    max_messages: int
    max_prompts: int
    media_hosts: frozenset[str] = frozenset()  # hosts the engines may fetch media from

    @classmethod
    def of(cls, profile: Profile) -> GenerationLimits:
        gateway = profile.gateway
        listed = profile.engine.vllm_args.get("allowed_media_domains")
        hosts = (
            frozenset(str(host).lower() for host in listed)
            if isinstance(listed, list | tuple)
            else frozenset()
        )
        return cls(
            max_n=gateway.max_n,
            max_output_tokens=profile.engine.max_model_len,
            max_messages=gateway.max_messages,
            max_prompts=gateway.max_prompts,
            media_hosts=hosts,
        )


COUNT_FIELDS = ("n", "max_tokens", "max_completion_tokens")
"""Fields that multiply the engine's work: only a JSON integer is taken (an engine would coerce
the string "9000" and run 9,000 sequences)."""
INTEGER_FIELDS = (*COUNT_FIELDS, "top_logprobs", "seed")
"""Every integer field a generation may send (``api/v1/wire.py`` refuses the others): only a
JSON integer is taken, never a string or a float the engine would coerce, nor a bool."""
INTEGER_OR_FLAG_FIELDS = ("logprobs",)
"""An integer on /v1/completions, a boolean on chat: either, never a string."""


def check_generation_limits(body: Mapping[str, Any], limits: GenerationLimits) -> None:
    for field in INTEGER_FIELDS:
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequestError(f"{field} must be an integer.", param=field)
    for field in INTEGER_OR_FLAG_FIELDS:
        value = body.get(field)
        if value is not None and not isinstance(value, int):  # bool is an int
            raise InvalidRequestError(f"{field} must be an integer or a boolean.", param=field)
    n = body.get("n")
    if n is not None and n > limits.max_n:
        raise InvalidRequestError(f"n must be at most {limits.max_n} on this server.", param="n")
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if value is not None and value > limits.max_output_tokens:
            raise InvalidRequestError(
                f"{field} must be at most {limits.max_output_tokens} (this model's context length).",
                param=field,
            )
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise InvalidRequestError(
            f"messages has more than {limits.max_messages} entries; send fewer, or keep the history "
            "in a /v2 session.",
            param="messages",
        )
    if isinstance(messages, list):
        check_media_urls(messages, limits.media_hosts)
    prompt = body.get("prompt")
    if (
        isinstance(prompt, list)
        and prompt
        and not isinstance(prompt[0], int)
        and len(prompt) > limits.max_prompts
    ):
        raise InvalidRequestError(f"prompt has more than {limits.max_prompts} entries.", param="prompt")


MEDIA_PARTS = ("image_url", "video_url", "audio_url")
"""Content parts vLLM loads from a URL (``vllm.multimodal.media``): an http(s) one it fetches
itself, from inside the cluster, wherever the URL points."""


def check_media_urls(messages: Sequence[Any], hosts: frozenset[str], *, param: str = "messages") -> None:
    """400 for a media part whose http(s) URL's host is not in ``hosts`` (the profile's
    ``engine.vllm_args.allowed_media_domains``): an engine fetching it would reach whatever the
    cluster reaches (its dashboard, a cloud's metadata service). Inline media (``data:`` URLs)
    pass: nothing is fetched."""
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            for kind in MEDIA_PARTS:
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, Mapping) else ref
                if not isinstance(url, str):
                    continue
                try:
                    parts = urlsplit(url.strip())
                    host = parts.hostname or ""
                except ValueError:  # not a URL (an unclosed "[", a bad port): refused like a remote one
                    parts, host = urlsplit("http:"), ""
                if parts.scheme.lower() not in ("http", "https") or host in hosts:
                    continue
                raise InvalidRequestError(
                    f"{param}[{index}] has a {kind} part with a remote URL, which this deployment's "
                    "engines do not fetch. Send the media inline as a data: URL, or have the operator "
                    "list its domain in the profile's engine.vllm_args.allowed_media_domains.",
                    param=f"{param}[{index}].content",
                )
