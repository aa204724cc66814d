"""The second tiny model, the tiny LoRA adapter, and resolving model and adapter sources.

Invariants held here:
- builtin:tiny-b and builtin:tiny-lora build byte-identically; tiny-b shares builtin:tiny's
  tokenizer but not its weights or KV layout.
- builtin:tiny-wide shares builtin:tiny's tokenizer and KV bytes per token (benches size their
  caches alike) with more weights per layer.
- every adapter tensor is named after a linear module of the base model, with lora_A of shape
  (r, in_features) and lora_B of shape (out_features, r), and config.json-consistent sizes;
  its B is non-zero, so the adapter changes outputs (checked against vLLM by hand, not here).
- resolvers build built-in sources on first use and reuse them after; anything that is not a
  folder of the right kind fails with ModelSourceError naming the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from profiles import TINY_MODEL_SOURCE, Profile, load_builtin
from zumik_serve.home import ZumikHome
from zumik_serve.model.resolve import (
    TINY_B_MODEL_SOURCE,
    TINY_LORA_SOURCE,
    TINY_WIDE_MODEL_SOURCE,
    ModelSourceError,
    resolve_adapter,
    resolve_model_dir,
    resolve_source,
)
from zumik_serve.model.tiny import (
    MODEL_FILES,
    TINY_B_SPEC,
    TINY_WIDE_SPEC,
    TinyModelSpec,
    build_tiny_model,
    fingerprint_model_dir,
    is_model_dir,
)
from zumik_serve.model.tiny_lora import (
    ADAPTER_FILES,
    PEFT_PREFIX,
    TinyLoraSpec,
    build_tiny_lora,
    fingerprint_adapter_dir,
    is_adapter_dir,
    read_adapter_info,
)


def make_home(tmp_path: Path) -> ZumikHome:
    return ZumikHome(tmp_path / "home")


def profile_with_source(source: str) -> Profile:
    profile = load_builtin("local-cpu")
    return profile.model_copy(update={"model": profile.model.model_copy(update={"source": source})})


def file_identities(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file: a rebuild replaces files (new inodes), reuse keeps them."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.iterdir()}


# --- builtin:tiny-b -------------------------------------------------------------------------


def test_tiny_b_builds_byte_identically(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", TINY_B_SPEC)
    second = build_tiny_model(tmp_path / "b", TINY_B_SPEC)
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_tiny_b_differs_from_tiny_in_weights_and_kv_layout_but_shares_tokenizer(tmp_path: Path) -> None:
    tiny = build_tiny_model(tmp_path / "tiny")
    tiny_b = build_tiny_model(tmp_path / "tiny-b", TINY_B_SPEC)
    assert fingerprint_model_dir(tiny) != fingerprint_model_dir(tiny_b)
    config, config_b = (json.loads((d / "config.json").read_text()) for d in (tiny, tiny_b))
    kv_layout = ("num_hidden_layers", "num_key_value_heads", "head_dim")
    assert [config[k] for k in kv_layout] != [config_b[k] for k in kv_layout]
    assert config["architectures"] == config_b["architectures"] == ["LlamaForCausalLM"]
    assert (tiny / "tokenizer.json").read_bytes() == (tiny_b / "tokenizer.json").read_bytes()
    weights, weights_b = (load_file(str(d / "model.safetensors")) for d in (tiny, tiny_b))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert weights[name].shape == weights_b[name].shape
    assert not np.array_equal(weights[name], weights_b[name])  # another seed


def test_tiny_wide_keeps_tiny_tokenizer_and_kv_bytes_per_token_with_wider_layers(tmp_path: Path) -> None:
    from zumik_serve.bench.routing import kv_block_bytes

    tiny = build_tiny_model(tmp_path / "tiny")
    wide = build_tiny_model(tmp_path / "tiny-wide", TINY_WIDE_SPEC)
    assert (tiny / "tokenizer.json").read_bytes() == (wide / "tokenizer.json").read_bytes()
    assert kv_block_bytes(tiny, 16) == kv_block_bytes(wide, 16)
    config, config_w = (json.loads((d / "config.json").read_text()) for d in (tiny, wide))
    assert config_w["head_dim"] == config["head_dim"] == 64
    weights, weights_w = (load_file(str(d / "model.safetensors")) for d in (tiny, wide))
    assert sum(w.size for w in weights_w.values()) > 5 * sum(w.size for w in weights.values())


# --- builtin:tiny-lora ----------------------------------------------------------------------


def test_adapter_builds_byte_identically(tmp_path: Path) -> None:
    first = build_tiny_lora(tmp_path / "a")
    second = build_tiny_lora(tmp_path / "b")
    for name in ADAPTER_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert fingerprint_adapter_dir(first) == fingerprint_adapter_dir(second)
    assert fingerprint_adapter_dir(build_tiny_lora(tmp_path / "c", TinyLoraSpec(seed=1))) != (
        fingerprint_adapter_dir(first)
    )


def test_adapter_config_is_a_plain_peft_lora(tmp_path: Path) -> None:
    adapter = build_tiny_lora(tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    spec = TinyLoraSpec()
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["bias"] == "none"
    assert config["r"] == spec.rank == 8  # vLLM's max_lora_rank accepts 1, 8, 16, 32, ...
    assert config["lora_alpha"] == spec.lora_alpha
    assert config["base_model_name_or_path"] == TINY_MODEL_SOURCE
    assert config["use_dora"] is False and config["modules_to_save"] is None
    info = read_adapter_info(adapter)
    assert (info.rank, info.base_model) == (8, TINY_MODEL_SOURCE)
    assert set(info.target_modules) == set(spec.target_modules)


def test_adapter_tensors_match_the_base_model_modules(tmp_path: Path) -> None:
    base = load_file(str(build_tiny_model(tmp_path / "tiny") / "model.safetensors"))
    adapter = build_tiny_lora(tmp_path / "lora")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = config["r"]
    seen_modules = set()
    for name, tensor in tensors.items():
        assert name.startswith(PEFT_PREFIX), name
        matrix = "lora_A" if name.endswith(".lora_A.weight") else "lora_B"
        assert name.endswith(f".{matrix}.weight"), name
        base_name = name.removeprefix(PEFT_PREFIX).replace(f".{matrix}.weight", ".weight")
        assert base_name in base, f"{name} names no module of the base model"
        out_features, in_features = base[base_name].shape
        expected = (rank, in_features) if matrix == "lora_A" else (out_features, rank)
        assert tensor.shape == expected, name
        assert tensor.dtype == np.float32
        seen_modules.add(base_name.split(".")[-2])
    assert seen_modules == set(config["target_modules"])
    assert len(tensors) == 2 * TinyModelSpec().num_layers * len(config["target_modules"])


def test_adapter_delta_is_a_sizeable_fraction_of_each_base_weight(tmp_path: Path) -> None:
    # What makes the adapter change greedy outputs: B is random (PEFT would start it at zero).
    base = load_file(str(build_tiny_model(tmp_path / "tiny") / "model.safetensors"))
    adapter = build_tiny_lora(tmp_path / "lora")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    info = read_adapter_info(adapter)
    scale = info.lora_alpha / info.rank
    for name, lora_a in tensors.items():
        if not name.endswith(".lora_A.weight"):
            continue
        lora_b = tensors[name.replace(".lora_A.", ".lora_B.")]
        weight = base[name.removeprefix(PEFT_PREFIX).replace(".lora_A.weight", ".weight")]
        ratio = np.linalg.norm(scale * lora_b @ lora_a) / np.linalg.norm(weight)
        assert 0.15 < ratio < 0.5, (name, ratio)


def test_adapter_for_a_base_with_grouped_kv_heads_has_narrow_kv_projections(tmp_path: Path) -> None:
    adapter = build_tiny_lora(tmp_path / "lora", TinyLoraSpec(base_model=TINY_B_MODEL_SOURCE), TINY_B_SPEC)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    head_dim = TINY_B_SPEC.hidden_size // TINY_B_SPEC.num_heads
    k_b = tensors[f"{PEFT_PREFIX}model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert k_b.shape == (TINY_B_SPEC.num_kv_heads * head_dim, TinyLoraSpec().rank)
    assert f"{PEFT_PREFIX}model.layers.2.self_attn.k_proj.lora_B.weight" not in tensors


def test_unknown_target_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lm_head"):
        build_tiny_lora(tmp_path / "lora", TinyLoraSpec(target_modules=("q_proj", "lm_head")))


# --- resolvers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "home_folder"),
    [
        (TINY_MODEL_SOURCE, "tiny_model_dir"),
        (TINY_B_MODEL_SOURCE, "tiny_b_model_dir"),
        (TINY_WIDE_MODEL_SOURCE, "tiny_wide_model_dir"),
    ],
)
def test_resolve_source_builds_builtin_on_first_use_and_reuses_it(
    tmp_path: Path, source: str, home_folder: str
) -> None:
    home = make_home(tmp_path)
    expected = getattr(home, home_folder)
    assert not expected.exists()
    path = resolve_source(source, home)
    assert path == expected and is_model_dir(path)
    before = file_identities(path)
    assert resolve_source(source, home) == path
    assert file_identities(path) == before


def test_resolved_builtins_are_the_specs_builds(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    tiny = fingerprint_model_dir(resolve_source(TINY_MODEL_SOURCE, home))
    tiny_b = fingerprint_model_dir(resolve_source(TINY_B_MODEL_SOURCE, home))
    assert tiny == fingerprint_model_dir(build_tiny_model(tmp_path / "tiny"))
    assert tiny_b == fingerprint_model_dir(build_tiny_model(tmp_path / "tiny-b", TINY_B_SPEC))
    adapter = fingerprint_adapter_dir(resolve_adapter(TINY_LORA_SOURCE, home))
    assert adapter == fingerprint_adapter_dir(build_tiny_lora(tmp_path / "lora"))


def test_resolve_adapter_builds_builtin_on_first_use_and_reuses_it(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    path = resolve_adapter(TINY_LORA_SOURCE, home)
    assert path == home.tiny_lora_adapter_dir and is_adapter_dir(path)
    before = file_identities(path)
    assert resolve_adapter(TINY_LORA_SOURCE, home) == path
    assert file_identities(path) == before
    assert not home.tiny_model_dir.exists()  # the adapter does not need its base built


def test_local_folders_resolve_to_themselves(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    model = build_tiny_model(tmp_path / "my-model")
    adapter = build_tiny_lora(tmp_path / "my-adapter")
    assert resolve_source(str(model), home) == model
    assert resolve_adapter(str(adapter), home) == adapter
    assert not home.root.exists()  # nothing built for local sources


def test_resolve_model_dir_reads_the_profile_source(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    assert resolve_model_dir(profile_with_source(TINY_MODEL_SOURCE), home) == home.tiny_model_dir
    assert resolve_model_dir(profile_with_source(TINY_B_MODEL_SOURCE), home) == home.tiny_b_model_dir


def test_resolve_model_dir_error_names_profile_and_source(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ModelSourceError, match=r"profile local-cpu: model\.source") as caught:
        resolve_model_dir(profile_with_source(missing), make_home(tmp_path))
    assert missing in str(caught.value)


def _bad_model_sources(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing folder": str(tmp_path / "nowhere"),
        "folder without config.json": str(empty),
        "adapter folder": str(build_tiny_lora(tmp_path / "adapter")),
        "adapter builtin": TINY_LORA_SOURCE,
        "unknown builtin": "builtin:huge",
        "a file": str(_write(tmp_path / "config.json", "{}")),
    }


def _bad_adapter_sources(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_bytes(
        (build_tiny_lora(tmp_path / "ok") / "adapter_config.json").read_bytes()
    )
    no_rank = build_tiny_lora(tmp_path / "no-rank")
    config = json.loads((no_rank / "adapter_config.json").read_text())
    del config["r"]
    _write(no_rank / "adapter_config.json", json.dumps(config))
    not_lora = build_tiny_lora(tmp_path / "not-lora")
    _write(not_lora / "adapter_config.json", json.dumps({**config, "r": 8, "peft_type": "IA3"}))
    broken = build_tiny_lora(tmp_path / "broken")
    _write(broken / "adapter_config.json", "{not json")
    return {
        "missing folder": str(tmp_path / "nowhere"),
        "empty folder": str(empty),
        "model folder": str(build_tiny_model(tmp_path / "model")),
        "model builtin": TINY_MODEL_SOURCE,
        "unknown builtin": "builtin:other-lora",
        "config without weights": str(no_weights),
        "config without r": str(no_rank),
        "not a LoRA": str(not_lora),
        "unreadable config": str(broken),
    }


def test_bad_model_sources_fail_naming_the_source(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    for case, source in _bad_model_sources(tmp_path).items():
        with pytest.raises(ModelSourceError) as caught:
            resolve_source(source, home)
        assert repr(source) in str(caught.value), case
    assert not home.root.exists()


def test_bad_adapter_sources_fail_naming_the_source(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    for case, source in _bad_adapter_sources(tmp_path).items():
        with pytest.raises(ModelSourceError) as caught:
            resolve_adapter(source, home)
        assert repr(source) in str(caught.value), case
    assert not home.root.exists()


def test_kind_mixups_say_what_the_source_is(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    with pytest.raises(ModelSourceError, match="is a LoRA adapter"):
        resolve_source(TINY_LORA_SOURCE, home)
    with pytest.raises(ModelSourceError, match="is a LoRA adapter folder"):
        resolve_source(str(build_tiny_lora(tmp_path / "adapter")), home)
    with pytest.raises(ModelSourceError, match="is a model, not a LoRA adapter"):
        resolve_adapter(TINY_MODEL_SOURCE, home)
    with pytest.raises(ModelSourceError, match="is a model folder"):
        resolve_adapter(str(build_tiny_model(tmp_path / "model")), home)
    with pytest.raises(ModelSourceError, match="builtin:tiny, builtin:tiny-b"):
        resolve_source("builtin:huge", home)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
