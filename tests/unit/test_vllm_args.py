"""engine.vllm_args: checked by vLLM's own argument parser, with the argument named."""

from __future__ import annotations

from typing import Any

import pytest

from profiles import builtin_names, load_builtin
from profiles.model import EngineSpec
from zumik_serve.engines.vllm_args import VllmArgsError, engine_kwargs_for_vllm, parse_vllm_args
from zumik_serve.engines.vllm_config import vllm_engine_kwargs


@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_profiles_engine_settings_pass_vllms_parser(name: str) -> None:
    profile = load_builtin(name)
    parsed = parse_vllm_args(vllm_engine_kwargs(profile))
    assert parsed["block_size"] == profile.engine.block_size
    assert parsed["tool_call_parser"] == profile.engine.vllm_args["tool_call_parser"]
    assert parsed["enable_auto_tool_choice"] is True


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            {"tool_call_parsr": "hermes"},
            "engine.vllm_args.tool_call_parsr: vLLM has no engine or server argument",
        ),
        ({"tool_call_parsr": "hermes"}, "did you mean tool_call_parser"),
        ({"max_loras": "x"}, "engine.vllm_args.max_loras: expected an integer, got 'x'"),
        ({"max_loras": "4"}, "engine.vllm_args.max_loras: expected an integer, got '4'"),
        ({"max_loras": True}, "engine.vllm_args.max_loras: expected a value, not true"),
        ({"max_loras": 2.5}, "engine.vllm_args.max_loras: expected an integer, got 2.5"),
        ({"max_lora_rank": 7}, "engine.vllm_args.max_lora_rank: argument --max-lora-rank: invalid choice"),
        ({"enable_auto_tool_choice": True}, "requires --tool-call-parser"),
        (
            {"enable_auto_tool_choice": True, "tool_call_parser": "nope"},
            "'nope' is not one of vLLM's tool parsers",
        ),
        ({"headless": True}, "vLLM has no engine or server argument 'headless'"),  # not an engine argument
        ({"speculative_config": []}, "an empty list"),
    ],
)
def test_a_wrong_argument_is_refused_naming_it(args: dict[str, Any], expected: str) -> None:
    with pytest.raises(VllmArgsError) as caught:
        parse_vllm_args(args)
    assert expected in str(caught.value)


def test_values_come_out_as_vllm_parses_them() -> None:
    parsed = parse_vllm_args(
        {
            "hf_overrides": {"rope_theta": 20000.0},
            "max_num_batched_tokens": 4096,
            "enable_chunked_prefill": False,
        }
    )
    assert parsed == {
        "hf_overrides": {"rope_theta": 20000.0},
        "max_num_batched_tokens": 4096,
        "enable_chunked_prefill": False,
    }


def test_adapters_become_vllm_lora_modules() -> None:
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    data = load_builtin("local-cpu").model_dump(mode="json")
    data["model"]["adapters"] = [{"name": "tiny-lora", "source": "builtin:tiny-lora"}]
    from profiles import Profile

    profile = Profile.model_validate(data)
    kwargs = vllm_engine_kwargs(
        profile, adapter_dirs={"tiny-lora": __import__("pathlib").Path("/adapters/x")}
    )
    assert kwargs["enable_lora"] is True and kwargs["max_loras"] == 1
    parse_vllm_args(kwargs)  # the whole set, lora_modules included, is what `vllm serve` accepts
    modules = engine_kwargs_for_vllm(kwargs)["lora_modules"]
    assert modules == [LoRAModulePath(name="tiny-lora", path="/adapters/x", base_model_name="zumik-tiny")]


def test_profile_refuses_arguments_it_has_a_field_for() -> None:
    with pytest.raises(ValueError, match=r"vllm_args.block_size: set engine.block_size instead"):
        EngineSpec(kv_cache_memory_bytes=1 << 20, vllm_args={"block_size": 16})
    with pytest.raises(ValueError, match=r"use its Python name"):
        EngineSpec(kv_cache_memory_bytes=1 << 20, vllm_args={"tool-call-parser": "hermes"})
    # A non-cryptographic block hash would let a crafted prompt collide with cached blocks.
    with pytest.raises(ValueError, match=r"vllm_args.prefix_caching_hash_algo: .*always sha256_cbor"):
        EngineSpec(kv_cache_memory_bytes=1 << 20, vllm_args={"prefix_caching_hash_algo": "xxhash"})
