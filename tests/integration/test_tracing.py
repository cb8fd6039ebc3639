"""
OpenTelemetry export from the running daemon to a collector on loopback:
an OTLP/HTTP receiver that decodes the real protobuf
(C{opentelemetry-proto}); then the collector goes away under traffic and
every request is still answered at once.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.integration.conftest import DAEMON_HEAD, free_port, request, wait_until
from tests.integration.test_openai_sdk import OpenAIBackend

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


def attributes(span) -> dict:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = value.string_value if value.HasField("string_value") else value.int_value
    return values


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
        wait_until(lambda: len(collector.spans) == 1, timeout=10)
        [(service, span, headers)] = collector.spans
        assert service == "gw-under-test" and headers["x-honeycomb-team"] == "secret-team-key"
        assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent and span.kind == span.SPAN_KIND_SERVER
        values = attributes(span)
        assert values["txgateway.request_id"] == answer.headers["X-Request-ID"]
        assert values["http.response.status_code"] == 200 and values["url.path"] == "/v1/chat/completions"
        assert (values["gen_ai.operation.name"], values["gen_ai.request.model"], values["gen_ai.response.model"]) == (
            "chat", "chat", "plain-model")
        assert (values["gen_ai.usage.input_tokens"], values["gen_ai.usage.output_tokens"], values["gen_ai.request.max_tokens"]) == (
            2, 60, 100)
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
