"""
The Redis ledger's Lua scripts against a real redis-server, held to the
pure ledger they mirror: the same asks, settles and times give the same
verdicts, quotas and spend; and what Redis keeps for /spend.json.
"""

from __future__ import annotations

import calendar
import contextlib
import random

import pytest
import pytest_twisted
import structlog
from twisted.internet.task import Clock

from tests.integration.test_redis import RedisServer
from txgateway.governance.interface import ModelUse, Settled
from txgateway.governance.ledger import Ask, Ledger, ScopeLimits
from txgateway.governance.redis import RedisLedgerStore

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()

NOON = float(calendar.timegm((2026, 12, 3, 12, 0, 0)))
KEY = ScopeLimits("key:alice", tokens_per_minute=1000, requests_per_minute=12, budget_nano=5000, budget_period="day", max_parallel=4)
TEAM = ScopeLimits("team:ml", tokens_per_minute=1500, budget_nano=8000, budget_period="month")


async def connected(redis_server):
    import txredisapi

    return await txredisapi.Connection("127.0.0.1", redis_server.port, reconnect=False)


@contextlib.asynccontextmanager
async def store_at_noon(redis_server):
    """A Redis ledger on a clock at noon of 2026-12-03, its connection closed after."""
    connection = await connected(redis_server)
    try:
        clock = Clock()
        clock.advance(NOON)
        yield clock, RedisLedgerStore(connection, clock, 5.0, structlog.get_logger())
    finally:
        await connection.disconnect()


def comparable(verdict):
    retry = None if verdict.retry_after is None else round(verdict.retry_after, 3)
    quotas = [(q.limit, q.remaining, round(q.reset, 3), q.used) if q else None for q in (verdict.tokens, verdict.requests)]
    return (verdict.allowed, verdict.reason, verdict.scope, retry, quotas, verdict.left_nano, verdict.in_flight)


@pytest_twisted.ensureDeferred
async def test_the_scripts_decide_like_the_pure_ledger(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        reference = Ledger()
        rng = random.Random(11)
        held = []
        for step in range(300):
            clock.advance(rng.choice([0, 0, 0.5, 1, 3, 7]))
            now = clock.seconds()
            if held and rng.random() < 0.45:
                ask = held.pop(rng.randrange(len(held)))
                tokens = rng.randrange(0, ask.tokens * 2 + 1)
                cost = rng.randrange(0, ask.cost_nano * 2 + 1)
                reference.settle(ask, tokens, cost, now)
                await store.settle(ask, Settled("alice", "ml", tokens, cost, (ModelUse("m", tokens, 0, cost),)))
                await store._settling if store._settling is not None else None
                continue
            scopes = (KEY, TEAM) if rng.random() < 0.7 else (KEY,)
            ask = Ask(f"r{step}", scopes, rng.randrange(1, 400), rng.randrange(0, 900), now + rng.choice([5, 30, 300]))
            expected = reference.reserve(ask, now)
            got = await store.reserve(ask)
            assert comparable(got) == comparable(expected), step
            if got.allowed:
                held.append(ask)
        assert not store.serving_locally and store.journal == []


@pytest_twisted.ensureDeferred
async def test_a_settle_replayed_is_counted_once_and_spend_per_day_is_kept(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        limits = ScopeLimits("key:bob", budget_nano=10_000, budget_period="month")
        asks = [Ask(f"once{n}", (limits,), 10, 900, NOON + 60) for n in range(3)]
        for ask in asks:
            assert (await store.reserve(ask)).allowed
        settled = Settled("bob", None, 8, 700, (ModelUse("gpt-4o", 5, 3, 700),))
        await store.settle(asks[0], settled)
        await all_settled(store)
        for ask in asks[1:]:
            await store.settle(ask, settled)
        sent = list(store.journal)
        await all_settled(store)
        # Redis applied the batch but its answer was lost: the journal sends it again, with one settle more.
        await store.settle(Ask("after", (limits,), 10, 900, NOON + 60), settled)  # reserved nowhere: new spend
        store.journal[:0] = sent
        store._send_settles()
        await all_settled(store)
        report = await store.spend([limits], 31)
        [scope] = report.scopes
        assert (scope.spent_nano, scope.reserved_nano, scope.parallel) == (4 * 700, 0, 0)
        assert report.days == (("2026-12-03", "bob", "", "gpt-4o", 4 * 5, 4 * 3, 4 * 700, 4),)
        connection = await connected(redis_server)
        try:
            # What Redis keeps to apply each settle once: one key per gateway, not one per settle.
            assert await connection.keys("txgateway:gov:seq:*") == [f"txgateway:gov:seq:{store._journal_name}"]
            assert await connection.keys("txgateway:gov:done:*") == []
        finally:
            await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_settles_sent_together_count_each_request_of_the_day(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        limits = ScopeLimits("key:cy", budget_nano=10**9, budget_period="month")
        asks = [Ask(f"together{n}", (limits,), 10, 900, NOON + 60) for n in range(5)]
        for ask in asks:
            assert (await store.reserve(ask)).allowed
        assert (await store.spend([limits], 1)).scopes[0].parallel == 5  # counted, though the key has no limit of it
        for n, ask in enumerate(asks):  # the first goes alone; the others wait for it, and go in one batch
            models = (ModelUse("gpt-4o", 5, 3, 700),) if n % 2 else (ModelUse("gpt-4o", 5, 3, 700), ModelUse("o3", 1, 1, 50))
            await store.settle(ask, Settled("cy", None, 8, 750, models))
        await all_settled(store)
        report = await store.spend([limits], 31)
        assert report.days == (
            ("2026-12-03", "cy", "", "gpt-4o", 25, 15, 3500, 5),
            ("2026-12-03", "cy", "", "o3", 3, 3, 150, 0),  # a fallback's use: no request of its own
        )
        assert (report.scopes[0].spent_nano, report.scopes[0].parallel) == (5 * 750, 0)
        connection = await connected(redis_server)
        try:
            assert 0 < await connection.ttl("txgateway:gov:day:2026-12-03") <= 40 * 86400
        finally:
            await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_lapsed_reservation_gives_everything_back_in_redis(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        limits = ScopeLimits("key:carol", tokens_per_minute=100, budget_nano=100, budget_period="total", max_parallel=1)
        assert (await store.reserve(Ask("a", (limits,), 100, 100, NOON + 10))).allowed
        assert (await store.reserve(Ask("b", (limits,), 1, 1, NOON + 10))).reason == "budget_exceeded"
        clock.advance(10)
        verdict = await store.reserve(Ask("c", (limits,), 100, 100, NOON + 20))
        assert verdict.allowed and verdict.tokens.remaining == 0


HOSTILE = [2**63 - 1, 2**64, -(2**63), -1, 1e300, -1e300, float("nan"), 0.5, 7]


@pytest_twisted.ensureDeferred
async def test_hostile_numbers_never_poison_the_scripts_and_are_counted_like_the_pure_ledger(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        reference = Ledger()
        limits = ScopeLimits("key:mallory", tokens_per_minute=10**13, budget_nano=10**16, budget_period="total")
        for n, (tokens, cost) in enumerate(zip(HOSTILE, reversed(HOSTILE))):
            ask = Ask(f"h{n}", (limits,), tokens, cost, NOON + 60)
            expected = reference.reserve(Ask(f"h{n}", (limits,), tokens, cost, NOON + 60), NOON)
            assert comparable(await store.reserve(ask)) == comparable(expected)
            reference.settle(ask, cost, tokens, NOON)
            await store.settle(ask, Settled("mallory", None, cost, tokens, (ModelUse("m", tokens, cost, tokens),)))
            await store._settling if store._settling is not None else None
        assert not store.serving_locally and store.journal == []
        # The ledger still serves: an ordinary call of another key reserves and settles.
        plain = ScopeLimits("key:bob", tokens_per_minute=1000, budget_nano=10_000, budget_period="month")
        ask = Ask("plain", (plain,), 10, 900, NOON + 60)
        assert (await store.reserve(ask)).allowed
        await store.settle(ask, Settled("bob", None, 8, 700, (ModelUse("gpt-4o", 5, 3, 700),)))
        await store._settling if store._settling is not None else None
        report = await store.spend([limits, plain], 31)
        # (What the spend script reports passes through cjson, 14 significant digits.)
        assert [(pytest.approx(s.spent_nano, rel=1e-13), s.reserved_nano) for s in report.scopes] == [
            (reference.committed[("key:mallory", "total")], 0), (700, 0),
        ]
        assert 0 <= report.scopes[0].spent_nano <= len(HOSTILE) * 10**15


@pytest_twisted.ensureDeferred
async def test_a_settle_after_its_entry_left_the_window_counts_only_its_excess_from_then_like_the_pure_ledger(redis_server):
    # No reserve came in between to trim the window: the script settles an entry it has not
    # trimmed yet as one that has left the window (within it, it settles in place).
    async with store_at_noon(redis_server) as (clock, store):
        reference = Ledger()
        limits = ScopeLimits("key:late", tokens_per_minute=1000, budget_nano=10**9, budget_period="day")
        kept, late = Ask("kept", (limits,), 100, 10, NOON + 300), Ask("late", (limits,), 100, 10, NOON + 300)
        for ask in (kept, late):
            reference.reserve(ask, NOON)
            assert (await store.reserve(ask)).allowed
        clock.advance(30)
        reference.settle(kept, 250, 10, NOON + 30)
        await store.settle(kept, Settled("late", None, 250, 10, (ModelUse("m", 250, 0, 10),)))
        await all_settled(store)
        clock.advance(31)  # 'late' was taken 61 s ago, 'kept' 61 s ago too: both have left the window
        reference.settle(late, 400, 10, NOON + 61)
        await store.settle(late, Settled("late", None, 400, 10, (ModelUse("m", 400, 0, 10),)))
        await all_settled(store)
        clock.advance(1)
        probe = Ask("probe", (limits,), 1, 0, NOON + 400)
        expected = reference.reserve(probe, NOON + 62)
        assert expected.tokens.used == 300 + 1  # the excess of 'late' alone, from when it settled
        assert comparable(await store.reserve(probe)) == comparable(expected)


@pytest_twisted.ensureDeferred
async def test_a_window_of_more_entries_than_one_trim_takes_is_trimmed_whole(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        limits = ScopeLimits("key:busy", tokens_per_minute=10**9)
        for n in range(1201):  # more than two trims' worth (500 a call), all left the window at once
            assert (await store.reserve(Ask(f"b{n}", (limits,), 3, 0, NOON + 600))).allowed
        clock.advance(61)
        verdict = await store.reserve(Ask("probe", (limits,), 7, 0, NOON + 600))
        assert verdict.tokens.used == 7


@pytest_twisted.ensureDeferred
async def test_the_scripts_bound_numbers_even_when_a_caller_sends_them_unbounded(redis_server):
    from txgateway.governance.redis import KEY_PREFIX, RESERVE_LUA

    connection = await connected(redis_server)
    try:
        scope = '{"s":"key:eve","tpm":0,"rpm":0,"bud":0,"bk":"total","par":0,"end":-1}'
        for n, number in enumerate(["9223372036854775807", "1e308", "-1e308", "18446744073709551616"]):
            ask = f'{{"id":"raw{n}","tokens":{number},"cost":{number},"exp":{NOON + 60},"scopes":[{scope}]}}'
            await connection.eval(RESERVE_LUA, [KEY_PREFIX], [str(NOON), "1.0", ask])
        clock = Clock()
        clock.advance(NOON)
        store = RedisLedgerStore(connection, clock, 5.0, structlog.get_logger())
        limits = ScopeLimits("key:eve", budget_nano=10**16, budget_period="total")
        ask = Ask("after", (limits,), 10, 900, NOON + 60)
        assert (await store.reserve(ask)).allowed  # no INCRBY overflowed: the key still counts
    finally:
        await connection.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_renewed_reservation_is_held_in_redis_until_its_new_expiry(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        limits = ScopeLimits("key:long", budget_nano=100, budget_period="total")
        running = Ask("running", (limits,), 0, 100, NOON + 10)
        assert (await store.reserve(running)).allowed
        await store.renew(["running"], NOON + 30)
        clock.advance(20)
        assert (await store.reserve(Ask("past", (limits,), 0, 100, NOON + 60))).reason == "budget_exceeded"
        clock.advance(11)
        assert (await store.reserve(Ask("later", (limits,), 0, 100, NOON + 90))).allowed  # its holder stopped renewing


@pytest_twisted.ensureDeferred
async def test_an_end_users_scope_and_spend_hold_any_id_and_decide_like_the_pure_ledger(redis_server):
    async with store_at_noon(redis_server) as (clock, store):
        reference = Ledger()
        odd = 'a"b|c:\\d é'
        user = ScopeLimits(f"user:alice:{odd}", tokens_per_minute=300, budget_nano=2000, budget_period="day")
        for step in range(6):
            ask = Ask(f"u{step}", (KEY, user, TEAM), 120, 500, NOON + 60)
            expected = reference.reserve(ask, NOON)
            got = await store.reserve(ask)
            assert comparable(got) == comparable(expected), step
            if got.allowed:
                reference.settle(ask, 100, 400, NOON)
                await store.settle(ask, Settled("alice", "ml", 100, 400, (ModelUse("m", 60, 40, 400),), odd))
                await store._settling if store._settling is not None else None
        report = await store.spend([user], 31)
        [scope] = report.scopes
        assert scope.spent_nano == reference.committed[(user.scope, "d2026-12-03")] == 800
        assert report.end_users == (("alice", odd, 120, 80, 800, 2),)


@pytest_twisted.ensureDeferred
async def test_the_admin_store_writes_a_record_only_over_the_one_its_change_was_made_from(redis_server):
    """Two gateways on one Redis: the one a moment behind cannot write back a key the other deleted or rotated."""
    from txgateway.admin.store import AdminRecordMoved, RedisAdminStore

    connection = await connected(redis_server)
    try:
        store = RedisAdminStore(connection, Clock(), 5.0, structlog.get_logger())
        entry = {"action": "test"}
        first = {"name": "dana", "secret_sha256": "aa", "fields": {"budget_usd": 1.5}, "disabled": False}
        assert await store.commit("key", "dana", None, first, entry) == 1
        with pytest.raises(AdminRecordMoved):
            await store.commit("key", "dana", None, {**first, "secret_sha256": "bb"}, entry)  # made twice
        registry = await store.registry()
        seen = registry.keys["dana"]  # as every process reads it back
        rotated = {**seen, "secret_sha256": "cc"}
        assert await store.commit("key", "dana", seen, rotated, entry) == 2
        with pytest.raises(AdminRecordMoved):
            await store.commit("key", "dana", seen, {**seen, "fields": {"budget_usd": 9}}, entry)  # made from before the rotation
        assert await store.commit("key", "dana", rotated, None, entry) == 3  # deleted
        with pytest.raises(AdminRecordMoved):
            await store.commit("key", "dana", rotated, {**rotated, "disabled": True}, entry)  # would bring it back
        registry = await store.registry()
        assert "dana" not in registry.keys and registry.version == 3
        assert len(await store.audit(10)) == 3  # a refused change leaves no audit entry
    finally:
        await connection.disconnect()


async def all_settled(store: RedisLedgerStore) -> None:
    """Every settle handed to C{store} has been applied in Redis (they go in batches, one at a time)."""
    while store._settling is not None:
        await store._settling


@pytest_twisted.ensureDeferred
async def test_every_key_the_scripts_write_expires_but_a_total_budget_and_the_held_set(redis_server):
    # Reserve, settle (within its reservation, past it, and beyond the window), lapse,
    # and a settle replayed from a gateway that decided alone: nothing is kept forever
    # that was not meant to be.
    async with store_at_noon(redis_server) as (clock, store):
        total = ScopeLimits("key:dan", tokens_per_minute=1000, requests_per_minute=50, budget_nano=10**9, budget_period="total")
        asks = [Ask(f"t{n}", (total, TEAM), 100, 100, NOON + 300) for n in range(4)]
        for ask in asks:
            assert (await store.reserve(ask)).allowed
        await store.settle(asks[0], Settled("dan", "ml", 50, 50, (ModelUse("m", 50, 0, 50),)))
        await store.settle(asks[1], Settled("dan", "ml", 400, 400, (ModelUse("m", 400, 0, 400),)))
        await all_settled(store)
        clock.advance(70)  # past the window: asks[2]'s excess counts from now, in window keys made anew
        await store.settle(asks[2], Settled("dan", "ml", 300, 300, (ModelUse("m", 300, 0, 300),), "user-1"))
        alone = ScopeLimits("key:erin", tokens_per_minute=1000, budget_nano=10**9, budget_period="day")
        await store.settle(Ask("alone", (alone,), 10, 10, NOON + 400), Settled("erin", None, 20, 20, (ModelUse("m", 20, 0, 20),)))
        await all_settled(store)
        clock.advance(300)  # asks[3] lapses at the next call
        assert (await store.reserve(Ask("late", (KEY,), 10, 10, clock.seconds() + 60))).allowed
        connection = await connected(redis_server)
        try:
            keys = await connection.keys("txgateway:gov:*")
            forever = sorted([key for key in keys if (await connection.ttl(key)) == -1])
        finally:
            await connection.disconnect()
    assert "txgateway:gov:tok:key:erin" in keys and "txgateway:gov:tok:key:dan" in keys
    assert forever == ["txgateway:gov:bud:key:dan:total", "txgateway:gov:held", "txgateway:gov:resv:key:dan:total"]
