"""
L{Call}: what one client request carries through the broker (its context,
the request, the path sent on, its targets, its deadline, the model
request read from its body and the transcript of its stream), one value
passed from part to part instead of a dozen parameters.  A call in one
API to a target of the other (OpenAI's chat completions, Anthropic's
Messages) is translated here: its path, body and headers, and the reader
and writer of its answer (L{Call.speaking}).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Union

import attrs

from txgateway.anthropic.translate import (
    ChatToMessagesStream,
    MessagesToChatStream,
    Untranslatable,
    chat_answer_to_message,
    chat_error_to_anthropic,
    chat_request_to_messages,
    message_answer_to_chat,
    messages_error_to_chat,
    messages_request_to_chat,
)
from txgateway.anthropic.wire import ANTHROPIC, MessagesCall, MessagesStreamReader, read_message
from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.headers import request_headers_for_upstream
from txgateway.dataplane.server import IncomingRequest
from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.openai.relays import Transcript
from txgateway.openai.wire import CHAT, AnswerFacts, ChunkFacts, OpenAICall, encode_json, read_answer, read_chunk
from txgateway.routing.model import Target

__all__ = ["Call", "Speaking", "Untranslatable"]

#: A request the gateway reads: OpenAI's or Anthropic's.
ModelCall = Union[OpenAICall, MessagesCall]

#: Headers of one API a backend of the other never gets.
_ANTHROPIC_HEADERS = (b"anthropic-version", b"anthropic-beta", b"x-api-key")


@attrs.frozen
class Speaking:
    """
    How a call is spoken to one target, and its answer read back: whether
    it is translated, the reader of the target's stream events, the writer
    of those events in the client's API (L{None}: relayed as they are),
    the reader of a JSON answer, and the translations of a JSON answer and
    an error answer (L{None}: relayed as they are).
    """

    translated: bool
    #: A new reader of the target's stream (C{after_space}: see L{MessagesStreamReader}).
    read_event: Callable[[bool], Callable[[bytes], ChunkFacts]]
    read_answer: Callable[[bytes], AnswerFacts]
    write_events: Any = None
    translate_answer: Callable[[bytes], bytes] | None = None
    translate_error: Callable[[int, bytes], bytes] | None = None


def _read_chunks(after_space: bool = False) -> Callable[[bytes], ChunkFacts]:
    return read_chunk  # an OpenAI backend continues a prefill as it is, whitespace and all


_NATIVE_OPENAI = Speaking(False, _read_chunks, read_answer)
_NATIVE_ANTHROPIC = Speaking(False, MessagesStreamReader, read_message)


@attrs.define(eq=False)
class Call:
    """
    One client request on its way to a backend.

    @ivar path: the path and query sent on (checked), joined to each
        endpoint's base path.
    @ivar targets: where it may be served, in order (a service and its
        fallbacks, or a model's targets).
    @ivar model_call: the model request read from the body (OpenAI's or a
        Messages request), when the gateway reads it (its model is
        rewritten per target, and it is translated for a target of the
        other API).
    @ivar deadline_at: the clock time after which no attempt starts (the
        first target's C{deadline} from when the chain began serving it).
    @ivar transcript: what the client was sent of a streamed completion, for a resume.
    """

    request: IncomingRequest
    ctx: RequestContext
    path: bytes
    targets: list[Target]
    model_call: ModelCall | None = None
    transcript: Transcript | None = None
    deadline_at: float = math.inf
    #: The body each translated target is sent (by the target's id), made
    #: once; L{None} until a target needs one (most calls never do).
    _translated: dict | None = None
    #: How the call is spoken to a target of the other API (made once: its
    #: stream writer serves every attempt that continues the answer).
    _translated_speaking: Speaking | None = None
    #: The path is sent as the client gave it to a target of its own API
    #: (C{/api/<service>/...}), not as the model routes' endpoint.
    as_sent: bool = False
    #: The completion tokens its key reserved, past which a stream of this
    #: call is cut (L{None}: not bounded, no governed key).
    completion_reserved: int | None = None

    @classmethod
    def of(
        cls,
        request: IncomingRequest,
        ctx: RequestContext,
        path: bytes,
        targets: list[Target],
        model_call: ModelCall | None = None,
        as_sent: bool = False,
    ) -> "Call":
        """
        A call of C{request} to C{targets} (its deadline starts when the
        chain serves it); a model call's facts start on C{ctx} here.
        """
        transcript = None
        if model_call is not None:
            ctx.completion = CompletionFacts(
                requested_model=model_call.model, operation=model_call.operation(path), max_tokens=model_call.max_tokens,
                stream=model_call.stream,
            )
            if model_call.stream:
                transcript = Transcript(model_call.resumable_kind)
        return cls(request, ctx, path, targets, model_call, transcript, as_sent=as_sent)

    @property
    def idempotency_key(self) -> bool:
        """The client sent an C{Idempotency-Key}: the request may be sent again after a silence."""
        return self.request.header(b"idempotency-key") is not None

    def translates_for(self, target: Target) -> bool:
        """Whether C{target} speaks the other API than the client's (the call is translated)."""
        return self._translated_to(target.route.config.api)

    def _translated_to(self, api: str) -> bool:
        model_call = self.model_call
        return model_call is not None and api != model_call.dialect

    def untranslatable(self) -> list[tuple[Target, str]]:
        """
        The targets this call cannot be translated for, and why; the
        others have their translated body made (once) here.
        """
        refused = []
        for target in self.targets:
            if not self.translates_for(target):
                continue
            if self._translated is None:
                self._translated = {}
            try:
                self._translated[id(target)] = encode_json(self._translation(target, None))
            except Untranslatable as error:
                refused.append((target, str(error)))
        return refused

    def _translation(self, target: Target, prefill: str | None) -> dict:
        model_call, model = self.model_call, target.model or self.model_call.model
        if model_call.dialect == ANTHROPIC:
            return messages_request_to_chat(model_call.body, model, prefill)
        if model_call.kind != CHAT:
            raise Untranslatable(f"Anthropic's API has no {model_call.operation(self.path)!r} endpoint")
        return chat_request_to_messages(model_call.body, model, target.route.config.max_tokens, prefill)

    def completion_floor(self) -> int:
        """
        The most completion tokens a target of the other API is sent when
        the request names none (an OpenAI request translated for Claude
        carries the service's C{max_tokens}): what its reservation must cover.
        """
        model_call = self.model_call
        if model_call is None or model_call.max_tokens is not None:
            return 0
        return max(
            (target.route.config.max_tokens for target in self.targets
             if target.route.config.api == ANTHROPIC and self.translates_for(target)),
            default=0,
        )

    def body_for(self, target: Target, prefill: str | None = None) -> bytes:
        """The body sent to C{target} (the model renamed, translated, the text so far as a prefill)."""
        model_call = self.model_call
        if model_call is None:
            return self.request.body
        if self.translates_for(target):
            if prefill is None and self._translated is not None and id(target) in self._translated:
                return self._translated[id(target)]
            return encode_json(self._translation(target, prefill))
        return model_call.body_for(target.model, prefill=prefill)

    def path_for(self, target: Target, base_path: bytes) -> bytes:
        """
        The path (and query) sent to C{target}'s endpoint whose URL's path
        is C{base_path}: its API's own for a translated call.  An Anthropic
        endpoint may be given with or without C{/v1} (as C{ANTHROPIC_BASE_URL}
        is): without, C{/v1} is added.
        """
        if self.model_call is None:
            return self.path
        api = target.route.config.api
        path = self.path
        translated = self._translated_to(api)
        if translated:
            # The other API's endpoint; the client's query (Anthropic's ?beta=true) is its own API's.
            path = b"/messages" if api == ANTHROPIC else b"/chat/completions"
        elif self.as_sent:
            return path
        if api == ANTHROPIC and not base_path.endswith(b"/v1"):
            path = b"/v1" + path
        return path

    def speaking(self, target: Target) -> Speaking:
        """How this call is spoken to C{target}, and how its answer is read and written back."""
        api = target.route.config.api
        if not self.translates_for(target):
            return _NATIVE_ANTHROPIC if api == ANTHROPIC else _NATIVE_OPENAI
        if self._translated_speaking is None:
            self._translated_speaking = self._speaking_translated_to(api)
        return self._translated_speaking

    def _speaking_translated_to(self, api: str) -> Speaking:
        model_call = self.model_call
        if api == ANTHROPIC:  # an OpenAI client, a Messages backend
            created = int(self.ctx.started_at)
            writer = MessagesToChatStream(created, model_call.client_wants_usage) if model_call.stream else None
            return Speaking(
                True, MessagesStreamReader, read_message, writer,
                lambda body: message_answer_to_chat(body, created), messages_error_to_chat,
            )
        # A Messages client, an OpenAI backend.
        stops = model_call.body.get("stop_sequences")
        stops = tuple(stop for stop in stops if isinstance(stop, str)) if isinstance(stops, list) else ()
        return Speaking(
            True, _read_chunks, read_answer, ChatToMessagesStream(stops) if model_call.stream else None,
            lambda body: chat_answer_to_message(body, stops), chat_error_to_anthropic,
        )

    def _clients_key(self, withheld: tuple[bytes, ...]) -> bytes | None:
        """The key the client sent in its own API's header (L{None}: none, or it is the gateway's, withheld)."""
        if self.model_call.dialect == ANTHROPIC:
            key = self.request.header(b"x-api-key")
            return key.strip() if key and b"x-api-key" not in withheld else None
        scheme, _, token = (self.request.header(b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip() or b"authorization" in withheld:
            return None
        return token.strip()

    def headers_for(self, config: ServiceConfig, span_id: str | None = None) -> list[tuple[bytes, bytes]]:
        """
        The headers the request carries to C{config}'s service (its trace
        context naming the attempt's span C{span_id} as the parent, when the
        attempt has one).
        """
        ctx = self.ctx
        extra = ctx.trace.headers(span_id) if ctx.trace is not None else []
        # The gateway's own API key stays here unless the service asks for it.
        withheld: tuple[bytes, ...] = ctx.caller.withheld if ctx.caller is not None and not config.forward_api_key else ()
        translated = self._translated_to(config.api)
        # The backend's key, in place of whatever the client sent; without
        # one, a translated call carries the client's own key in the
        # backend's API's header.
        key = config.api_key.encode("ascii") if config.api_key else (self._clients_key(withheld) if translated else None)
        if config.api == ANTHROPIC:
            if key is not None:
                extra.append((b"x-api-key", key))
                withheld += (b"authorization",)
            if translated or self.request.header(b"anthropic-version") is None:
                extra.append((b"anthropic-version", config.anthropic_version.encode("ascii")))
        else:
            if key is not None:
                extra.append((b"Authorization", b"Bearer " + key))
            if translated:
                withheld += _ANTHROPIC_HEADERS
        if config.reads_answers:
            # The gateway reads these answers as they pass: no compression.
            extra.append((b"Accept-Encoding", b"identity"))
        return request_headers_for_upstream(self.request, ctx.request_id, ctx.client, extra=extra, withheld=withheld)
