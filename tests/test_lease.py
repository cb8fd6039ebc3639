"""
In flight is a lease: every path a request can take (an answer, a final
error, a timeout, a fallback, a refusal read, a resume, a client that
leaves at any point) gives back every slot it took, so that balancing and
the retry budget never drift.
"""

import json

import pytest
import treq

from tests.fakes import SERVICE_INI, FakeResponse, Harness, result_of
from tests.test_openai import JSON, SSE, broken_stream, chat, chunk, harness
from txgateway.routing.lease import InFlight


class Holder:
    in_flight = 0


def test_a_lease_takes_one_slot_and_gives_it_back_once():
    holder = Holder()
    lease = InFlight(holder)
    assert holder.in_flight == 1 and lease.held
    lease.release()
    lease.release()
    assert holder.in_flight == 0 and not lease.held


def test_a_lease_is_given_back_when_its_block_raises():
    holder = Holder()
    with pytest.raises(RuntimeError):
        with InFlight(holder):
            assert holder.in_flight == 1
            raise RuntimeError("boom")
    assert holder.in_flight == 0


def counts(h: Harness) -> list[tuple[str, int]]:
    """Every in-flight and retrying count of every service, endpoint and deployment that is not zero."""
    broker = h.gateway.broker
    routes = [(name, route) for name, route in broker.routes.items()]
    routes += [(f"model {route.config.name}", route) for route in broker.models.deployments()]
    left = []
    for name, route in routes:
        left += [(f"{name} in_flight", route.in_flight), (f"{name} retrying", route.retrying)]
        left += [(f"{name} {endpoint.url}", endpoint.in_flight) for endpoint in route.endpoints]
    return [(what, count) for what, count in left if count != 0]


FALLBACK_INI = SERVICE_INI.replace("[service:data]", "fallback = data\n[service:data]")


def finished(d) -> None:
    d.addErrback(lambda failure: None)


def test_an_answer_gives_its_slots_back():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    assert counts(h) != []
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200 and counts(h) == []


def test_a_retried_500_then_an_answer_gives_every_slot_back():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(500, {}, b"no"))
    h.flush()
    h.advance(1)
    assert ("ai retrying", 1) in counts(h)
    h.agents["ai"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200 and counts(h) == []


def test_spent_retries_give_every_slot_back():
    h = Harness(SERVICE_INI.replace("timeout = 10", "timeout = 10\nretries = 1"))
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.refuse()
    h.advance(1)
    h.agents["ai"].last.respond(FakeResponse(503, {}, b"down"))
    h.flush()
    assert result_of(d).code == 503 and counts(h) == []


def test_a_timeout_gives_its_slots_back():
    h = Harness(SERVICE_INI.replace("timeout = 10", "timeout = 10\nretries = 0"))
    d = h.request("GET", "/api/ai/x")
    h.advance(10)
    assert result_of(d).code == 504 and counts(h) == []


def test_a_fallback_gives_back_the_slots_of_the_service_that_gave_up():
    h = Harness(FALLBACK_INI.replace("timeout = 10", "timeout = 10\nretries = 0"))
    d = h.request("GET", "/api/ai/x")
    h.agents["ai"].last.respond(FakeResponse(503, {}, b"down"))
    h.flush()
    assert counts(h) == [("data in_flight", 1), ("data http://data.backend:8001", 1)]
    h.agents["data"].last.respond(FakeResponse(200, {}, b"ok"))
    h.flush()
    assert result_of(d).code == 200 and counts(h) == []


@pytest.mark.parametrize("when", ["sent", "backoff", "streaming"])
def test_a_client_that_leaves_gives_every_slot_back(when):
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x", unbuffered=True)
    if when == "backoff":
        h.agents["ai"].last.refuse()
        h.flush()
    elif when == "streaming":
        upstream = h.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
        upstream.send(b"data: 1\n\n")
        h.flush()
        result_of(d)
    assert counts(h) != []
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()
    finished(d)
    assert counts(h) == []


def test_a_stream_broken_midway_gives_its_slots_back():
    h = Harness(SERVICE_INI)
    d = h.request("GET", "/api/ai/x", unbuffered=True)
    upstream = h.agents["ai"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    upstream.send(b"data: 1\n\n")
    h.flush()
    finished(treq.collect(result_of(d), lambda data: None))
    upstream.fail()
    h.flush()
    assert counts(h) == []


def test_a_refusal_read_before_the_next_target_gives_its_slots_back():
    h = harness()
    d = chat(h)
    h.agents["primary"].last.respond(FakeResponse(400, JSON, json.dumps({"error": {"code": "context_length_exceeded"}}).encode()))
    h.flush()
    assert [what for what, _ in counts(h)] == ["model local in_flight", "model local http://local.test/v1"]
    h.agents["local"].last.respond(FakeResponse(200, JSON, b'{"choices": []}'))
    h.flush()
    assert result_of(d).code == 200 and counts(h) == []


def test_a_resumed_stream_gives_back_the_slots_of_both_streams():
    h = harness()
    response, received, done = broken_stream(h, ["One "])
    assert [what for what, _ in counts(h)] == ["model primary in_flight", "model primary http://primary.test/v1"]
    more = h.agents["primary"].last.respond(FakeResponse(200, SSE))
    more.send(chunk("two", chunk_id="second") + chunk(None, finish="stop", chunk_id="second") + b"data: [DONE]\n\n")
    more.finish()
    h.flush()
    assert result_of(done) is None and counts(h) == []


def test_a_stream_no_target_can_resume_gives_every_slot_back():
    h = harness()
    response, received, done = broken_stream(h, ["One "])
    h.agents["primary"].last.respond(FakeResponse(400, JSON, b'{"error":{"message":"no prefill"}}'))
    h.flush()
    h.agents["local"].last.respond(FakeResponse(400, JSON, b'{"error":{"message":"no prefill"}}'))
    h.flush()
    finished(done)
    assert counts(h) == []


def test_a_client_that_leaves_while_its_stream_is_resumed_gives_every_slot_back():
    h = harness()
    response, received, done = broken_stream(h, ["One "])
    h.agent.server_protocols[-1].transport.abortConnection()
    h.flush()
    finished(done)
    assert counts(h) == []
