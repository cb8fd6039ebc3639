"""Which endpoint an attempt goes to, for each balance mode."""

from __future__ import annotations

import random

import attrs
import pytest

from txgateway.routing.balance import Balancer, decayed


@attrs.define(eq=False)
class Spot:
    name: str
    in_flight: int = 0
    ttfb: float | None = None
    admits: bool = True

    def may_admit(self) -> bool:
        return self.admits


def names(endpoints) -> list[str]:
    return [endpoint.name for endpoint in endpoints]


def test_ordered_tries_the_first_admitting_endpoint_in_list_order():
    a, b, c = Spot("a", admits=False), Spot("b", in_flight=9), Spot("c")
    assert names(Balancer("ordered").order([a, b, c])) == ["b", "c"]


def test_round_robin_takes_each_admitting_endpoint_in_turn():
    a, b, c = Spot("a"), Spot("b", admits=False), Spot("c")
    balancer = Balancer("round_robin")
    firsts = [balancer.order([a, b, c])[0].name for _ in range(4)]
    assert firsts == ["a", "c", "a", "c"]


def test_least_requests_prefers_fewer_in_flight_of_two_random_picks():
    busy, idle = Spot("busy", in_flight=5), Spot("idle", in_flight=1)
    balancer = Balancer("least_requests", random.Random(1))
    assert all(balancer.order([busy, idle])[0] is idle for _ in range(20))


def test_least_requests_ties_go_to_the_faster_and_an_unmeasured_one_counts_as_fastest():
    slow, fast, new = Spot("slow", ttfb=0.9), Spot("fast", ttfb=0.1), Spot("new")
    balancer = Balancer("least_requests", random.Random(3))
    assert all(balancer.order([slow, fast])[0] is fast for _ in range(20))
    assert all(balancer.order([fast, new])[0] is new for _ in range(20))


def test_least_requests_spreads_load_over_equal_endpoints():
    spots = [Spot(str(n)) for n in range(3)]
    balancer = Balancer("least_requests", random.Random(5))
    firsts = {balancer.order(spots)[0].name for _ in range(60)}
    assert firsts == {"0", "1", "2"}


@pytest.mark.parametrize("mode", ["least_requests", "round_robin", "ordered"])
def test_the_endpoint_to_avoid_comes_last_while_another_admits(mode):
    a, b = Spot("a"), Spot("b")
    assert names(Balancer(mode, random.Random(2)).order([a, b], avoid=a)) == ["b", "a"]
    b.admits = False
    assert names(Balancer(mode).order([a, b], avoid=a)) == ["a"]


def test_no_admitting_endpoint_is_no_candidate():
    assert Balancer("least_requests").order([Spot("a", admits=False)]) == []


def test_the_decayed_time_to_headers_starts_at_the_first_sample_and_moves_by_a_fifth():
    assert decayed(None, 0.5) == 0.5
    assert decayed(0.5, 1.5) == pytest.approx(0.7)
