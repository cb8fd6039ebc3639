"""The token bucket arithmetic and the in-memory store, on a Clock."""

from twisted.internet.task import Clock

from txgateway.ratelimit.bucket import BucketSpec, take_token
from txgateway.ratelimit.memory import MemoryRateLimitStore

SPEC = BucketSpec("default", capacity=100, window=60.0)


def drain(store, key, spec, count):
    return [store.decide(key, spec) for _ in range(count)]


def test_a_full_bucket_allows_a_burst_of_its_capacity():
    store = MemoryRateLimitStore(Clock())
    decisions = drain(store, "ip:a", SPEC, 100)
    assert all(d.allowed for d in decisions)
    assert [d.remaining for d in decisions[:3]] == [99, 98, 97]
    assert decisions[-1].remaining == 0


def test_the_request_after_the_burst_is_refused_with_retry_after():
    store = MemoryRateLimitStore(Clock())
    drain(store, "ip:a", SPEC, 100)
    refused = store.decide("ip:a", SPEC)
    assert not refused.allowed
    assert refused.retry_after == 1  # 100/min refills one token every 0.6 s
    assert refused.remaining == 0


def test_refill_is_continuous_at_capacity_per_window():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    drain(store, "ip:a", SPEC, 100)
    clock.advance(0.599)
    assert not store.decide("ip:a", SPEC).allowed
    clock.advance(0.001)
    assert store.decide("ip:a", SPEC).allowed
    assert not store.decide("ip:a", SPEC).allowed


def test_retry_after_counts_whole_seconds_until_a_token_is_back():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    slow = BucketSpec("slow", capacity=2, window=10.0)  # a token every 5 s
    drain(store, "k", slow, 2)
    assert store.decide("k", slow).retry_after == 5
    clock.advance(2.5)
    assert store.decide("k", slow).retry_after == 3


def test_reset_is_whole_seconds_until_the_bucket_is_full():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    spec = BucketSpec("s", capacity=10, window=10.0)
    assert store.decide("k", spec).reset == 1
    drain(store, "k", spec, 9)
    assert store.decide("k", spec).reset == 10


def test_clients_have_separate_buckets():
    store = MemoryRateLimitStore(Clock())
    drain(store, "ip:a", SPEC, 100)
    assert not store.decide("ip:a", SPEC).allowed
    assert store.decide("ip:b", SPEC).allowed


def test_a_family_of_its_own_does_not_share_tokens_with_the_default():
    store = MemoryRateLimitStore(Clock())
    own = BucketSpec("service:data", capacity=20, window=60.0)
    drain(store, "ip:a", own, 20)
    assert not store.decide("ip:a", own).allowed
    assert store.decide("ip:a", SPEC).allowed


def test_idle_buckets_are_forgotten():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    for n in range(1000):
        store.decide(f"ip:{n}", SPEC)
    assert len(store) == 1000
    clock.advance(60)
    store.decide("ip:new", SPEC)
    assert len(store) == 1


def test_a_bucket_in_use_is_not_forgotten():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    drain(store, "ip:busy", SPEC, 100)
    clock.advance(30)
    store.decide("ip:busy", SPEC)
    clock.advance(30)
    store.decide("ip:other", SPEC)
    assert len(store) == 2
    # 30 s refilled 50 tokens, one was taken at 30 s, and 30 s more refilled 50.
    assert store.decide("ip:busy", SPEC).remaining == 98


def test_forgetting_an_idle_bucket_changes_no_decision():
    spec = BucketSpec("s", capacity=3, window=3.0)
    decision, tokens = take_token(spec, 0.0, 0.0, 3.0)
    assert decision.allowed and decision.remaining == 2
    fresh, _ = take_token(spec, 3.0, 3.0, 3.0)
    assert fresh == decision


def test_tokens_never_exceed_capacity():
    decision, tokens = take_token(SPEC, 100.0, 0.0, 1e9)
    assert tokens == 99.0 and decision.remaining == 99
