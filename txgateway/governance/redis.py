"""
The ledger in Redis, shared by every gateway that points at the same
Redis: reserve and settle are Lua scripts (the rules of
L{txgateway.governance.ledger}, one round trip each), batched: a reserve
call goes at once while fewer than L{RESERVES_IN_FLIGHT} are in flight
(settles: one), and what arrives meanwhile goes together in the next.
Each script is atomic in Redis, so calls in flight together cannot race.

Redis slow or away must cost no client an error: every call is bounded by
C{timeout} on the injected clock, and a failure opens a breaker of the
store's own.  While it is open the gateway decides from a ledger in its
memory, seeded with the last budget totals Redis told it, and keeps a
journal of every settle it made; when Redis answers again the journal is
replayed into it.  A settle is applied once (Redis remembers, for two
days, how far into each gateway's journal it applied), so a replay never
counts anything twice, and spend incurred during an outage is never lost (unless
the gateway itself dies before Redis is back: the journal is in memory).
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable, Coroutine

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.governance.interface import TOP_END_USERS, IGovernanceStore, ScopeSpend, Settled, SpendReport
from txgateway.governance.ledger import IN_FLIGHT_RETRY, NANO_BOUND, PASSING_SCOPE, TOKENS_BOUND, Ask, Ledger, Quota, ScopeLimits, Verdict, bounded
from txgateway.governance.periods import day_of, period_end
from txgateway.resilience.guarded import GuardedRedis

__all__ = ["RENEW_LUA", "RESERVE_LUA", "SETTLE_LUA", "SPEND_LUA", "RedisLedgerStore", "connect_ledger"]

KEY_PREFIX = "txgateway:gov:"

#: Shared by the scripts: the names of a scope's keys, trimming a window,
#: and giving back reservations whose expiry has passed.
_COMMON_LUA = """
local P = KEYS[1]
local WINDOW = 60
-- What one call adds to any count is kept within +-1e15 (a NaN or a
-- string is 0): no INCRBY can overflow, whatever a caller sends.
local BOUND = 1e15
local function num(value)
  value = tonumber(value) or 0
  if value ~= value then return 0 end
  return value
end
local function bound(value)
  value = num(value)
  if value > BOUND then return BOUND elseif value < -BOUND then return -BOUND end
  return value
end
local function int(value) return string.format('%d', bound(value)) end
-- The windows a scope uses expire one to two minutes after they were last
-- added to (every write that can make one of their keys calls this): the
-- tokens window's three keys get two minutes again once less than one is
-- left (made anew, the entries' set has none), in one call most times.
local function refresh(s)
  if s.tpm > 0 and redis.call('PTTL', P .. 'tok:' .. s.s) < 60000 then
    for _, kind in ipairs({'tok:', 'tokamt:', 'toksum:'}) do
      redis.call('PEXPIRE', P .. kind .. s.s, 120000)
    end
  end
  if s.rpm > 0 then redis.call('PEXPIRE', P .. 'req:' .. s.s, 120000) end
end
-- Entries trimmed a call at most (a call that finds fewer has found them all).
local TRIM_BATCH = 500
local function trim_tokens(scope, now)
  local z = P .. 'tok:' .. scope
  while true do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', now - WINDOW, 'LIMIT', 0, TRIM_BATCH)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', P .. 'tokamt:' .. scope, unpack(old))
    local sum = 0
    for i = 1, #amounts do sum = sum + num(amounts[i]) end
    redis.call('DECRBY', P .. 'toksum:' .. scope, int(sum))
    redis.call('HDEL', P .. 'tokamt:' .. scope, unpack(old))
    redis.call('ZREM', z, unpack(old))
    if #old < TRIM_BATCH then return end
  end
end
local function trim(scope, now)
  trim_tokens(scope, now)
  redis.call('ZREMRANGEBYSCORE', P .. 'req:' .. scope, '-inf', now - WINDOW)
end
-- Only the windows the scope s has (a window it no longer has expires).
local function trim_windows(s, now)
  if s.tpm > 0 then trim_tokens(s.s, now) end
  if s.rpm > 0 then redis.call('ZREMRANGEBYSCORE', P .. 'req:' .. s.s, '-inf', now - WINDOW) end
end
local function remove_entry(scope, id)
  local amount = redis.call('HGET', P .. 'tokamt:' .. scope, id)
  if amount then
    redis.call('DECRBY', P .. 'toksum:' .. scope, amount)
    redis.call('HDEL', P .. 'tokamt:' .. scope, id)
    redis.call('ZREM', P .. 'tok:' .. scope, id)
  end
end
-- Returns the window's sum after it.
local function add_entry(scope, id, amount, now)
  redis.call('ZADD', P .. 'tok:' .. scope, now, id)
  redis.call('HSET', P .. 'tokamt:' .. scope, id, int(amount))
  return redis.call('INCRBY', P .. 'toksum:' .. scope, int(amount))
end
local function budget_keys(scope, period)
  return P .. 'bud:' .. scope .. ':' .. period, P .. 'resv:' .. scope .. ':' .. period
end
-- A period's counter expires 40 days after it was made (no period is longer
-- than 31): an INCRBY that answers what it added made it (or found 0).
local function count(key, amount, period)
  amount = int(amount)
  if redis.call('INCRBY', key, amount) == tonumber(amount) and period ~= 'total' then
    redis.call('EXPIRE', key, 40 * 86400)
  end
end
local function count_budget(scope, period, committed, reserved)
  local bud, resv = budget_keys(scope, period)
  count(bud, committed, period)
  if reserved ~= 0 then count(resv, reserved, period) end
end
-- A request in flight takes a slot in each of its scopes: a member of the
-- scope's parallel set where it has a limit (ZCARD decides; the score is
-- not read, and 0 is cheap to keep in order), else a count (the operator's view).
local function take_slot(s, id)
  if s.par > 0 then
    redis.call('ZADD', P .. 'par:' .. s.s, 0, id)
    redis.call('EXPIRE', P .. 'par:' .. s.s, 86400)
  elseif redis.call('INCR', P .. 'parn:' .. s.s) == 1 then
    redis.call('EXPIRE', P .. 'parn:' .. s.s, 86400)
  end
end
local function free_slot(s, id)
  if s.par > 0 then
    redis.call('ZREM', P .. 'par:' .. s.s, id)
  elseif redis.call('DECR', P .. 'parn:' .. s.s) <= 0 then
    redis.call('DEL', P .. 'parn:' .. s.s)
  end
end
local function lapse(now)
  local held = P .. 'held'
  local ids = redis.call('ZRANGEBYSCORE', held, '-inf', now, 'LIMIT', 0, 200)
  for _, id in ipairs(ids) do
    local raw = redis.call('GET', P .. 'r:' .. id)
    if raw then
      local ask = cjson.decode(raw)
      ask.cost = math.max(0, bound(ask.cost))
      for _, s in ipairs(ask.scopes) do
        remove_entry(s.s, id)
        redis.call('ZREM', P .. 'req:' .. s.s, id)
        free_slot(s, id)
        count_budget(s.s, s.bk, -ask.cost, -ask.cost)
      end
      redis.call('DEL', P .. 'r:' .. id)
    end
    redis.call('ZREM', held, id)
  end
end
local function newest(key, now)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #last == 0 then return 0 end
  return math.max(0, tonumber(last[2]) + WINDOW - now)
end
"""

#: KEYS[1] the prefix; ARGV[1] now, ARGV[2] the wait said when requests in flight block; ARGV[3...] the
#: asks, one JSON object each: {id, tokens, cost, exp, scopes: [{s, tpm, rpm, bud, bk, par, end}]} (a limit
#: 0: none; bk the budget period's key; end the time it ends, -1: never).  An ask taken is kept as it
#: came (its record: the settle and the lapse read it).  Returns a JSON list of verdicts: {ok, why, scope, after, tq,
#: rq, spent: {scope: committed}, left, flight} (tq/rq: [limit, remaining, reset, used]; left: a budget's, or false).
RESERVE_LUA = _COMMON_LUA + """
local now = tonumber(ARGV[1])
lapse(now)
local verdicts = {}
local ORDER = {budget_exceeded = 1, too_many_parallel = 2, rate_limited = 3, tokens_exceeded = 4}
local IN_FLIGHT = tonumber(ARGV[2])
for n = 1, #ARGV - 2 do
  local raw = ARGV[n + 2]
  local ask = cjson.decode(raw)
  ask.tokens = math.max(0, bound(ask.tokens))
  ask.cost = math.max(0, bound(ask.cost))
  local refusal = nil
  local spent = {}
  local sums = {}
  for _, s in ipairs(ask.scopes) do
    trim_windows(s, now)
    local why, after, left, flight = nil, -1, false, false
    local bud, resv = budget_keys(s.s, s.bk)
    local committed = num(redis.call('GET', bud))
    spent[s.s] = committed
    if s.bud > 0 and committed + ask.cost > s.bud then
      why = 'budget_exceeded'
      left = math.max(0, s.bud - committed)
      if ask.cost > s.bud then
        after = -1
      elseif committed - num(redis.call('GET', resv)) + ask.cost <= s.bud then
        after, flight = IN_FLIGHT, true
      elseif s['end'] >= 0 then
        after = s['end'] - now
      end
    elseif s.par > 0 and redis.call('ZCARD', P .. 'par:' .. s.s) + 1 > s.par then
      why = 'too_many_parallel'
    elseif s.rpm > 0 and redis.call('ZCARD', P .. 'req:' .. s.s) + 1 > s.rpm then
      why = 'rate_limited'
      local count = redis.call('ZCARD', P .. 'req:' .. s.s)
      local entry = redis.call('ZRANGE', P .. 'req:' .. s.s, count - s.rpm, count - s.rpm, 'WITHSCORES')
      after = math.max(0, tonumber(entry[2]) + WINDOW - now)
    elseif s.tpm > 0 and num(redis.call('GET', P .. 'toksum:' .. s.s)) + ask.tokens > s.tpm then
      why = 'tokens_exceeded'
      if ask.tokens <= s.tpm then
        local total = num(redis.call('GET', P .. 'toksum:' .. s.s))
        local entries = redis.call('ZRANGE', P .. 'tok:' .. s.s, 0, -1, 'WITHSCORES')
        local held = 0
        for i = 1, #entries, 2 do
          if redis.call('ZSCORE', P .. 'held', entries[i]) then
            held = held + num(redis.call('HGET', P .. 'tokamt:' .. s.s, entries[i]))
          end
        end
        if total - held + ask.tokens <= s.tpm then
          after, flight = IN_FLIGHT, true
        else
          local excess = total + ask.tokens - s.tpm
          for i = 1, #entries, 2 do
            excess = excess - num(redis.call('HGET', P .. 'tokamt:' .. s.s, entries[i]))
            if excess <= 0 then
              after = math.max(0, tonumber(entries[i + 1]) + WINDOW - now)
              break
            end
          end
        end
      end
    end
    if why and (refusal == nil or ORDER[why] < ORDER[refusal.why]) then
      refusal = {why = why, scope = s.s, after = after, left = left, flight = flight}
    end
  end
  if refusal == nil then
    for _, s in ipairs(ask.scopes) do
      if s.tpm > 0 then sums[s.s] = add_entry(s.s, ask.id, ask.tokens, now) end
      if s.rpm > 0 then redis.call('ZADD', P .. 'req:' .. s.s, now, ask.id) end
      take_slot(s, ask.id)
      count_budget(s.s, s.bk, ask.cost, ask.cost)
      spent[s.s] = spent[s.s] + ask.cost
      refresh(s)
    end
    redis.call('SET', P .. 'r:' .. ask.id, raw, 'EX', math.max(1, math.ceil(ask.exp - now)) + 86400)
    redis.call('ZADD', P .. 'held', ask.exp, ask.id)
  end
  local tq, rq = nil, nil
  for _, s in ipairs(ask.scopes) do
    if s.tpm > 0 then
      local used = sums[s.s] or num(redis.call('GET', P .. 'toksum:' .. s.s))
      local q = {s.tpm, math.max(0, s.tpm - used), newest(P .. 'tok:' .. s.s, now), used}
      if tq == nil or q[2] < tq[2] then tq = q end
    end
    if s.rpm > 0 then
      local used = redis.call('ZCARD', P .. 'req:' .. s.s)
      local q = {s.rpm, math.max(0, s.rpm - used), newest(P .. 'req:' .. s.s, now), used}
      if rq == nil or q[2] < rq[2] then rq = q end
    end
  end
  verdicts[n] = {ok = refusal == nil, why = refusal and refusal.why or false, scope = refusal and refusal.scope or false,
                 after = refusal and refusal.after or -1, tq = tq or false, rq = rq or false, spent = spent,
                 left = refusal and refusal.left or false, flight = refusal and refusal.flight or false}
end
return cjson.encode(verdicts)
"""

#: KEYS[1] the prefix; ARGV[1] now, ARGV[2] the journal the settles come
#: from (one per gateway process), ARGV[3] a JSON list of its settles, in
#: the order it made them: {seq (its place in the journal), id, tokens,
#: cost, day, key, team, scopes: [{s, tpm, rpm, bk (the budget period
#: now)}], models: [[model, prompt, completion, cost]], user (absent:
#: none)}.  Each is applied once: Redis keeps the last place it applied
#: of each journal (two days), and a replayed batch (its answer lost)
#: is skipped.  One whose reservation is not held here (lapsed, or made by
#: a gateway deciding alone while Redis was away) is charged as new spend.
#: Returns how many were applied.
SETTLE_LUA = _COMMON_LUA + """
local now = tonumber(ARGV[1])
lapse(now)
local applied = 0
local placed = P .. 'seq:' .. ARGV[2]
local last = num(redis.call('GET', placed))
-- The day's counts of the batch, summed by field (one HINCRBY a field and batch).
local fields, counts = {}, {}
for _, settle in ipairs(cjson.decode(ARGV[3])) do
  local id = settle.id
  settle.tokens = math.max(0, bound(settle.tokens))
  settle.cost = math.max(0, bound(settle.cost))
  if num(settle.seq) > last then
    last = num(settle.seq)
    applied = applied + 1
    local raw = redis.call('GET', P .. 'r:' .. id)
    if raw then
      local ask = cjson.decode(raw)
      ask.tokens = math.max(0, bound(ask.tokens))
      ask.cost = math.max(0, bound(ask.cost))
      for _, s in ipairs(ask.scopes) do
        if s.tpm > 0 then
          -- An entry older than the window has left it, trimmed yet or not.
          local at = redis.call('ZSCORE', P .. 'tok:' .. s.s, id)
          if not at or tonumber(at) <= now - WINDOW then trim_tokens(s.s, now) end
          local old = redis.call('HGET', P .. 'tokamt:' .. s.s, id)
          if old then
            redis.call('HSET', P .. 'tokamt:' .. s.s, id, int(settle.tokens))
            redis.call('INCRBY', P .. 'toksum:' .. s.s, int(settle.tokens - num(old)))
          elseif settle.tokens > ask.tokens then
            add_entry(s.s, id .. '+', settle.tokens - ask.tokens, now)
            refresh(s)
          end
        end
        free_slot(s, id)
        count_budget(s.s, s.bk, settle.cost - ask.cost, -ask.cost)
      end
      redis.call('DEL', P .. 'r:' .. id)
      redis.call('ZREM', P .. 'held', id)
    else
      for _, s in ipairs(settle.scopes) do
        trim_windows(s, now)
        if s.tpm > 0 and settle.tokens > 0 then
          add_entry(s.s, id .. '+', settle.tokens, now)
          refresh(s)
        end
        count_budget(s.s, s.bk, settle.cost, 0)
      end
    end
    local day = P .. 'day:' .. settle.day
    for position, use in ipairs(settle.models) do
      local field = settle.key .. '|' .. settle.team .. '|' .. use[1] .. '|'
      local summed = fields[day .. ' ' .. field]
      if summed == nil then
        summed = {day, field, 0, 0, 0, 0}
        fields[day .. ' ' .. field] = summed
        counts[#counts + 1] = summed
      end
      summed[3] = summed[3] + bound(use[2])
      summed[4] = summed[4] + bound(use[3])
      summed[5] = summed[5] + bound(use[4])
      if position == 1 then summed[6] = summed[6] + 1 end
    end
    if settle.user then
      -- The end user's spend of the day: ordered by cost, with its counts beside.
      local member = settle.key .. '|' .. settle.user
      local by_cost, user_counts = P .. 'eu:' .. settle.day, P .. 'euc:' .. settle.day
      redis.call('ZINCRBY', by_cost, int(settle.cost), member)
      local prompt, completion = 0, 0
      for _, use in ipairs(settle.models) do
        prompt = prompt + num(use[2])
        completion = completion + num(use[3])
      end
      redis.call('HINCRBY', user_counts, member .. '|p', int(prompt))
      redis.call('HINCRBY', user_counts, member .. '|c', int(completion))
      if redis.call('HINCRBY', user_counts, member .. '|r', 1) == 1 then  -- the end user's first of the day
        redis.call('EXPIRE', by_cost, 40 * 86400)
        redis.call('EXPIRE', user_counts, 40 * 86400)
      end
    end
  end
end
for _, summed in ipairs(counts) do
  local day, field = summed[1], summed[2]
  redis.call('HINCRBY', day, field .. 'p', int(summed[3]))
  redis.call('HINCRBY', day, field .. 'c', int(summed[4]))
  redis.call('HINCRBY', day, field .. 'n', int(summed[5]))
  -- The day's first requests of a key, team and model (the ones that made the day) set its 40 days.
  if summed[6] > 0 and redis.call('HINCRBY', day, field .. 'r', summed[6]) == summed[6] then redis.call('EXPIRE', day, 40 * 86400) end
end
if applied > 0 then redis.call('SET', placed, string.format('%d', last), 'EX', 2 * 86400) end
return applied
"""

#: KEYS[1] the prefix; ARGV[1] the new expiry, ARGV[2...] the ids of
#: reservations still running: each one still held gets the new expiry
#: (never an earlier one).  Returns how many did.
RENEW_LUA = """
local P = KEYS[1]
local expires = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  local current = redis.call('ZSCORE', P .. 'held', ARGV[i])
  if current and tonumber(current) < expires then
    redis.call('ZADD', P .. 'held', 'XX', expires, ARGV[i])
    renewed = renewed + 1
  end
end
return renewed
"""

#: KEYS[1] the prefix; ARGV[1] now, ARGV[2] a JSON list of [scope, budget
#: key, tpm, rpm], ARGV[3] a JSON list of days, ARGV[4] how many end users
#: to name.  Returns {scopes: [[committed, reserved, parallel, tokens in
#: window, requests in window, tokens reset, requests reset]], days:
#: [[day, field, value, ...]], users: [[key|end user, prompt, completion,
#: cost, requests]]} (the users dearest first).
SPEND_LUA = _COMMON_LUA + """
local now = tonumber(ARGV[1])
lapse(now)
local scopes = {}
for n, s in ipairs(cjson.decode(ARGV[2])) do
  trim(s[1], now)
  local bud, resv = budget_keys(s[1], s[2])
  local parallel = redis.call('ZCARD', P .. 'par:' .. s[1]) + math.max(0, num(redis.call('GET', P .. 'parn:' .. s[1])))
  scopes[n] = {num(redis.call('GET', bud)), num(redis.call('GET', resv)), parallel,
               num(redis.call('GET', P .. 'toksum:' .. s[1])), redis.call('ZCARD', P .. 'req:' .. s[1]),
               newest(P .. 'tok:' .. s[1], now), newest(P .. 'req:' .. s[1], now)}
end
local days = {}
local day_names = cjson.decode(ARGV[3])
for n, day in ipairs(day_names) do
  local fields = redis.call('HGETALL', P .. 'day:' .. day)
  table.insert(fields, 1, day)
  days[n] = fields
end
-- The end users who spent the most over those days: [member, prompt, completion, cost, requests].
local users = {}
local sets = {}
for _, day in ipairs(day_names) do table.insert(sets, P .. 'eu:' .. day) end
if #sets > 0 then
  local summed = P .. 'eu:top'
  redis.call('ZUNIONSTORE', summed, #sets, unpack(sets))
  local top = redis.call('ZREVRANGE', summed, 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
  redis.call('DEL', summed)
  for i = 1, #top, 2 do
    local member = top[i]
    local prompt, completion, requests = 0, 0, 0
    for _, day in ipairs(day_names) do
      local counts = redis.call('HMGET', P .. 'euc:' .. day, member .. '|p', member .. '|c', member .. '|r')
      prompt = prompt + num(counts[1])
      completion = completion + num(counts[2])
      requests = requests + num(counts[3])
    end
    users[#users + 1] = {member, int(prompt), int(completion), int(top[i + 1]), int(requests)}
  end
end
return cjson.encode({scopes = scopes, days = days, users = users})
"""


#: Seconds Redis is left alone after a failure before one call tries it again.
RETRY_INTERVAL = 1.0
#: Reserve calls in flight at once; what arrives while they are goes together in the next.
RESERVES_IN_FLIGHT = 4
#: Settles replayed from the journal in one call.
REPLAY_BATCH = 200
#: The most budget totals remembered from Redis's answers (beyond: the end users' are forgotten).
MOST_LAST_KNOWN = 100_000


#: Per scope and budget period: the scope as the reserve script reads it, and as the settle script does.
_FRAGMENTS: dict[tuple[ScopeLimits, str], tuple[str, str]] = {}


def _scope_json(limits: ScopeLimits, now: float) -> tuple[str, str]:
    """A scope as the reserve script reads it and as the settle script does, as JSON text (made once per scope and budget period)."""
    budget_key = limits.budget_key(now)
    fragments = _FRAGMENTS.get((limits, budget_key))
    if fragments is None:
        end = period_end(limits.budget_period, now)
        windows = {"s": limits.scope, "tpm": limits.tokens_per_minute or 0, "rpm": limits.requests_per_minute or 0}
        fragments = (
            json.dumps({
                **windows,
                "bud": limits.budget_nano if limits.budget_nano is not None else 0,
                "bk": budget_key,
                "par": limits.max_parallel or 0,
                "end": -1 if end is None else end,
            }),
            json.dumps({**windows, "bk": budget_key}),
        )
        if len(_FRAGMENTS) > 10_000:
            _FRAGMENTS.clear()
        _FRAGMENTS[(limits, budget_key)] = fragments
    return fragments


def ask_json(ask: Ask, now: float) -> str:
    """An ask as the reserve script reads it, as JSON text (ids, numbers and checked names need no escaping)."""
    scopes = ",".join([_scope_json(limits, now)[0] for limits in ask.scopes])
    # An Ask's numbers are bounded when it is made (and the script bounds them again).
    return f'{{"id":"{ask.reservation_id}","tokens":{ask.tokens},"cost":{ask.cost_nano},"exp":{ask.expires_at!r},"scopes":[{scopes}]}}'


def settle_json(ask: Ask, settled: Settled, now: float, seq: int) -> str:
    """
    A settle as the settle script reads it, as JSON text (made when
    settled: a replay keeps its day and periods), C{seq}: its place in its
    journal.
    """
    scopes = ",".join([_scope_json(limits, now)[1] for limits in ask.scopes])
    models = json.dumps([
        [use.model, bounded(use.prompt_tokens, TOKENS_BOUND), bounded(use.completion_tokens, TOKENS_BOUND), bounded(use.cost_nano, NANO_BOUND)]
        for use in settled.models
    ])
    tokens, cost = bounded(settled.tokens, TOKENS_BOUND), bounded(settled.cost_nano, NANO_BOUND)
    return (
        f'{{"seq":{seq},"id":"{ask.reservation_id}","tokens":{tokens},"cost":{cost},'
        f'"day":"{day_of(now)}","key":"{settled.key}","team":"{settled.team or ""}","scopes":[{scopes}],"models":{models}'
        + ("}" if settled.end_user is None else f',"user":{json.dumps(settled.end_user)}}}')
    )


def _quota(raw: Any) -> Quota | None:
    if not raw:
        return None
    limit, remaining, reset, used = raw
    return Quota(int(limit), int(remaining), float(reset), int(used))


def verdict_of(raw: dict) -> Verdict:
    """A verdict of the reserve script."""
    after = raw["after"]
    left = raw.get("left")
    return Verdict(
        bool(raw["ok"]), raw["why"] or None, raw["scope"] or None, None if after is None or after < 0 else float(after),
        _quota(raw["tq"]), _quota(raw["rq"]), None if left is None or left is False else int(left), bool(raw.get("flight")),
    )


@attrs.define(eq=False)
class _Waiting:
    """An ask waiting for its batch's verdict."""

    ask: Ask
    decided: Deferred
    abandoned: bool = False


@implementer(IGovernanceStore)
class RedisLedgerStore:
    """
    The ledger in Redis, with a ledger in memory standing in while Redis is away.

    @param redis: a txredisapi connection (pool), or anything with its
        C{script_load} and C{evalsha}.
    @param timeout: seconds each Redis call may take.
    """

    def __init__(
        self,
        redis: Any,
        clock: IReactorTime,
        timeout: float,
        log: Any,
        retry_interval: float = RETRY_INTERVAL,
        disconnect: Callable[[], Deferred] | None = None,
    ) -> None:
        self._clock = clock
        self._log = log
        self._redis = GuardedRedis(
            redis, clock, timeout, retry_interval, log, "budgets_redis", {"serving_from": "memory"}, disconnect,
        )
        self._retry_interval = retry_interval
        self._replay: Any = None
        self._local = Ledger()
        #: Budget totals Redis last told, by (scope, period key): the local ledger starts from them.
        self._last_known: dict[tuple[str, str], int] = {}
        self._seeded: set[tuple[str, str]] = set()
        self._reserves: list[_Waiting] = []
        #: Reserve calls in flight (at most L{RESERVES_IN_FLIGHT}: one per pooled connection).
        self._reserving = 0
        #: Settles not yet in Redis, as the script's JSON, oldest first (the journal while Redis is away).
        self.journal: list[str] = []
        #: The journal's name in Redis, and how many settles it was handed: Redis keeps the
        #: last one it applied, so a batch sent again (its answer lost) is applied once.
        self._journal_name = secrets.token_hex(8)
        self._settles_made = 0
        self._settling: Deferred | None = None

    @property
    def serving_locally(self) -> bool:
        """Redis failed last: the ledger in memory decides meanwhile."""
        return self._redis.down

    @property
    def description(self) -> dict:
        return {
            "backend": "redis",
            "healthy": not self.serving_locally,
            "serving_from": "memory" if self.serving_locally else "redis",
            "journal": len(self.journal),
        }

    # -- reserve

    def reserve(self, ask: Ask) -> Deferred[Verdict]:
        def cancelled(d: Deferred) -> None:
            waiting.abandoned = True

        waiting = _Waiting(ask, Deferred(cancelled))
        self._reserves.append(waiting)
        if self._reserving < RESERVES_IN_FLIGHT:
            self._ask()
        return waiting.decided

    def _ask(self) -> None:
        while self._reserves and self._reserving < RESERVES_IN_FLIGHT:
            batch, self._reserves = self._reserves, []
            admission = self._redis.admit("reserve")
            if not admission.allowed:
                self._decide_locally(batch)
                continue
            now = self._clock.seconds()
            args = [repr(now), repr(IN_FLIGHT_RETRY), *[ask_json(waiting.ask, now) for waiting in batch]]
            self._reserving += 1
            asking = Deferred.fromCoroutine(self._run(RESERVE_LUA, args))
            asking.addBoth(self._answered, batch, admission)

    def _answered(self, result: Any, batch: list[_Waiting], admission: Any) -> None:
        self._reserving -= 1
        if isinstance(result, Failure):
            self._failed(admission, result)
            self._decide_locally(batch)
        else:
            self._succeeded(admission)
            if len(self._last_known) > MOST_LAST_KNOWN:
                # End users come and go: what Redis said of theirs is forgotten (a key's or team's is kept).
                self._last_known = {key: value for key, value in self._last_known.items() if not key[0].startswith(PASSING_SCOPE)}
            now = self._clock.seconds()
            last_known = self._last_known
            for waiting, raw in zip(batch, json.loads(result)):
                spent = raw.get("spent") or {}
                for limits in waiting.ask.scopes:
                    committed = spent.get(limits.scope)
                    if committed is not None:
                        last_known[(limits.scope, limits.budget_key(now))] = int(committed)
                self._decided(waiting, verdict_of(raw))
        if self._reserves:
            self._ask()

    def _decided(self, waiting: _Waiting, verdict: Verdict) -> None:
        if waiting.abandoned:
            if verdict.allowed:
                # Its client left while Redis was asked: nothing was used.
                self.settle(waiting.ask, Settled("", None, 0, 0))
            return
        waiting.decided.callback(verdict)

    def _decide_locally(self, batch: list[_Waiting]) -> None:
        now = self._clock.seconds()
        for waiting in batch:
            self._seed(waiting.ask, now)
            self._decided(waiting, self._local.reserve(waiting.ask, now))

    def _seed(self, ask: Ask, now: float) -> None:
        """The local ledger starts each budget from what Redis last said of it (plus what it took since)."""
        for limits in ask.scopes:
            key = (limits.scope, limits.budget_key(now))
            if key not in self._seeded:
                self._seeded.add(key)
                self._local.restore(key[0], key[1], self._last_known.get(key, 0))

    # -- settle

    def settle(self, ask: Ask, settled: Settled) -> Deferred[None]:
        now = self._clock.seconds()
        if self.serving_locally:
            self._local.settle(ask, settled.tokens, settled.cost_nano, now)
        self._settles_made += 1
        self.journal.append(settle_json(ask, settled, now, self._settles_made))
        if self._settling is None:
            self._send_settles()
        return succeed(None)

    def _send_settles(self) -> None:
        if not self.journal or self._settling is not None:
            return
        admission = self._redis.admit("settle")
        if not admission.allowed:
            self._replay_later()  # kept in the journal: replayed when Redis answers again
            return
        batch = self.journal[:REPLAY_BATCH]
        args = [repr(self._clock.seconds()), self._journal_name, "[" + ",".join(batch) + "]"]
        settling = self._settling = Deferred.fromCoroutine(self._run(SETTLE_LUA, args))
        settling.addBoth(self._settled, len(batch), admission)

    def _settled(self, result: Any, count: int, admission: Any) -> None:
        self._settling = None
        if isinstance(result, Failure):
            self._failed(admission, result)
            return
        del self.journal[:count]
        self._succeeded(admission)
        self._send_settles()

    def _replay_later(self) -> None:
        """Try the journal again after the retry interval, even if no request comes to try Redis."""
        if self._replay is None or not self._replay.active():
            self._replay = self._clock.callLater(self._retry_interval, self._replay_now)

    def _replay_now(self) -> None:
        self._replay = None
        self._send_settles()

    # -- Redis itself

    def _run(self, script: str, args: list) -> Coroutine[Any, Any, Any]:
        """One of the ledger's scripts, through the guarded client (its timeout, NOSCRIPT reload)."""
        return self._redis.script(script, [KEY_PREFIX], args)

    def _failed(self, admission: Any, failure: Failure) -> None:
        self._replay_later()
        if self._redis.failed(admission, failure.value):
            # Redis just went away: the ledger in memory starts afresh from what Redis last told.
            self._seeded.clear()
            self._local = Ledger()

    def _succeeded(self, admission: Any) -> None:
        if self._redis.succeeded(admission, serving_from="redis", journal=len(self.journal)):
            self._send_settles()

    # -- renew

    def renew(self, reservation_ids: list[str], expires_at: float) -> Deferred[None]:
        ids = list(reservation_ids)
        # Held here too while Redis was away (and after, until they settle).
        self._local.renew(ids, expires_at)
        admission = self._redis.admit("renew")
        if not admission.allowed:
            return succeed(None)
        renewing = Deferred.fromCoroutine(self._run(RENEW_LUA, [repr(expires_at), *ids]))

        def renewed(result: Any) -> None:
            if isinstance(result, Failure):
                self._failed(admission, result)
            else:
                self._succeeded(admission)

        return renewing.addBoth(renewed)

    # -- the operator's view

    def spend(self, scopes: list[ScopeLimits], days: int) -> Deferred[SpendReport]:
        return Deferred.fromCoroutine(self._spend(scopes, days))

    async def _spend(self, scopes: list[ScopeLimits], days: int) -> SpendReport:
        now = self._clock.seconds()
        wanted = [[limits.scope, limits.budget_key(now), limits.tokens_per_minute or 0, limits.requests_per_minute or 0] for limits in scopes]
        day_names = [day_of(now - back * 86400) for back in range(days - 1, -1, -1)]
        raw = json.loads(await self._run(SPEND_LUA, [repr(now), json.dumps(wanted), json.dumps(day_names), str(TOP_END_USERS)]))
        report = []
        for limits, key, row in zip(scopes, wanted, raw["scopes"] or []):
            committed, reserved, parallel, tokens, requests, tokens_reset, requests_reset = row
            report.append(ScopeSpend(
                limits.scope, key[1], int(committed) - int(reserved), int(reserved), int(parallel),
                Quota(key[2], max(0, key[2] - int(tokens)), float(tokens_reset), int(tokens)) if key[2] else None,
                Quota(key[3], max(0, key[3] - int(requests)), float(requests_reset), int(requests)) if key[3] else None,
            ))
        rows = []
        for fields in raw["days"] or []:
            day, values = fields[0], fields[1:]
            counts: dict[tuple, list[int]] = {}
            for field, value in zip(values[0::2], values[1::2]):
                key_name, team, model, kind = field.rsplit("|", 3)
                slot = counts.setdefault((day, key_name, team, model), [0, 0, 0, 0])
                slot["pcnr".index(kind)] += int(value)
            rows += [where + tuple(amounts) for where, amounts in sorted(counts.items())]
        end_users = []
        for member, prompt, completion, cost, requests in raw.get("users") or []:
            key_name, _, end_user = member.partition("|")
            end_users.append((key_name, end_user, int(prompt), int(completion), int(cost), int(requests)))
        return SpendReport(tuple(report), tuple(rows), tuple(end_users))

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self.journal and not self.serving_locally:
            # One last try to hand Redis what was settled (bounded by the timeout).
            if self._settling is None:
                self._send_settles()
            if self._settling is not None:
                try:
                    await self._settling
                except Exception:
                    pass
        if self.journal:
            self._log.error("budgets_journal_lost_at_stop", settles=len(self.journal))
        if self._replay is not None and self._replay.active():
            self._replay.cancel()
        closing = self._redis.close()
        if closing is not None:
            await closing


def connect_ledger(url: str, clock: IReactorTime, timeout: float, log: Any) -> RedisLedgerStore:
    """A Redis ledger on a lazy txredisapi pool for C{redis://...} (replies as text)."""
    from txgateway.redispool import redis_pool

    pool = redis_pool(url, timeout, as_bytes=False)
    return RedisLedgerStore(pool.calls, clock, timeout, log, disconnect=pool.disconnect)
