"""``_all``: the pipeline's steps run side by side (``pipeline/pipeline.py``).

Invariants held here:
- every step runs, beside the others, and its result comes back in the order given (None for a
  step not taken);
- every step is waited for before a failure is raised, and the first failure in the order given
  is the one raised (a later step's never hides an earlier one's);
- a step never outlives the call that ran it: cancelling the call cancels every step still
  running;
- the last step runs in the caller's own task (a lone step costs no task).
"""

from __future__ import annotations

import asyncio

import pytest

from zumik_serve.pipeline.pipeline import _all


async def _after(delay_s: float, value: object, finished: list[object]) -> object:
    await asyncio.sleep(delay_s)
    finished.append(value)
    return value


async def _failing(delay_s: float, error: Exception, finished: list[object]) -> None:
    await asyncio.sleep(delay_s)
    finished.append(error)
    raise error


async def test_steps_run_side_by_side_and_answer_in_the_order_given() -> None:
    finished: list[object] = []
    results = await _all(
        _after(0.05, "a", finished), None, _after(0.01, "b", finished), _after(0.03, "c", finished)
    )
    assert results == ("a", None, "b", "c")
    assert finished == ["b", "c", "a"]  # side by side: each finished on its own time, not in turn


async def test_no_step_taken_answers_nones() -> None:
    assert await _all(None, None) == (None, None)
    assert await _all() == ()


async def test_the_first_failure_in_the_order_given_is_raised_after_every_step_is_done() -> None:
    finished: list[object] = []
    first, second = ValueError("first"), KeyError("second")
    with pytest.raises(ValueError) as raised:
        await _all(
            _after(0.04, "slow", finished), _failing(0.02, first, finished), _failing(0.0, second, finished)
        )
    assert raised.value is first
    assert finished == [second, first, "slow"]


async def test_the_last_step_failing_is_raised_once_the_others_are_done() -> None:
    finished: list[object] = []
    error = RuntimeError("last")
    with pytest.raises(RuntimeError):
        await _all(_after(0.02, "a", finished), _failing(0.0, error, finished))
    assert finished == [error, "a"]


async def test_cancelling_the_call_cancels_every_step_still_running() -> None:
    cancelled: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    call = asyncio.ensure_future(_all(forever("beside"), None, forever("last")))
    await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0)  # the steps beside the last see their cancellation
    assert sorted(cancelled) == ["beside", "last"]


async def test_the_last_step_runs_in_the_callers_task() -> None:
    async def current() -> asyncio.Task[object] | None:
        return asyncio.current_task()

    caller = asyncio.current_task()
    beside, last = await _all(current(), current())
    assert last is caller
    assert beside is not caller
    (lone,) = await _all(current())
    assert lone is caller
