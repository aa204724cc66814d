"""Handles: typed by prefix, 128 random bits, and derived ones need the server's secret."""

from __future__ import annotations

from zumik_serve.ids import HandleKind, derive_handle, handle_kind, new_handle


def test_new_handles_are_typed_and_unique() -> None:
    handles = {new_handle(HandleKind.SESSION) for _ in range(2000)}
    assert len(handles) == 2000
    for handle in handles:
        assert handle.startswith("ses_") and len(handle) == 4 + 26
        assert handle_kind(handle) is HandleKind.SESSION


def test_handle_kind_rejects_malformed_and_unknown_prefixes() -> None:
    for bad in ("", "ses_", "ses_short", "xyz_" + "a" * 26, "ses-" + "a" * 26, "ses_" + "!" * 26, "art"):
        assert handle_kind(bad) is None


def test_derived_handles_are_deterministic_and_secret_bound() -> None:
    secret, other = b"s" * 32, b"t" * 32
    first = derive_handle(HandleKind.ARTIFACT, secret, "ten_a", "digest", "0")
    assert first == derive_handle(HandleKind.ARTIFACT, secret, "ten_a", "digest", "0")
    assert handle_kind(first) is HandleKind.ARTIFACT
    assert first != derive_handle(HandleKind.ARTIFACT, other, "ten_a", "digest", "0")
    assert first != derive_handle(HandleKind.ARTIFACT, secret, "ten_b", "digest", "0")
    assert first != derive_handle(HandleKind.ARTIFACT, secret, "ten_a", "digest", "1")
