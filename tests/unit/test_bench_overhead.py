"""`zumik bench overhead`'s pieces that need no server: the prompt shapes, the direct arms'
command lines, Server-Timing parsing, and the differences and goals computed from answers.

Invariants: every prompt of a shape has the same token count (whatever the arm and request),
unique prompts never repeat, repeated ones always do, and no two arms share a prompt (so no arm
restores another's blocks from the shared tiers); a difference is minuend minus subtrahend.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from profiles import load_builtin
from zumik_serve.bench.overhead import direct_vllm_command, tree_state
from zumik_serve.bench.overhead_measure import (
    DEFAULT_SHAPES,
    Prompts,
    Shape,
    _Answer,
    _result,
    accounting_summary,
    parse_selection,
    parse_server_timing,
)
from zumik_serve.engines.vllm_args import _parser

PROFILE = load_builtin("local-cpu")


@pytest.mark.parametrize("shape", [*DEFAULT_SHAPES, Shape.ACCOUNTING])
def test_every_prompt_of_a_shape_has_the_same_token_count(tiny_model_dir: Path, shape: Shape) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    counts = {
        len(tokenizer.encode(Prompts(run_id=run).prompt(shape, arm, n)).ids)
        for run in (0, 123456, 999999)
        for arm in range(4)
        for n in (0, 7, 123456, 999999)
    }
    assert len(counts) == 1, counts
    if shape is not Shape.ACCOUNTING:
        assert 60 <= counts.pop() <= 200  # about 70 tokens; shared-prefix adds ~110 of prefix


def test_prompt_shapes_repeat_exactly_as_named() -> None:
    prompts = Prompts(run_id=42)
    unique = [prompts.prompt(Shape.UNIQUE, arm, n) for arm in range(4) for n in range(50)]
    assert len(set(unique)) == len(unique)
    assert {prompts.prompt(Shape.REPEATED, 1, n) for n in range(50)} == {prompts.prompt(Shape.REPEATED, 1, 0)}
    repeated_by_arm = {prompts.prompt(Shape.REPEATED, arm, 0) for arm in range(4)}
    assert len(repeated_by_arm) == 4
    shared = [prompts.prompt(Shape.SHARED_PREFIX, 2, n) for n in range(50)]
    assert len(set(shared)) == 50
    common = min(len(p) for p in shared)
    while len({p[:common] for p in shared}) > 1:
        common -= 1
    assert common > 200  # the shared system prompt, then the request's own suffix
    assert Prompts(run_id=1).prompt(Shape.UNIQUE, 0, 5) != Prompts(run_id=2).prompt(Shape.UNIQUE, 0, 5)


def test_prompt_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="arm_index"):
        Prompts(run_id=1).prompt(Shape.UNIQUE, 10, 0)


def _server_args(command: list[str]) -> list[str]:
    start = command.index("vllm.entrypoints.openai.api_server") + 1
    return command[start:]


def test_direct_arms_command_lines_pass_vllms_parser() -> None:
    parser, _, _ = _parser()
    kv = {"kv_connector": "ZumikKVConnector", "kv_role": "kv_both"}
    defaults = direct_vllm_command("vllm-defaults", PROFILE, Path("/m"), 8001)
    settings = direct_vllm_command("vllm", PROFILE, Path("/m"), 8002, kv)
    connector = direct_vllm_command("vllm-connector", PROFILE, Path("/m"), 8003, kv)
    parsed = {name: parser.parse_args(_server_args(cmd)) for name, cmd in
              (("defaults", defaults), ("vllm", settings), ("connector", connector))}  # fmt: skip
    assert parsed["vllm"].block_size == parsed["connector"].block_size == PROFILE.engine.block_size
    assert parsed["defaults"].block_size is None  # vLLM chooses
    assert parsed["defaults"].enforce_eager is not True
    assert parsed["vllm"].enforce_eager is True
    assert parsed["vllm"].kv_transfer_config is None  # only the connector arm has it
    assert parsed["connector"].kv_transfer_config is not None
    assert "--kv-transfer-config" not in defaults and "--kv-transfer-config" not in settings


def test_direct_arm_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="kv_tiers on"):
        direct_vllm_command("vllm-connector", PROFILE, Path("/m"), 8003, None)
    with pytest.raises(ValueError, match="not a direct arm"):
        direct_vllm_command("zumik", PROFILE, Path("/m"), 8003)


def test_selection_names_the_unknown_arm_or_shape() -> None:
    assert parse_selection(["vllm", "zumik"], ["unique"]) == (["vllm", "zumik"], [Shape.UNIQUE])
    with pytest.raises(ValueError, match="unknown arm 'vlm'.*vllm-defaults"):
        parse_selection(["vlm"], ["unique"])
    with pytest.raises(ValueError, match="unknown shape 'uniq'.*shared-prefix"):
        parse_selection(["vllm"], ["uniq"])
    with pytest.raises(ValueError, match="needs the vllm arm"):
        parse_selection(["zumik"], ["unique"])


def test_parse_server_timing() -> None:
    value = (
        'queue;dur=0.01, decide;dur=0.42, first-output;dur=30.5, restore;dur=1.5;desc="host 32", '
        "record;dur=2.1"
    )
    assert parse_server_timing(value) == {
        "queue": 0.01, "decide": 0.42, "first-output": 30.5, "restore": 1.5, "record": 2.1
    }  # fmt: skip
    assert parse_server_timing("") == {}
    assert parse_server_timing("x;desc=nodur, y;dur=bad") == {}


def test_differences_and_goals_from_answers() -> None:
    def answers(values: list[float], cached: int | None) -> list[_Answer]:
        return [_Answer(v, 70, cached, {"record": 2.0} if cached == 64 else {}) for v in values]

    shape = Shape.UNIQUE.value
    got = {
        shape: {
            "vllm": answers([10, 10, 10, 10], 0),
            "vllm-connector": answers([10.2, 10.2, 10.2, 10.2], 0),
            "zumik": answers([12, 12, 13, 13], 64),
        }
    }
    per_round = {shape: {"vllm": [10.0, 10.0], "vllm-connector": [10.2, 10.2], "zumik": [12.0, 13.0]}}
    result = _result(got, per_round, rounds=2, requests=2, arms=["vllm", "vllm-connector", "zumik"],
                     shapes=[Shape.UNIQUE])  # fmt: skip
    zumik = result.deltas[shape]["zumik-vllm"]
    assert (zumik.p50_ms, zumik.p99_ms, zumik.per_round_ms, zumik.round_median_ms) == (
        3.0,
        3.0,
        [2.0, 3.0],
        2.5,
    )
    assert result.deltas[shape]["vllm-connector-vllm"].p50_ms == pytest.approx(0.2)
    assert set(result.deltas[shape]) == {"zumik-vllm", "vllm-connector-vllm", "zumik-vllm-connector"}
    assert result.goals()[shape] == {
        "zumik-vllm p50 <= 1.0 ms": False, "zumik-vllm p99 <= 3.0 ms": True,
        "vllm-connector-vllm p50 <= 0.3 ms": True,
    }  # fmt: skip
    assert result.server_timing_ms[shape] == {"record": 2.0}
    assert result.cached_tokens[shape] == {"vllm": 0.0, "vllm-connector": 0.0, "zumik": 64.0}
    assert "samples_ms" not in result.summary() and "goals" in result.summary()


@pytest.mark.parametrize(
    ("zumik", "share", "goal"),
    [
        ([11.0, 11.0], 0.1, False),
        ([10.2, 10.4], 0.3333, False),
        ([20.0, 22.0], 0.0091, True),
        ([9.0, 9.5], None, None),
    ],
)
def test_the_accounting_share_is_a_number_or_null_never_nan(
    zumik: list[float], share: float | None, goal: bool | None
) -> None:
    # A short noisy run can put Zumik's arm at or below vLLM's: the accounting's share of a
    # gateway cost that came out non-positive is undefined, written as JSON null (NaN is not
    # JSON, and a NaN share equals nothing, itself included).
    shape = Shape.ACCOUNTING.value
    per_round = {
        shape: {"vllm": [10.0, 10.0], "zumik": zumik, "zumik-no-accounting": [z - 0.1 for z in zumik]}
    }
    got = {shape: {arm: [_Answer(v, 70, 0, {}) for v in values] for arm, values in per_round[shape].items()}}
    result = _result(got, per_round, rounds=2, requests=1, arms=["vllm", "zumik", "zumik-no-accounting"],
                     shapes=[Shape.ACCOUNTING])  # fmt: skip
    summary = accounting_summary(result)
    assert summary["accounting_share_of_added"] == (
        pytest.approx(share, abs=1e-4) if share is not None else None
    )
    assert summary["goal_under_5_percent"] is goal
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary  # strict JSON, round trip equal


def test_tree_state_names_the_commit_and_each_changed_file_whole() -> None:
    repo = Path(__file__).resolve().parents[2]
    state = tree_state()
    assert len(state["commit"]) == 40
    for name in state["changed_files"]:  # in the work tree, or deleted from the commit
        tracked = subprocess.run(["git", "cat-file", "-e", f"HEAD:{name}"], cwd=repo, check=False)
        assert (repo / name).exists() or tracked.returncode == 0, name
