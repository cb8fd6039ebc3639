"""
OpenAI's API as the gateway speaks it (L{OPENAI}), and its speaker to
OpenAI targets (L{OpenAIToOpenAI}); also L{Speaker}, the part every
speaker shares: the client's key moved to the target's API when the call
is translated, a refusal read by OpenAI's rules (which know Claude's words
too), and the relays made from a speaker's readers and writers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from zope.interface import implementer

from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.relay import BodyRelay
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import ErrorKind, error_body
from txgateway.openai.relays import EventStreamRelay, JsonAnswerRelay, TranslatedAnswerRelay
from txgateway.openai.wire import (
    NEXT_TARGET,
    AnswerFacts,
    ChunkFacts,
    OpenAICall,
    after_refusal,
    closing_events,
    error_codes,
    model_call_path,
    read_answer,
    read_chunk,
)
from txgateway.speaking import FIRST_BYTE, FIRST_TOKEN, WHOLE_ANSWER, AnswerReading, IApi, ISpeaker, PlainHttp

__all__ = ["OPENAI", "OpenAIApi", "OpenAIToOpenAI", "PAIRS", "Speaker"]

#: OpenAI's API, by the name a service's C{api} gives it.
OPENAI_API = "openai"


@implementer(IApi)
class OpenAIApi(PlainHttp):
    """OpenAI's API: its model calls (chat and text completions, embeddings); its key as a plain service's, a bearer token."""

    name = OPENAI_API
    title = "OpenAI's API"
    service_api = OPENAI_API

    def read_call(self, rest: bytes, body: bytes, reading: Any) -> OpenAICall | None:
        """The OpenAI request a C{POST} to C{rest} makes, or L{None} for a path that is no model call."""
        if not model_call_path(rest):
            return None
        return OpenAICall.parse(body, rest, reading)

    def model_call_path(self, rest: bytes) -> bool:
        """Chat and text completions, embeddings."""
        return model_call_path(rest)


#: The one L{OpenAIApi}.
OPENAI = OpenAIApi()


def _read_chunks(after_space: bool = False) -> Callable[[bytes], ChunkFacts]:
    return read_chunk  # an OpenAI backend continues a prefill as it is, whitespace and all


class Speaker:
    """
    What every speaker shares.  A subclass sets the pair's names, its
    target's L{IApi} (C{target}), and its parts: a new reader of the
    target's stream events (C{read_events}, given whether the text so far
    ends in whitespace), the reader of its JSON answer (C{read_answer}),
    and, for a translated call, the writer of stream events in the
    client's API (C{write_events}) and the translations of a JSON answer
    and an error answer.
    """

    #: Chat completions and Messages go on from an assistant prefill.
    takes_prefill = True

    client_api = OPENAI_API
    target_api = OPENAI_API
    translated = False
    target: IApi = OPENAI
    #: Client headers of the client's own API a target of the other never gets.
    own_headers: tuple[bytes, ...] = ()
    read_events: Callable[[bool], Callable[[bytes], ChunkFacts]] = staticmethod(_read_chunks)
    read_answer: Callable[[bytes], AnswerFacts] = staticmethod(read_answer)
    write_events: Any = None
    answer_headers: tuple = ()
    translate_answer: Callable[[bytes], bytes] | None = None
    translate_error: Callable[[int, bytes], bytes] | None = None

    def __init__(self, call: Any, path: bytes = b"", started_at: float = 0.0) -> None:
        self.call = call

    @property
    def forwards_usage(self) -> bool:
        """The stream's usage event goes to the client (it asked, or a translation writes its own)."""
        return self.translated or self.call.client_wants_usage

    def clients_key(self, request: IncomingRequest, withheld: tuple[bytes, ...]) -> bytes | None:
        """The key the client sent in its API's header (L{None}: none, or it is the gateway's, withheld)."""
        scheme, _, token = (request.header(b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip() or b"authorization" in withheld:
            return None
        return token.strip()

    def headers(
        self, request: IncomingRequest, config: ServiceConfig, withheld: tuple[bytes, ...]
    ) -> tuple[list, tuple[bytes, ...]]:
        """
        The backend's key in place of whatever the client sent; without
        one, a translated call carries the client's own key in the
        target's API's header.
        """
        key = config.api_key.encode("ascii") if config.api_key else (
            self.clients_key(request, withheld) if self.translated else None
        )
        extra, kept_back = self.target.credentials(request, config, key, self.translated)
        if self.translated:
            kept_back += self.own_headers
        return extra, withheld + kept_back

    def completion_floor(self, config: ServiceConfig) -> int:
        """A target of the client's own API is sent what the client asked: no floor."""
        return 0

    def answer_relay(self, code: int, event_stream: bool, reading: AnswerReading) -> tuple[BodyRelay, str] | None:
        """
        A completion stream's relay (committed at its first token), a JSON
        answer's (its usage read as it passes; translated whole when the
        pair translates), or a translated error's; L{None}: bytes as they are.
        """
        if code == 200:
            transcript = reading.transcript
            if transcript is not None and event_stream:
                reader = self.read_events(reading.resumed and transcript.text[-1:].isspace())
                reserved = reading.completion_reserved
                relay = EventStreamRelay(
                    reading.clock, reading.idle_timeout, transcript, reading.on_usage, self.forwards_usage,
                    reading.resumed, reader, self.write_events, reserved,
                    None if reserved is None else getattr(reader, "closing_events", closing_events),
                )
                return relay, FIRST_TOKEN
            on_answer, read = reading.on_answer, self.read_answer
            if self.translate_answer is not None:
                relay = TranslatedAnswerRelay(
                    reading.clock, reading.idle_timeout, self.translate_answer, lambda body: on_answer(read(body))
                )
                return relay, WHOLE_ANSWER
            return JsonAnswerRelay(reading.clock, reading.idle_timeout, on_answer, read), FIRST_BYTE
        if self.translate_error is not None:
            relay = TranslatedAnswerRelay(reading.clock, reading.idle_timeout, functools.partial(self.translate_error, code))
            return relay, WHOLE_ANSWER
        return None

    def refusal_body_needed(self, code: int) -> bool:
        """A 400's body says whether another target may do better (a context length exceeded)."""
        return code == 400

    def refusal_moves_on(self, code: int, body: bytes | None) -> str | None:
        """401, 403, 404 and a context length exceeded move on; a content filter and other 4xx do not."""
        if after_refusal(code, body) != NEXT_TARGET:
            return None
        if not body:
            return f"status {code}"
        codes, _ = error_codes(body)
        return f"status {code} ({', '.join(sorted(codes)) or 'no code'})"

    def broken_event(self, kind: ErrorKind, message: str, request_id: str) -> bytes:
        """The gateway's error shape as one SSE C{error} event (an OpenAI SDK raises it)."""
        return b"event: error\ndata: " + error_body(kind, message, request_id) + b"\n\n"


@implementer(ISpeaker)
class OpenAIToOpenAI(Speaker):
    """An OpenAI call to an OpenAI target: sent as it is, its model renamed, its stream's usage asked for."""

    def path(self, path: bytes, base_path: bytes, as_sent: bool) -> bytes:
        """The client's path, under the endpoint's base."""
        return path

    def body(self, config: ServiceConfig, model: str | None, prefill: str | None) -> bytes:
        """The client's body, the model renamed, the text so far as a last assistant message."""
        return self.call.body_for(model, prefill=prefill)


#: The speakers this package provides, by (client API, target API).
PAIRS = {(OPENAI_API, OPENAI_API): OpenAIToOpenAI}
