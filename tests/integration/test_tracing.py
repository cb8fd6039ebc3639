"""
OpenTelemetry export from the running daemon to a collector on loopback:
an OTLP/HTTP receiver that decodes the real protobuf
(C{opentelemetry-proto}); the official C{openai} client's streamed calls
that fall back and are resumed, each attempt a span whose id is the
parent the backend was sent; then the collector goes away under traffic
and every request is still answered at once.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.conftest import DAEMON_HEAD, free_port, request, wait_until
from tests.integration.test_openai_sdk import FULL, OpenAIBackend

pytestmark = pytest.mark.integration


class Collector:
    """An OTLP/HTTP trace receiver: every span it was sent, decoded."""

    def __init__(self) -> None:
        self.spans: list = []
        spans = self.spans

        class Receiver(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                assert self.headers["Content-Type"] == "application/x-protobuf"
                decoded = ExportTraceServiceRequest.FromString(body)
                for resource in decoded.resource_spans:
                    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                    for scope in resource.scope_spans:
                        spans.extend((service, span, dict(self.headers)) for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Receiver)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind)


def attributes(span) -> dict:
    return {attribute.key: _value(attribute.value) for attribute in span.attributes}


def events(span) -> list[tuple[str, dict]]:
    return [(event.name, {a.key: _value(a.value) for a in event.attributes}) for event in span.events]


def traces(collector: Collector, count: int) -> dict[str, list]:
    """The spans of C{count} requests, by trace id, once each request's spans have all arrived (server span first)."""
    def whole() -> bool:
        servers = [span for _, span, _ in collector.spans if span.kind == span.SPAN_KIND_SERVER]
        return len(servers) >= count and all(
            sum(1 for _, other, _ in collector.spans if other.trace_id == server.trace_id) == 1 + attributes(server)["txgateway.attempts"]
            for server in servers
        )
    wait_until(whole, timeout=10)
    by_trace: dict[str, list] = {}
    for _, span, _ in sorted(collector.spans, key=lambda item: item[1].kind != item[1].SPAN_KIND_SERVER):
        by_trace.setdefault(span.trace_id.hex(), []).append(span)
    return by_trace


def test_each_request_is_a_server_span_with_the_genai_attributes_and_a_lost_collector_costs_nothing(start_gateway, tmp_path):
    backend = OpenAIBackend(tmp_path)
    collector = Collector()
    try:
        gateway = start_gateway(DAEMON_HEAD + f"""[tracing]
otlp_endpoint = http://127.0.0.1:{collector.port}/v1/traces
otlp_headers = x-honeycomb-team=secret-team-key
service_name = gw-under-test
timeout = 1
[service:cloud]
url = {backend.url}
retries = 0
[model:chat]
targets = cloud:plain-model
""")
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"model": "chat", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi there"}]}).encode()
        answer = request(gateway.port, "POST", "/v1/chat/completions", body=body, headers={
            "Content-Type": "application/json", "traceparent": f"00-{trace_id}-{parent}-01"})
        assert answer.status == 200
        wait_until(lambda: len(collector.spans) == 2, timeout=10)
        [(service, span, headers), (_, attempt, _)] = sorted(collector.spans, key=lambda item: item[1].kind)
        assert attempt.kind == attempt.SPAN_KIND_CLIENT and attempt.parent_span_id == span.span_id
        assert service == "gw-under-test" and headers["x-honeycomb-team"] == "secret-team-key"
        assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent and span.kind == span.SPAN_KIND_SERVER
        values = attributes(span)
        assert values["txgateway.request_id"] == answer.headers["X-Request-ID"]
        assert values["http.response.status_code"] == 200 and values["url.path"] == "/v1/chat/completions"
        assert (values["gen_ai.operation.name"], values["gen_ai.request.model"], values["gen_ai.response.model"]) == (
            "chat", "chat", "plain-model")
        assert (values["gen_ai.usage.input_tokens"], values["gen_ai.usage.output_tokens"], values["gen_ai.request.max_tokens"]) == (
            2, 60, 100)
        assert (values["gen_ai.response.id"], values["gen_ai.response.finish_reasons"], values["gen_ai.request.stream"]) == (
            "chatcmpl-fake", ["stop"], False)
        assert "gen_ai.response.time_to_first_chunk" not in values  # for streams only
        [sent] = backend.calls()["plain-model"]["traceparents"]
        assert sent == f"00-{trace_id}-{attempt.span_id.hex()}-01"
        assert "secret-team-key" not in (gateway.log_file.read_text())
        collector.stop()
        took = []
        for _ in range(30):
            started = time.monotonic()
            assert request(gateway.port, "POST", "/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json"}).status == 200
            took.append(time.monotonic() - started)
        assert max(took) < 0.5  # the export's failures never reach a request
        wait_until(lambda: "txgateway_spans_dropped_total 0.0" not in gateway.request("GET", "/metrics").body.decode(), timeout=15)
        gateway.logged("spans_export_failed")
    finally:
        backend.process.stop()


def test_the_official_client_s_fallback_and_resume_are_spans_whose_ids_the_backends_received(start_gateway, tmp_path):
    openai = pytest.importorskip("openai")
    backend = OpenAIBackend(tmp_path)
    collector = Collector()
    try:
        common = "retries = 0\nresume = prefill\nfirst_token_timeout = 2\nidle_timeout = 2\n"
        gateway = start_gateway(DAEMON_HEAD + f"""[tracing]
otlp_endpoint = http://127.0.0.1:{collector.port}/v1/traces
[service:cloud]
url = {backend.url}
{common}
[service:local]
url = {backend.url}
{common}
[model:busy]
targets = cloud:status-503, local:local-model
[model:cut]
targets = cloud:cut40, local:local-model
""")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0)
        texts = {}
        for model in ("busy", "cut"):
            stream = client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": "say sixty words"}],
            )
            texts[model] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert texts == {"busy": FULL, "cut": FULL}

        calls = backend.calls()
        by_trace = traces(collector, 2)
        fallen, resumed = sorted(by_trace.values(), key=lambda spans: attributes(spans[0])["gen_ai.request.model"])

        # The fallback: a 503 from the first target, then the second's stream.
        server, first, second = fallen
        assert [span.parent_span_id for span in (first, second)] == [server.span_id] * 2
        one, two = attributes(first), attributes(second)
        assert (one["http.response.status_code"], one["txgateway.service"], one["gen_ai.request.model"], one["error.type"]) == (
            503, "cloud", "status-503", "503")
        assert (two["txgateway.outcome"], two["txgateway.service"], two["gen_ai.request.model"]) == ("answered", "local", "local-model")
        assert (one["server.address"], one["server.port"]) == ("127.0.0.1", backend.port)
        assert first.status.code == first.status.STATUS_CODE_ERROR and second.status.code != second.status.STATUS_CODE_ERROR
        trace_id = server.trace_id.hex()
        assert calls["status-503"]["traceparents"] == [f"00-{trace_id}-{first.span_id.hex()}-01"]
        assert calls["local-model"]["traceparents"] == [f"00-{trace_id}-{second.span_id.hex()}-01"]
        values = attributes(server)
        assert [name for name, _ in events(server)] == ["fallback", "commit_point"]
        assert events(server)[0][1]["txgateway.gave_up"] == "cloud:status-503"
        assert (values["gen_ai.response.model"], values["gen_ai.usage.input_tokens"], values["gen_ai.usage.output_tokens"]) == (
            "local-model", 3, 60)
        assert values["gen_ai.request.stream"] is True and values["gen_ai.response.finish_reasons"] == ["stop"]
        assert 0 < values["gen_ai.response.time_to_first_chunk"] < 2
        assert first.start_time_unix_nano <= first.end_time_unix_nano <= second.start_time_unix_nano
        assert server.start_time_unix_nano <= first.start_time_unix_nano and second.end_time_unix_nano <= server.end_time_unix_nano

        # The resume: the first stream broke after 40 words, the same target went on from them.
        server, broken, going_on = resumed
        one, two = attributes(broken), attributes(going_on)
        assert (one["txgateway.outcome"], two["txgateway.outcome"], two["txgateway.resume"]) == ("stream_broke", "answered", True)
        assert broken.end_time_unix_nano <= going_on.start_time_unix_nano
        trace_id = server.trace_id.hex()
        assert calls["cut40"]["traceparents"] == [
            f"00-{trace_id}-{broken.span_id.hex()}-01", f"00-{trace_id}-{going_on.span_id.hex()}-01",
        ]
        assert [name for name, _ in events(server)] == ["commit_point", "stream_broke", "commit_point", "stream_resumed"]
        values = attributes(server)
        # What the backends reported: the broken stream never got to its usage; the resume's is its 20 words.
        assert (values["gen_ai.usage.output_tokens"], values["gen_ai.response.id"]) == (20, "chatcmpl-fake")
        for spans in (fallen, resumed):
            for span in spans:
                assert not {key for key in attributes(span) if "prompt" in key or "content" in key or "message" in key}
    finally:
        collector.stop()
        backend.process.stop()
