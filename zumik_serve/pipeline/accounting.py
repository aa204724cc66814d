"""RequestAccounting: one request's reuse figures, kept off the request's critical path.

    decided ──► opportunity lookup starts (the prefix's blocks in the tenant scope's index)
                 │ runs while the engine works
    answered ─► figures (opportunity + capture, each with its evidence level)
    sent ─────► ledger write and metrics, in the background (``sent()``: the surface has sent
                the answer; at the latest ``LEDGER_WAIT_S`` after the figures), so that their
                Redis round trip and CPU never delay the answer they count

Accounting never fails a request: a store outage skips it (and the log says so). A drain
(``api/drain.py``) waits for the writes still under way (``settle``). A tenant that
keeps no accounting gets capture figures only (opportunity ``unknown``) and no ledger entry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from zumik_serve.errors import StoreUnavailableError
from zumik_serve.reuse.figures import ReuseFigures
from zumik_serve.reuse.service import ReuseService
from zumik_serve.routing.dispatch import Decision, EngineRun
from zumik_serve.store.client import guard

logger = logging.getLogger("ray.serve")

_BACKGROUND: set[asyncio.Task[None]] = set()
_WAITING: set[RequestAccounting] = set()  # figures known, the answer not yet said sent
LEDGER_WAIT_S = 1.0  # the longest a ledger write waits for its answer to be sent


class RequestAccounting:
    def __init__(self, reuse: ReuseService | None, decision: Decision) -> None:
        """``reuse`` None: the tenant keeps no reuse accounting."""
        self._reuse = reuse
        self._family = decision.family  # the ledger counts the prompt's prefix family too
        self._keys = decision.prefix_keys
        self._text_is_prompt = decision.text_is_prompt
        self._lookup: asyncio.Task[int] | None = None
        self._seen_blocks: int | None = None
        self._published: int | None = None  # the figure a stream's headers gave, kept for its ledger
        self._skipped = False
        self._ledger: Callable[[], Coroutine[Any, Any, None]] | None = None  # written once sent
        self._ledger_timer: asyncio.TimerHandle | None = None
        self._sent = False
        if reuse is not None:
            lookup = guard(reuse.seen_blocks(decision.scope, decision.prefix_keys), what="reuse index")
            self._lookup = asyncio.ensure_future(_after_a_step(lookup))
            self._lookup.add_done_callback(_retrieve)  # a failed request never awaits it

    async def opportunity_tokens(self, prompt_tokens: int = 0) -> int | None:
        """The prefix's opportunity, given the ``prompt_tokens`` the engine counted (0: not
        known yet, as when a stream's headers go out); None when the tenant keeps no accounting
        or the lookup failed (then ``skipped`` is True). Once a figure is published
        (``publish_opportunity``), it is this request's figure."""
        if self._published is not None:
            return self._published
        if self._lookup is None or self._skipped or self._reuse is None:
            return None
        if self._seen_blocks is None:
            try:
                self._seen_blocks = await self._lookup
            except StoreUnavailableError:
                logger.warning("zumik: reuse accounting skipped (Redis unavailable)")
                self._skipped = True
                return None
        counted = prompt_tokens if self._text_is_prompt else 0  # else tools or media weigh in it
        return self._reuse.opportunity_tokens(self._keys, self._seen_blocks, counted)

    async def publish_opportunity(self) -> int | None:
        """The figure a stream's headers give, before the engine has counted the prompt's
        tokens: the one its ledger entry keeps too, so that the two agree."""
        self._published = await self.opportunity_tokens()
        return self._published

    @property
    def skipped(self) -> bool:
        return self._skipped

    async def figures(
        self, run: EngineRun, usage: Mapping[str, Any] | None, *, tenant: str, snapshot: str | None
    ) -> ReuseFigures | None:
        """This request's figures, recorded in the ledger after the answer; None when the
        accounting was skipped (a store outage)."""
        usage = usage or {}
        opportunity = await self.opportunity_tokens(int(usage.get("prompt_tokens") or 0))
        if self._skipped:
            return None
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        figures = ReuseFigures.of(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            opportunity_tokens=opportunity,  # None: the tenant keeps no accounting
            route_kind=run.route_kind,
            cached_tokens=int(cached) if cached is not None else None,
            kv_report=run.kv_report(),
        )
        if self._reuse is not None:  # telemetry, not state: written after the answer is sent
            family = self._family or None
            self._ledger = functools.partial(
                self._reuse.record, tenant, figures, snapshot=snapshot, route=run.route_name, family=family
            )
            if self._sent:
                self.sent()
            else:  # a surface that never says so (a failure after the figures) still writes
                self._ledger_timer = asyncio.get_running_loop().call_later(LEDGER_WAIT_S, self.sent)
                _WAITING.add(self)
        return figures

    def sent(self) -> None:
        """The answer has gone out (or is known never to): the ledger write starts now, or as
        soon as the figures are known."""
        self._sent = True
        _WAITING.discard(self)
        if self._ledger_timer is not None:
            self._ledger_timer.cancel()
            self._ledger_timer = None
        if self._ledger is not None:
            write, self._ledger = self._ledger, None
            in_background(write())


async def _after_a_step(lookup: Coroutine[Any, Any, int]) -> int:
    """``lookup``, one loop step late: the engine call started meanwhile goes first, and the
    prompt keys its decision did not read are computed after the call is handed on
    (``routing/prompt_keys.py``), not by the lookup before it."""
    await asyncio.sleep(0)
    return await lookup


def _retrieve(task: asyncio.Task[int]) -> None:
    if not task.cancelled():
        task.exception()


async def settle(timeout_s: float) -> int:
    """Start every ledger write still waiting for its answer, then wait up to ``timeout_s`` for
    the writes under way (a drain, before the process stops: they would be lost with it); how
    many were still unfinished then."""
    for accounting in list(_WAITING):
        accounting.sent()
    if _BACKGROUND:
        await asyncio.wait(set(_BACKGROUND), timeout=max(0.0, timeout_s))
    return len(_BACKGROUND)


def in_background(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` after the answer; failures are logged, never raised."""

    async def guarded() -> None:
        try:
            await guard(work, what="reuse ledger")
        except StoreUnavailableError:
            logger.warning("zumik: reuse ledger not updated (Redis unavailable)")
        except Exception:
            logger.exception("zumik: reuse ledger not updated")

    task = asyncio.create_task(guarded())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
