"""
Routing's parts on their own, on a Clock: the fallback chain, each target's
attempts, the answer relay and the resume of a broken stream, driven
through a fake speaker (an API no package speaks: its path, body, headers,
events and broken-stream event are its own) and fake upstreams.  Routing
does what the speaker says and nothing of any real API.
"""

from __future__ import annotations

import json
import random

import attrs
import pytest
import structlog
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.fakes import FakeChannel, FakeResponse, FakeUpstream
from txgateway import errors
from txgateway.config.gateway import parse_config
from txgateway.daemon.service import build_routes
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import GatewayError
from txgateway.observability.context import RequestContext
from txgateway.observability.metrics import GatewayMetrics
from txgateway.openai.relays import EventStreamRelay
from txgateway.openai.wire import ChunkFacts
from txgateway.routing.answer import AnswerCutShort, AnswerRelay
from txgateway.routing.attempt import Attempts
from txgateway.routing.call import Call
from txgateway.routing.chain import FallbackChain
from txgateway.routing.model import Target
from txgateway.routing.resume import StreamResume
from txgateway.speaking import FIRST_TOKEN, IApi, IModelCall, ISpeaker, PlainHttp, Speakers, Untranslatable

#: The fake API goes by a name the configuration knows; nothing else of OpenAI's is used.
FAKE = "openai"


@implementer(IModelCall)
@attrs.frozen
class FakeCall:
    """A model call in the fake API: a model, and whether it streams."""

    model: str = "m"
    stream: bool = False
    api = FAKE
    max_tokens = None
    generates = True
    client_wants_usage = False
    cacheable = True
    unbounded = None

    @property
    def resumable_kind(self) -> bool:
        return self.stream

    def operation(self, path: bytes) -> str:
        return "fake"

    def end_user(self) -> tuple:
        return "fake-user", None

    def answer_started(self) -> None:
        pass


def read_fake_event(event: bytes) -> ChunkFacts:
    """The fake API's stream: C{data: WORD} per event, C{data: END} last."""
    _, data, word = event.partition(b"data: ")
    if not data:
        return ChunkFacts()  # a comment: no token
    word = word.strip().decode()
    if word == "END":
        return ChunkFacts(data={}, done=True, token=True, finished=True)
    return ChunkFacts(data={"id": "fake-1"}, text=word, token=True)


@implementer(ISpeaker)
class FakeSpeaker:
    """Says the call its own way, so that a test sees routing follow it."""

    client_api = target_api = FAKE
    translated = False
    answer_headers = ((b"X-Fake-Speaker", b"said"),)
    takes_prefill = True

    def __init__(self, call: FakeCall, path: bytes, started_at: float) -> None:
        self.call = call

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        return b"/fake-api" + path

    def body(self, config, model, prefill) -> bytes:
        return json.dumps({"model": model or self.call.model, "prefill": prefill}).encode()

    def headers(self, request, config, withheld):
        return [(b"x-fake-api", b"1")], withheld + (b"x-secret",)

    def completion_floor(self, config) -> int:
        return 0

    def answer_relay(self, code, event_stream, reading):
        if code == 200 and event_stream and reading.transcript is not None:
            relay = EventStreamRelay(
                reading.clock, reading.idle_timeout, reading.transcript, reading.on_usage, False, reading.resumed,
                read_fake_event,
            )
            return relay, FIRST_TOKEN
        return None

    def refusal_body_needed(self, code: int) -> bool:
        return code == 400

    def refusal_moves_on(self, code: int, body: bytes | None) -> str | None:
        return "the fake API says so" if body == b"try another" else None

    def broken_event(self, kind, message: str, request_id: str) -> bytes:
        return b"event: fake-error\ndata: " + kind.type.encode() + b"\n\n"


@implementer(IApi)
class FakeApi(PlainHttp):
    name = FAKE
    title = "the fake API"


SPEAKERS = Speakers({FAKE: FakeApi()}, {(FAKE, FAKE): FakeSpeaker})

INI = """
[service:first]
url = http://first.test/base
api = openai
retries = {first_retries}
retry_delay = 1
retry_jitter = 0
breaker_threshold = 100
first_token_timeout = 5
[service:second]
url = http://second.test
api = openai
retries = {second_retries}
retry_delay = 1
retry_jitter = 0
breaker_threshold = 100
resume = prefill
"""


class Routing:
    """The routing parts as the broker assembles them, on a Clock, with one fake upstream per service."""

    def __init__(self, first_retries: int = 0, second_retries: int = 0, resume_second: bool = True) -> None:
        self.clock = Clock()
        ini = INI.format(first_retries=first_retries, second_retries=second_retries)
        if not resume_second:
            ini = ini.replace("resume = prefill\n", "")
        config = parse_config(ini, "test.ini", {})
        self.upstreams: dict[str, FakeUpstream] = {}
        metrics = GatewayMetrics(self.clock)
        self.routes = build_routes(config, self.clock, self._upstream_for, structlog.get_logger("test"), metrics)
        attempts = Attempts(self.clock, metrics, random.Random(3))
        self.chain = FallbackChain(self.clock, attempts, AnswerRelay(self.clock, StreamResume(self.clock, attempts, metrics)), metrics)
        self.channel = FakeChannel()

    def _upstream_for(self, service, url: str) -> FakeUpstream:
        upstream = self.upstreams[service.name] = FakeUpstream(url)
        return upstream

    def call(self, model_call: FakeCall | None = None, targets: tuple[str, ...] = ("first", "second")) -> Call:
        request = IncomingRequest(
            self.channel, b"POST", b"/v1/fake?x=1", [(b"x-secret", b"s"), (b"x-kept", b"k")], b'{"model": "m"}',
        )
        ctx = RequestContext("req-1", "127.0.0.1", self.clock.seconds(), structlog.get_logger("test"))
        return Call.of(
            request, ctx, b"/do?x=1", [Target(self.routes[name], "model-" + name) for name in targets], SPEAKERS,
            model_call or FakeCall(),
        )

    def serve(self, call: Call) -> Deferred:
        return Deferred.fromCoroutine(self.chain.serve(call))


def test_the_registered_speaker_provides_its_interface():
    speaker = SPEAKERS.speaker(FakeCall(), FAKE, b"/do", 0.0)
    assert verifyObject(ISpeaker, speaker)
    assert verifyObject(IApi, SPEAKERS.api(FAKE))


def test_a_pair_no_package_speaks_is_untranslatable():
    lonely = Speakers({FAKE: FakeApi(), "other": PlainHttp()}, {(FAKE, FAKE): FakeSpeaker})
    with pytest.raises(Untranslatable):
        lonely.speaker(FakeCall(), "other", b"/do", 0.0)


def test_the_registry_refuses_an_api_that_is_not_one():
    with pytest.raises(TypeError):
        Speakers({FAKE: object()}, {})


def test_the_attempt_sends_the_path_body_and_headers_the_speaker_says():
    routing = Routing()
    served = routing.serve(routing.call())
    sent = routing.upstreams["first"].last
    assert sent.uri == b"http://first.test/base/fake-api/do?x=1"
    assert json.loads(sent.body) == {"model": "model-first", "prefill": None}
    assert sent.headers.getRawHeaders(b"x-fake-api") == [b"1"]
    assert not sent.headers.hasHeader(b"x-secret")  # the speaker withheld it
    assert sent.headers.getRawHeaders(b"x-kept") == [b"k"]
    sent.respond(FakeResponse(200, {}, b"done"))
    assert served.called
    assert routing.channel.body == b"done"
    assert b"X-Fake-Speaker: said\r\n" in b"".join(routing.channel.written)  # the speaker's answer headers


@pytest.mark.parametrize("first_retries", [0, 1, 2, 3])
def test_each_target_counts_its_own_attempts(first_retries):
    routing = Routing(first_retries=first_retries, second_retries=3)
    call = routing.call()
    served = routing.serve(call)
    for _ in range(30):
        for upstream in routing.upstreams.values():
            for sent in upstream.requests:
                if not sent.answer.called:
                    sent.respond(FakeResponse(503, {}, b"down"))
        routing.clock.advance(1)
    assert len(routing.upstreams["first"].requests) == first_retries + 1
    assert len(routing.upstreams["second"].requests) == 4
    assert served.called
    assert call.ctx.attempts == first_retries + 5  # the report counts them all
    assert call.ctx.fallback_from == ("first:model-first",)


def test_a_retry_waits_its_backoff_on_the_clock():
    routing = Routing(first_retries=1)
    routing.serve(routing.call(targets=("first",)))
    routing.upstreams["first"].last.respond(FakeResponse(503, {}, b"down"))
    routing.clock.advance(0.99)
    assert len(routing.upstreams["first"].requests) == 1
    routing.clock.advance(0.01)
    assert len(routing.upstreams["first"].requests) == 2


def test_a_refusal_the_speaker_says_moves_on_goes_to_the_next_target():
    routing = Routing()
    call = routing.call()
    served = routing.serve(call)
    routing.upstreams["first"].last.respond(FakeResponse(400, {}, b"try another"))
    routing.upstreams["second"].last.respond(FakeResponse(200, {}, b"second"))
    assert served.called and routing.channel.body == b"second"
    assert call.answering.route.config.name == "second"


def test_a_refusal_the_speaker_keeps_is_the_clients():
    routing = Routing()
    served = routing.serve(routing.call())
    routing.upstreams["first"].last.respond(FakeResponse(400, {}, b"your fault"))
    assert served.called and routing.channel.body == b"your fault"
    assert routing.upstreams["second"].requests == []


def test_a_lone_target_that_gives_up_raises_its_gateway_error():
    routing = Routing()
    call = routing.call(targets=("first",))
    served = routing.serve(call)
    routing.upstreams["first"].last.refuse()
    failure = []
    served.addErrback(failure.append)
    assert failure[0].check(GatewayError) and failure[0].value.kind == errors.UPSTREAM_UNAVAILABLE


def test_a_stream_commits_at_its_first_token_and_relays_the_speakers_events():
    routing = Routing()
    call = routing.call(FakeCall(stream=True))
    served = routing.serve(call)
    response = routing.upstreams["first"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    assert routing.channel.written == []  # nothing before the first token
    response.send(b": a comment\n\n")
    assert routing.channel.written == []
    response.send(b"data: Hello\n\n")
    assert b"data: Hello" in routing.channel.body
    response.send(b"data: END\n\n")
    response.finish()
    assert served.called
    assert call.transcript.text == "Hello" and call.transcript.finished


def test_a_silent_first_token_is_a_failed_attempt_and_the_next_target_serves():
    routing = Routing()
    served = routing.serve(routing.call(FakeCall(stream=True)))
    routing.upstreams["first"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    routing.clock.advance(5)  # first_token_timeout
    second = routing.upstreams["second"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    second.send(b"data: Hi\n\ndata: END\n\n")
    second.finish()
    assert served.called and b"data: Hi" in routing.channel.body


def test_a_broken_stream_is_resumed_from_the_text_sent_with_the_speakers_prefill():
    routing = Routing()
    call = routing.call(FakeCall(stream=True), targets=("second",))
    served = routing.serve(call)
    first = routing.upstreams["second"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    first.send(b"data: Hello\n\n")
    first.fail("connection reset")
    resumed = routing.upstreams["second"].last
    assert json.loads(resumed.body) == {"model": "model-second", "prefill": "Hello"}
    rest = resumed.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    rest.send(b"data: world\n\ndata: END\n\n")
    rest.finish()
    assert served.called
    assert call.transcript.text == "Helloworld"
    assert call.ctx.completion.resumed == 1


def test_a_stream_broken_for_good_ends_with_the_speakers_error_event_and_no_end():
    routing = Routing(resume_second=False)
    call = routing.call(FakeCall(stream=True), targets=("second",))
    served = routing.serve(call)
    response = routing.upstreams["second"].last.respond(FakeResponse(200, {b"content-type": b"text/event-stream"}))
    response.send(b"data: Hello\n\n")
    response.fail("connection reset")
    failure = []
    served.addErrback(failure.append)
    assert failure and failure[0].check(AnswerCutShort)
    assert b"event: fake-error\ndata: stream_broken" in routing.channel.body
    assert routing.channel.aborted and not routing.channel.finished
    assert call.ctx.outcome == "stream_broken"


def test_a_streams_backend_headers_are_let_go_once_relayed_but_its_content_type():
    routing = Routing(resume_second=False)
    call = routing.call(FakeCall(stream=True), targets=("second",))
    routing.serve(call)
    headers = {b"content-type": b"text/event-stream", b"x-backend-trace": b"t" * 500, b"openai-processing-ms": b"12"}
    response = routing.upstreams["second"].last.respond(FakeResponse(200, headers))
    response.send(b"data: Hello\n\n")
    assert b"x-backend-trace: " + b"t" * 500 in b"".join(routing.channel.written).lower()
    assert response.headers == [(b"content-type", b"text/event-stream")]


def test_a_call_whose_client_left_tries_nothing_more():
    routing = Routing(first_retries=3)
    call = routing.call(targets=("first", "second"))
    served = routing.serve(call)
    call.request.gone = True  # the data plane's word: the connection ended
    routing.upstreams["first"].last.respond(FakeResponse(503, {}, b"down"))
    routing.clock.advance(10)
    assert len(routing.upstreams["first"].requests) == 1
    assert routing.upstreams["second"].requests == []
    assert served.called


def test_the_bodies_made_for_translated_targets_go_when_the_answer_starts():
    # A Claude target is sent the chat call translated, made once for every attempt
    # before the answer; once the answer started no attempt needs it (a resume makes
    # its own, with its prefill), and a stream of minutes would hold its prompt.
    import tracemalloc

    from txgateway.daemon.service import every_speaker
    from txgateway.openai.wire import OpenAICall

    clock = Clock()
    config = parse_config("[service:claude]\nurl = http://claude.test\napi = anthropic\nmax_tokens = 100\n", "test.ini", {})
    routes = build_routes(config, clock, lambda service, url: FakeUpstream(url), structlog.get_logger("test"), GatewayMetrics(clock))
    prompt = "context " * 125_000
    raw = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}).encode()
    request = IncomingRequest(FakeChannel(), b"POST", b"/v1/chat/completions", [], raw)
    ctx = RequestContext("req-1", "127.0.0.1", 0.0, structlog.get_logger("test"))
    target = Target(routes["claude"], "claude-model")
    call = Call.of(request, ctx, b"/chat/completions", [target], every_speaker(), OpenAICall.parse(raw, b"/chat/completions"))
    tracemalloc.start()
    try:
        assert call.untranslatable() == []
        made = tracemalloc.get_traced_memory()[0]
        call.answer_started()
        let_go = made - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert let_go > 900_000
    resumed = json.loads(call.body_for(target, prefill="Once upon"))
    assert resumed["messages"][0]["content"][0]["text"] == prompt and resumed["messages"][-1]["role"] == "assistant"


def test_a_stream_is_resumable_only_where_one_of_its_targets_resumes():
    routing = Routing(resume_second=False)
    assert not routing.call(FakeCall(stream=True), targets=("first", "second")).transcript.resumable
    routing = Routing()
    assert routing.call(FakeCall(stream=True), targets=("first", "second")).transcript.resumable
    assert not routing.call(FakeCall(stream=True), targets=("first",)).transcript.resumable
