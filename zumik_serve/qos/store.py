"""Quota state in Redis: overrides, usage counters, and the per-minute rate window.

    z:{tenant}:quota     hash  quota name → the tenant's own limit ("unlimited" or an integer);
                               a name absent: the profile's default
    z:{tenant}:usage     hash  stored_bytes, objects: what the tenant holds now
    z:{tenant}:charges   hash  stored key → the bytes it was charged (an object record, a turns
                               list, an artifact's content): deleting the key gives exactly these
                               back, and an object record's key one object
    z:{tenant}:rate      hash  start, requests, tokens, prev_requests, prev_tokens: this window's
                               and the previous window's counts (a sliding window counter)
    kv:limit:{scope}           the tenant's kv_bytes override, copied for the engines' Redis KV
                               tier (``kvstore/tiers/redis_tier.py``), which sees scopes only

All four carry the ``{tenant}`` hash tag of the state keys, so the state store's write scripts
(``state/store.py``) read the override and update usage in the same atomic script that writes
or deletes the data: a refused write leaves nothing, and a crash cannot separate a write from
its count. ``QUOTA_LUA`` is the part of those scripts that checks and charges. The rate window
takes Redis' clock (``TIME``), so gateways with skewed clocks share one window; its admission
(``ADMIT_LUA``) runs on its own or inside a request's release lookup (one round trip for both),
its settlement inside the decision record's save, and a request refused after it was counted
gives its admission back (``RATE_REFUND``): a request refused before it runs is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from kvstore.keys import ScopeId
from kvstore.tiers.redis_tier import scope_limit_key
from profiles.model import QuotaSpec
from zumik_serve.errors import RateLimitExceededError
from zumik_serve.qos.quota import (
    UNLIMITED,
    QuotaOverrides,
    QuotaUsage,
    RateReservation,
    RateSettlement,
    default_text,
    rate_refusal,
    storage_refusal,
)

RATE_WINDOW_S = 60


def quota_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:quota"


def usage_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:usage"


def charges_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:charges"


def rate_key(tenant: str) -> str:
    return f"z:{{{tenant}}}:rate"


def quota_keys(tenant: str) -> list[str]:
    """The three keys ``QUOTA_LUA`` expects, in its order (after a script's own keys)."""
    return [usage_key(tenant), quota_key(tenant), charges_key(tenant)]


def quota_lua(spec: QuotaSpec, first_key: int) -> str:
    """Lua functions a write script starts with; its keys ``first_key`` .. ``first_key + 2``
    are ``quota_keys(tenant)``. The profile's defaults are part of the script's text (one
    script per profile), so a script's own ARGV layout stays its own.

    ``zq_fits(objects, bytes)`` and ``zq_turns_fit(head, adding)`` return nil when the write
    fits, else the refusal ``{'quota', name, limit, used, requested}`` to return at once (before
    anything is written). ``zq_charge(key, objects, bytes)`` counts a write of ``key``.
    """
    defaults = {
        "{objects}": default_text(spec.objects),
        "{stored_bytes}": default_text(spec.stored_bytes),
        "{session_turns}": default_text(spec.session_turns),
    }
    source = _QUOTA_LUA.replace("{usage}", f"KEYS[{first_key}]")
    source = source.replace("{override}", f"KEYS[{first_key + 1}]").replace(
        "{charges}", f"KEYS[{first_key + 2}]"
    )
    for name, value in defaults.items():
        source = source.replace(name, value)
    return source.replace("{unlimited}", UNLIMITED)


_QUOTA_LUA = """
local function zq_limit(name, default)
  local value = redis.call('HGET', {override}, name) or default
  if value == '{unlimited}' then return nil end
  return tonumber(value)
end
local function zq_fits(objects, bytes)
  local wanted = {{'objects', objects, '{objects}'}, {'stored_bytes', bytes, '{stored_bytes}'}}
  for _, check in ipairs(wanted) do
    if check[2] > 0 then
      local limit = zq_limit(check[1], check[3])
      local used = tonumber(redis.call('HGET', {usage}, check[1]) or '0')
      if limit and used + check[2] > limit then
        return {'quota', check[1], tostring(limit), tostring(used), tostring(check[2])}
      end
    end
  end
  return nil
end
local function zq_turns_fit(head, adding)
  local limit = zq_limit('session_turns', '{session_turns}')
  if limit and head + adding > limit then
    return {'quota', 'session_turns', tostring(limit), tostring(head), tostring(adding)}
  end
  return nil
end
local function zq_charge(key, objects, bytes)
  if objects ~= 0 then redis.call('HINCRBY', {usage}, 'objects', objects) end
  if bytes ~= 0 then
    redis.call('HINCRBY', {usage}, 'stored_bytes', bytes)
    redis.call('HINCRBY', {charges}, key, bytes)
  end
end
"""

# KEYS: usage, charges, then the keys to delete. ARGV: the prefix of the tenant's object keys.
# Each deleted key that was charged gives its bytes back (and an object record one object).
DELETE_CHARGED = """
local removed = 0
for index = 3, #KEYS do
  local key = KEYS[index]
  local charged = redis.call('HGET', KEYS[2], key)
  if charged then
    redis.call('HINCRBY', KEYS[1], 'stored_bytes', -tonumber(charged))
    if string.sub(key, 1, #ARGV[1]) == ARGV[1] then redis.call('HINCRBY', KEYS[1], 'objects', -1) end
    redis.call('HDEL', KEYS[2], key)
  end
  removed = removed + redis.call('UNLINK', key)
end
return removed
"""

# A Lua function a script starts with: ``zq_admit(rate, override, scope_limit, args, first)``
# counts a request in the tenant's window; ``args[first]`` .. ``args[first + 4]`` are
# ``RateAdmission.args`` (default requests/min, default tokens/min, requests, tokens, window).
# The tenant's kv_bytes override is published to the scope's limit key first (written only when
# it changed), where the engines' Redis tier reads it. Returns {"ok", window start} | {"rate",
# name, limit, used, requested, retry_after_s or -1}; nothing is counted on a refusal. The
# release lookup runs it too (``routing/store.py``), so a request's reads and its admission can
# be one round trip.
ADMIT_LUA = """
local function zq_admit(rate, override, scope_limit, args, first)
  local kv_limit = redis.call('HGET', override, 'kv_bytes')
  if kv_limit ~= redis.call('GET', scope_limit) then
    if kv_limit then redis.call('SET', scope_limit, kv_limit) else redis.call('DEL', scope_limit) end
  end
  local function zq_limit(name, default)
    local value = redis.call('HGET', override, name) or default
    if value == 'unlimited' then return nil end
    return tonumber(value)
  end
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local window = tonumber(args[first + 4])
  local start = math.floor(now / window) * window
  local state = redis.call('HMGET', rate, 'start', 'requests', 'tokens', 'prev_requests', 'prev_tokens')
  local was = tonumber(state[1]) or start
  local cur = {tonumber(state[2]) or 0, tonumber(state[3]) or 0}
  local prev = {tonumber(state[4]) or 0, tonumber(state[5]) or 0}
  if was ~= start then
    if was == start - window then prev = cur else prev = {0, 0} end
    cur = {0, 0}
  end
  local elapsed = now - start
  local weight = 1 - elapsed / window
  local names = {'requests_per_minute', 'tokens_per_minute'}
  for index = 1, 2 do
    local amount = tonumber(args[first + index + 1])
    local limit = zq_limit(names[index], args[first + index - 1])
    if limit and amount > 0 then
      local used = prev[index] * weight + cur[index]
      if used + amount > limit then
        local wait = -1
        if amount <= limit then
          if cur[index] + amount <= limit then
            wait = window * (1 - (limit - cur[index] - amount) / prev[index]) - elapsed
          else
            wait = (window - elapsed) + window * (1 - (limit - amount) / cur[index])
          end
          wait = math.max(1, math.ceil(wait))
        end
        return {'rate', names[index], tostring(limit), tostring(math.floor(used)), tostring(amount),
          tostring(wait)}
      end
    end
  end
  redis.call('HSET', rate, 'start', start, 'requests', cur[1] + tonumber(args[first + 2]),
    'tokens', cur[2] + tonumber(args[first + 3]), 'prev_requests', prev[1], 'prev_tokens', prev[2])
  redis.call('EXPIRE', rate, 2 * window)
  return {'ok', tostring(start)}
end
"""

# KEYS: ``RateAdmission.keys``. ARGV: ``RateAdmission.args``.
RATE_ADMIT = (
    ADMIT_LUA
    + """
return zq_admit(KEYS[1], KEYS[2], KEYS[3], ARGV, 1)
"""
)

# KEYS: rate. ARGV: the window start of an admission, its requests, its tokens, window. Takes an
# admission back (a request refused after it was counted, ``RedisQuotaStore.refund``): the
# counts of the window it was counted in (now the current or the previous one) drop by its
# amounts; nothing when that window is gone.
RATE_REFUND = """
local current = tonumber(redis.call('HGET', KEYS[1], 'start') or '-1')
local start, window = tonumber(ARGV[1]), tonumber(ARGV[4])
local fields = nil
if current == start then fields = {'requests', 'tokens'} end
if current == start + window then fields = {'prev_requests', 'prev_tokens'} end
if fields then
  for index = 1, 2 do
    local value = tonumber(redis.call('HGET', KEYS[1], fields[index]) or '0') - tonumber(ARGV[index + 1])
    redis.call('HSET', KEYS[1], fields[index], math.max(0, value))
  end
end
return 0
"""

# A Lua function a script starts with: ``zq_settle(rate, start, correction, window)`` moves the
# token count of the window that began at ``start`` (now the current or the previous one) by
# ``correction``. The decision record's save runs it too (``routing/store.py``), so a whole
# answer's record and its settlement are one write.
SETTLE_LUA = """
local function zq_settle(rate, start, correction, window)
  local current = tonumber(redis.call('HGET', rate, 'start') or '-1')
  local field = nil
  if current == start then field = 'tokens' end
  if current == start + window then field = 'prev_tokens' end
  if field then
    local value = tonumber(redis.call('HGET', rate, field) or '0') + correction
    redis.call('HSET', rate, field, math.max(0, value))
  end
end
"""

# KEYS: rate. ARGV: ``settle_args``.
RATE_SETTLE = (
    SETTLE_LUA
    + """
zq_settle(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return 0
"""
)


def settle_args(settlement: RateSettlement) -> list[int]:
    """``zq_settle``'s arguments after the rate key: window start, correction, window."""
    return [settlement.window_start, settlement.correction, RATE_WINDOW_S]


@dataclass(frozen=True)
class RateAdmission:
    """One request's rate admission, ready to run: ``zq_admit``'s keys (the tenant's rate and
    overrides, the request's KV scope's limit key) and arguments, for ``RATE_ADMIT`` or inside
    another script (the release lookup's, ``routing/store.py``)."""

    keys: tuple[str, str, str]
    args: tuple[str | int, ...]
    tokens: int

    def outcome(self, reply: list[Any]) -> RateReservation | RateLimitExceededError:
        """What ``zq_admit`` answered: the reservation, or the refusal to raise (nothing was
        counted then)."""
        fields = [_text(value) for value in reply]
        if fields[0] == "ok":
            return RateReservation(window_start=int(fields[1]), tokens=self.tokens)
        wait = int(fields[5])
        return rate_refusal(
            fields[1], int(fields[2]), int(fields[3]), int(fields[4]), wait if wait > 0 else None
        )


class RedisQuotaStore:
    def __init__(self, client: aioredis.Redis, spec: QuotaSpec) -> None:
        self._redis = client
        self.spec = spec
        self._rate_admit = client.register_script(RATE_ADMIT)
        self._rate_settle = client.register_script(RATE_SETTLE)
        self._rate_refund = client.register_script(RATE_REFUND)

    async def overrides(self, tenant: str) -> QuotaOverrides:
        fields = await self._redis.hgetall(quota_key(tenant))
        return QuotaOverrides.from_stored({_text(k): _text(v) for k, v in fields.items()})

    async def set_overrides(
        self, tenant: str, changes: QuotaOverrides, *, reset: frozenset[str] = frozenset()
    ) -> None:
        """Set the fields ``changes`` gives and drop those named in ``reset`` (back to the
        profile's default), in one step."""
        async with self._redis.pipeline(transaction=True) as pipe:
            if reset:
                pipe.hdel(quota_key(tenant), *sorted(reset))
            stored = changes.stored()
            if stored:
                pipe.hset(quota_key(tenant), mapping=stored)  # type: ignore[arg-type]
            await pipe.execute()

    async def usage(self, tenant: str) -> QuotaUsage:
        fields = await self._redis.hmget(usage_key(tenant), ["stored_bytes", "objects"])
        stored_bytes, objects = (int(value or 0) for value in fields)
        return QuotaUsage(stored_bytes=stored_bytes, objects=objects)

    def rate_admission(self, tenant: str, *, tokens: int, scope: ScopeId) -> RateAdmission:
        """The admission of one request and ``tokens`` reserved for it in the tenant's window.
        ``scope``: the request's KV cache scope, where the tenant's kv_bytes override is
        published for the engines."""
        args = (
            default_text(self.spec.requests_per_minute), default_text(self.spec.tokens_per_minute),
            1, tokens, RATE_WINDOW_S,
        )  # fmt: skip
        return RateAdmission((rate_key(tenant), quota_key(tenant), scope_limit_key(scope)), args, tokens)

    async def admit_rate(self, tenant: str, *, tokens: int, scope: ScopeId) -> RateReservation:
        """Count one request and ``tokens`` reserved for it in the tenant's window
        (``rate_admission``); RateLimitExceededError (429) when either per-minute limit would be
        passed (then nothing is counted)."""
        admission = self.rate_admission(tenant, tokens=tokens, scope=scope)
        reply = await self._rate_admit(keys=list(admission.keys), args=list(admission.args))
        outcome = admission.outcome(reply)
        if isinstance(outcome, RateLimitExceededError):
            raise outcome
        return outcome

    async def refund(self, tenant: str, reservation: RateReservation) -> None:
        """Take an admission back: its request was refused after it was counted (``RATE_REFUND``)."""
        args = [reservation.window_start, 1, reservation.tokens, RATE_WINDOW_S]
        await self._rate_refund(keys=[rate_key(tenant)], args=args)

    async def settle(self, tenant: str, settlement: RateSettlement) -> None:
        """Replace a reservation by the tokens the request used (``RateSettlement.of``)."""
        await self._rate_settle(keys=[rate_key(tenant)], args=settle_args(settlement))


def raise_refusal(reply: list[Any], *, session: str | None = None) -> None:
    """Raise the QuotaExceededError a write script's reply holds (``{'quota', ...}``); nothing
    for any other reply."""
    if reply and _text(reply[0]) == "quota":
        name, limit, used, requested = (_text(value) for value in reply[1:5])
        raise storage_refusal(name, int(limit), int(used), int(requested), session=session)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
