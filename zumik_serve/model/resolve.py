"""Where a model or adapter source's files live on this machine, building built-in ones when needed.

Rule kept here: nothing is downloaded from a model hub. A source is either a built-in name,
built under ``ZUMIK_HOME`` on first use and reused after, or a local folder, which must hold
what its kind needs; anything else fails with a ``ModelSourceError`` naming the source.

    model sources     builtin:tiny, builtin:tiny-b, builtin:tiny-wide, or a Hugging Face folder
                      with config.json
    adapter sources   builtin:tiny-lora, or a PEFT LoRA folder with adapter_config.json
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from profiles import TINY_MODEL_SOURCE, Profile
from zumik_serve.home import ZumikHome
from zumik_serve.model.tiny import TINY_B_SPEC, TINY_WIDE_SPEC, TinyModelSpec, build_tiny_model
from zumik_serve.model.tiny_lora import (
    TinyLoraSpec,
    build_tiny_lora,
    is_adapter_dir,
    read_adapter_info,
)

BUILTIN_PREFIX = "builtin:"
TINY_B_MODEL_SOURCE = "builtin:tiny-b"
TINY_WIDE_MODEL_SOURCE = "builtin:tiny-wide"
TINY_LORA_SOURCE = "builtin:tiny-lora"

# vLLM's LoRA loader reads the first of these that exists (vllm/lora/lora_model.py).
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


class ModelSourceError(ValueError):
    pass


@dataclass(frozen=True)
class _BuiltinModel:
    folder: Callable[[ZumikHome], Path]
    spec: TinyModelSpec


@dataclass(frozen=True)
class _BuiltinAdapter:
    folder: Callable[[ZumikHome], Path]
    spec: TinyLoraSpec
    base: TinyModelSpec


BUILTIN_MODELS: dict[str, _BuiltinModel] = {
    TINY_MODEL_SOURCE: _BuiltinModel(lambda home: home.tiny_model_dir, TinyModelSpec()),
    TINY_B_MODEL_SOURCE: _BuiltinModel(lambda home: home.tiny_b_model_dir, TINY_B_SPEC),
    TINY_WIDE_MODEL_SOURCE: _BuiltinModel(lambda home: home.tiny_wide_model_dir, TINY_WIDE_SPEC),
}
BUILTIN_ADAPTERS: dict[str, _BuiltinAdapter] = {
    TINY_LORA_SOURCE: _BuiltinAdapter(
        lambda home: home.tiny_lora_adapter_dir,
        TinyLoraSpec(base_model=TINY_MODEL_SOURCE),
        TinyModelSpec(),
    ),
}


def resolve_source(source: str, home: ZumikHome) -> Path:
    """The folder of model ``source``: a built-in model (built on first use, rebuilt when an
    older Zumik built it differently) or a local Hugging Face model folder (one with
    ``config.json``)."""
    builtin = BUILTIN_MODELS.get(source)
    if builtin is not None:
        return build_tiny_model(builtin.folder(home), builtin.spec)  # writes only what differs
    if source in BUILTIN_ADAPTERS:
        raise ModelSourceError(f"model source {source!r} is a LoRA adapter, not a model")
    if source.startswith(BUILTIN_PREFIX):
        raise ModelSourceError(
            f"model source {source!r} is not a built-in model (built-in: {_names(BUILTIN_MODELS)})"
        )
    path = _existing_folder(source, "model")
    if (path / "config.json").is_file():
        return path
    if (path / "adapter_config.json").is_file():
        raise ModelSourceError(
            f"model source {source!r} is a LoRA adapter folder (adapter_config.json), not a model"
        )
    raise ModelSourceError(
        f"model source {source!r} is not a local Hugging Face model directory (no config.json); "
        "nothing is downloaded from a model hub"
    )


def resolve_adapter(source: str, home: ZumikHome) -> Path:
    """The folder of LoRA adapter ``source``: a built-in adapter (built on first use) or a local
    PEFT adapter folder (``adapter_config.json`` of a LoRA and its weights)."""
    builtin = BUILTIN_ADAPTERS.get(source)
    if builtin is not None:
        folder = builtin.folder(home)
        if not is_adapter_dir(folder):
            build_tiny_lora(folder, builtin.spec, builtin.base)
        return folder
    if source in BUILTIN_MODELS:
        raise ModelSourceError(f"adapter source {source!r} is a model, not a LoRA adapter")
    if source.startswith(BUILTIN_PREFIX):
        raise ModelSourceError(
            f"adapter source {source!r} is not a built-in adapter (built-in: {_names(BUILTIN_ADAPTERS)})"
        )
    path = _existing_folder(source, "adapter")
    if not (path / "adapter_config.json").is_file():
        what = "a model folder" if (path / "config.json").is_file() else "not a LoRA adapter folder"
        raise ModelSourceError(
            f"adapter source {source!r} is {what} (no adapter_config.json); "
            "nothing is downloaded from a model hub"
        )
    if not any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise ModelSourceError(
            f"adapter source {source!r} has no adapter weights (one of {', '.join(ADAPTER_WEIGHT_FILES)})"
        )
    try:
        read_adapter_info(path)
    except ValueError as error:  # json.JSONDecodeError is a ValueError too
        raise ModelSourceError(f"adapter source {source!r}: {error}") from error
    return path


def resolve_model_dir(profile: Profile, home: ZumikHome) -> Path:
    """The folder of ``profile``'s model (``model.source``); errors name the profile."""
    try:
        return resolve_source(profile.model.source, home)
    except ModelSourceError as error:
        raise ModelSourceError(f"profile {profile.name}: model.source: {error}") from error


def _existing_folder(source: str, kind: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ModelSourceError(
            f"{kind} source {source!r} is neither a built-in name nor an existing local folder; "
            "nothing is downloaded from a model hub"
        )
    return path


def _names(table: Iterable[str]) -> str:
    return ", ".join(sorted(table))
