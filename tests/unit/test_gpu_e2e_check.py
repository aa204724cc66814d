"""The parts of tests/gpu/e2e_check.py that need no GPU: its arguments, the profile of each tier
step, reading the restoring tier from Server-Timing, and the report's checks (a step missing,
failed, or marked ok without its evidence makes the report fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from profiles import load_builtin
from tests.gpu.e2e_check import (
    STEPS,
    TIERS,
    check_report,
    parse_args,
    restored_tiers,
    tiered_profile,
    tiny_cuda_profile,
)


def test_arguments_default_to_the_single_box_gpu_profile() -> None:
    args = parse_args([])
    assert (args.profile, args.tiny, args.out, args.disk_root) == (
        "qwen-small-gpu",
        False,
        Path("gpu-e2e.json"),
        None,
    )
    assert parse_args(["--tiny", "--out", "r.json"]).tiny is True


@pytest.mark.parametrize("argv", [["--tiny", "--profile", "x"], ["--host-bytes", "0"], ["--nope"]])
def test_bad_arguments_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_the_tiny_cuda_profile_is_a_valid_cuda_profile() -> None:
    profile = tiny_cuda_profile()
    assert profile.engine.device.value == "cuda"
    assert profile.model.source == load_builtin("local-cpu").model.source


@pytest.mark.parametrize("only", [None, *TIERS])
def test_each_restore_step_has_exactly_its_tier(only: str | None, tmp_path: Path) -> None:
    profile = tiered_profile(
        load_builtin("qwen-small-gpu"), only=only, disk_root=tmp_path, host_bytes=1 << 20
    )
    tiers = profile.kv_tiers
    on = {"host": tiers.host_capacity_bytes > 0, "redis": tiers.redis, "disk": tiers.disk_root is not None}
    assert tiers.enabled
    assert on == {tier: only in (None, tier) for tier in TIERS}
    if on["disk"]:
        assert tiers.disk_root == str(tmp_path)


def test_an_unknown_tier_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown tier 'ssd'"):
        tiered_profile(load_builtin("local-cpu"), only="ssd", disk_root=Path("/x"), host_bytes=1)


def test_restored_tiers_from_server_timing() -> None:
    header = (
        'queue;dur=0.1, decide;dur=0.4, restore;dur=3.5;desc="disk 96 tokens, 131072 bytes", record;dur=2'
    )
    assert restored_tiers(header) == {"disk": 96}
    both = 'restore;dur=1;desc="host 32 tokens, redis 64 tokens, 3 bytes"'
    assert restored_tiers(both) == {"host": 32, "redis": 64}
    assert restored_tiers("queue;dur=0.1, decide;dur=0.4") == {}


def _passing_report() -> dict[str, Any]:
    details: dict[str, dict[str, Any]] = {
        "repeat": {"second_cached_tokens": 64},
        "purge": {"snapshot_status": 404, "cached_after": 0},
        "receipt": {"intact_exit": 0, "changed_exit": 1},
        **{f"restore-{tier}": {"cached_tokens": 96, "tiers": {tier: 96}} for tier in TIERS},
    }
    return {"steps": [{"name": name, "ok": True, "details": details.get(name, {})} for name in STEPS]}


def test_a_complete_report_passes() -> None:
    assert check_report(_passing_report()) == []


def test_a_missing_or_failed_step_fails_the_report() -> None:
    report = _passing_report()
    report["steps"] = [s for s in report["steps"] if s["name"] != "restore-redis"]
    report["steps"][0].update(ok=False, error="RuntimeError: no CUDA GPU")
    assert check_report(report) == [
        "environment: failed: RuntimeError: no CUDA GPU",
        "restore-redis: did not run",
    ]


def test_a_step_marked_ok_without_its_evidence_fails_the_report() -> None:
    report = _passing_report()
    steps = {s["name"]: s for s in report["steps"]}
    steps["restore-disk"]["details"] = {"cached_tokens": 96, "tiers": {"host": 96}}  # the wrong tier
    steps["receipt"]["details"] = {"intact_exit": 0, "changed_exit": 0}  # a changed receipt verified
    problems = check_report(report)
    assert sorted(p.split(":")[0] for p in problems) == ["receipt", "restore-disk"]
