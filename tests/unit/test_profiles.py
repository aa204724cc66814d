"""Profiles: built-ins load; a bad profile fails at load with the field named; fingerprints move
with any change."""

from __future__ import annotations

from pathlib import Path

import pytest

from profiles import ProfileError, builtin_names, load_builtin, load_profile, parse_profile, resolve_profile

VALID = """
name: test-cpu
model: {source: "builtin:tiny", served_name: tiny}
engine: {device: cpu, kv_cache_memory_bytes: 1048576}
"""


def test_every_builtin_profile_loads() -> None:
    assert "local-cpu" in builtin_names()
    for name in builtin_names():
        assert load_builtin(name).name == name


def test_local_cpu_is_tiny_model_one_replica_prefix_caching_explicit_kv() -> None:
    profile = load_builtin("local-cpu")
    assert profile.model.source == "builtin:tiny"
    assert profile.engine.num_replicas == 1
    assert profile.engine.enable_prefix_caching is True
    assert profile.engine.kv_cache_memory_bytes and profile.engine.kv_cache_memory_bytes > 0
    assert profile.engine.block_size % 32 == 0


def test_unknown_field_fails_with_field_named() -> None:
    with pytest.raises(ProfileError, match=r"engine\.block_sise: Extra inputs are not permitted"):
        parse_profile(VALID.replace("device: cpu", "device: cpu, block_sise: 16"), source="t")


def test_wrong_type_fails_with_field_named() -> None:
    with pytest.raises(ProfileError, match=r"engine\.max_model_len"):
        parse_profile(VALID.replace("device: cpu", "device: cpu, max_model_len: lots"), source="t")


def test_cpu_profile_without_kv_size_fails() -> None:
    with pytest.raises(ProfileError, match="kv_cache_memory_bytes is required"):
        parse_profile(VALID.replace(", kv_cache_memory_bytes: 1048576", ""), source="t")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ProfileError, match=r"model: Field required"):
        parse_profile("name: x\nengine: {kv_cache_memory_bytes: 1}\n", source="t")


def test_not_a_mapping_and_bad_yaml_fail_clearly() -> None:
    with pytest.raises(ProfileError, match="mapping"):
        parse_profile("- a\n- b\n", source="t")
    with pytest.raises(ProfileError, match="not valid YAML"):
        parse_profile("name: [unclosed", source="t")


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="local-cpu"):
        load_builtin("nope")


def test_profile_file_loads_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(VALID)
    assert resolve_profile(str(path)).name == "test-cpu"
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(tmp_path / "absent.yaml")


def test_fingerprint_is_stable_and_moves_with_any_field() -> None:
    base = parse_profile(VALID, source="t")
    assert base.fingerprint() == parse_profile(VALID, source="t").fingerprint()
    changed = parse_profile(VALID.replace("1048576", "2097152"), source="t")
    assert changed.fingerprint() != base.fingerprint()


def test_profiles_are_frozen() -> None:
    profile = load_builtin("local-cpu")
    with pytest.raises(Exception, match="frozen"):
        profile.name = "other"  # type: ignore[misc]


def test_cuda_profile_must_size_its_kv_cache() -> None:
    cuda = VALID.replace("device: cpu, kv_cache_memory_bytes: 1048576", "device: cuda")
    with pytest.raises(ProfileError, match="gpu_memory_utilization"):
        parse_profile(cuda, source="t")
    assert parse_profile(
        cuda.replace("device: cuda", "device: cuda, gpu_memory_utilization: 0.9"), source="t"
    )
