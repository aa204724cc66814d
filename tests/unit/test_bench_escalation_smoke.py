"""Smoke of the escalation arm of ``zumik bench routing`` (in process, no Ray), through the CLI.

Invariants held here:
- managed-only never uses BYOC and BYOC-only always does, on the same prompts;
- Zumik's choice starts on the managed route and moves a family to BYOC only once the ledger's
  evidence for it reaches the threshold (the first escalated decision records evidence at or
  past it, and a priced verdict in BYOC's favour);
- its cost per 1k requests is at most the cheaper single route's plus 5%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zumik_serve.bench.escalation import THRESHOLD_TOKENS
from zumik_serve.cli import main


def test_escalation_arm_moves_to_byoc_only_past_the_threshold_and_costs_at_most_the_cheaper_plus_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZUMIK_BENCH_MANAGED_KEY", "sk-bench")
    argv = ["bench", "routing", "--escalation-only", "--escalation-requests", "60", "--seed", "0"]
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "escalation.json").read_text()) == summary
    arms = {arm["arm"]: arm for arm in summary["arms"]}
    assert arms["managed-only"]["byoc_requests"] == 0 and arms["byoc-only"]["byoc_requests"] == 60
    zumik = arms["zumik"]
    assert zumik["first_escalated"] is not None and zumik["first_escalated"] > 0
    evidence = zumik["evidence_at_escalation"]
    assert evidence["level"] == "reported" and evidence["reused_tokens_in_window"] >= THRESHOLD_TOKENS
    assert evidence["verdict"].startswith("met: ") and " < managed " in evidence["verdict"]
    cheaper = min(arms["managed-only"]["cost_pusd"], arms["byoc-only"]["cost_pusd"])
    assert zumik["cost_pusd"] <= cheaper * 105 // 100
    assert summary["within_5_percent"] is True
