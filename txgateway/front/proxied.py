"""
The proxied paths: C{/api/<service>/...}, OpenAI's C{/v1/...} and
Anthropic's C{/v1/messages}.  The front sends them here without URL
matching (the hot path); here the API key is checked, the service or
model found, and the broker called.
"""

from __future__ import annotations

import datetime
import json
import zlib
from typing import Any, Awaitable, Callable, Coroutine
from urllib.parse import parse_qsl, unquote_to_bytes

from txgateway import errors
from txgateway.bodies import BodyReading
from txgateway.config.gateway import ANY_MODEL
from txgateway.dataplane.server import IncomingRequest
from txgateway.errors import GatewayError
from txgateway.front.answers import answer_error
from txgateway.front.auth import AmbiguousCredentials, KeyDisabled
from txgateway.front.gateway import Gateway
from txgateway.governance.estimate import estimate_prompt_tokens
from txgateway.anthropic.wire import ANTHROPIC, MessagesCall
from txgateway.observability.context import RequestContext
from txgateway.openai.wire import BadCall, OpenAICall, encode_json
from txgateway.responses.wire import ResponsesCall
from txgateway.routing.broker import AnswerCutShort, refuse_unless_json
from txgateway.routing.paths import UnsafePath, split_api_path

__all__ = ["HeldTurn", "ProxiedRequests"]


def _model_object(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "txgateway"}


def _anthropic_model_object(name: str, created: int) -> dict:
    created_at = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"type": "model", "id": name, "display_name": name, "created_at": created_at}


#: Responses request fields the gateway refuses by name, and why.
_NOT_SERVED = {
    "background": "background responses are not run; send the call without it (and stream it for a long one)",
    "conversation": "the Conversations API is not served; go on from a response with previous_response_id",
}

#: The C{Content-Encoding}s of a request body the gateway decodes (zlib's window bits for each).
_DECODED = {b"gzip": 16 + zlib.MAX_WBITS, b"x-gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}


def _decoded(request: IncomingRequest, limit: int) -> None:
    """
    A body in a C{Content-Encoding} (Codex compresses its requests) decoded
    in place, within C{limit} bytes after decoding, so that it is read as
    what it is, never as if it were JSON.

    @raise GatewayError: 415 for an encoding the gateway does not decode
        (C{zstd}, C{br}), 413 past the limit, 400 for a body that does not decode.
    """
    encoding = (request.header(b"content-encoding") or b"").strip().lower()
    if encoding in (b"", b"identity"):
        return
    bits = _DECODED.get(encoding)
    if bits is None:
        raise GatewayError(
            errors.UNSUPPORTED_MEDIA_TYPE,
            f"a body in Content-Encoding {encoding.decode('latin-1')[:20]!r} is not decoded by this gateway: "
            "send it uncompressed, or in gzip",
        )
    decompressor = zlib.decompressobj(bits)
    try:
        body = decompressor.decompress(request.body, limit + 1)
    except zlib.error as error:
        raise GatewayError(errors.BAD_REQUEST, f"the {encoding.decode()} body does not decode: {error}") from None
    if len(body) > limit or decompressor.unconsumed_tail:
        raise GatewayError(errors.BODY_TOO_LARGE, f"the body is over {limit} bytes once decoded")
    if not decompressor.eof:
        raise GatewayError(errors.BAD_REQUEST, f"the {encoding.decode()} body is cut short")
    request.replace_body(body, b"content-encoding")


def _estimated_tokens(request: IncomingRequest, ctx: RequestContext, path: bytes, body: dict, now: float) -> None:
    """
    A token count (C{POST /v1/responses/input_tokens},
    C{/v1/messages/count_tokens}) for a model whose first target does not
    speak the client's API: the gateway's estimate (the one its keys
    reserve by), in the API's shape, said in C{X-Gateway-Token-Count: estimated}.
    """
    ctx.stamp(request, now)
    request.set_header(b"X-Gateway-Token-Count", b"estimated")
    _answer_json(request, {**_TOKEN_COUNTS[path], "input_tokens": estimate_prompt_tokens(body)})


#: The APIs' token counts, each with the fields its answer has beside C{input_tokens}.
_TOKEN_COUNTS = {
    b"/v1/responses/input_tokens": {"object": "response.input_tokens"},
    b"/v1/messages/count_tokens": {},
}


def _answer_json(request: IncomingRequest, body: dict) -> None:
    encoded = json.dumps(body).encode("utf-8")
    request.respond(200, encoded, [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")])


class HeldTurn:
    """
    A turn of a conversation the gateway holds: awaited, it is the
    broker's answer itself (no frame of its own waits above it for as
    long as a stream lasts); once that is written, L{keep} keeps the
    Response its recorder saw (none: C{store: false}), before the answer's end goes out.
    """

    __slots__ = ("_answering", "_conversations", "_body", "_owner", "_chain", "_recorder", "_stream")

    def __init__(
        self, answering: Awaitable[None], conversations: Any, body: dict, owner: str, chain: tuple, recorder: Any, stream: bool,
    ) -> None:
        self._answering = answering
        self._conversations = conversations
        self._body = body
        self._owner = owner
        self._chain = chain
        self._recorder = recorder
        self._stream = stream

    def __await__(self) -> Any:
        return self._answering.__await__()

    def keep(self, request: IncomingRequest) -> Awaitable[None] | None:
        """The answer is all written: keep its Response (L{None}: nothing to keep, or its client left)."""
        request.recorder = None
        if self._recorder is None or request.gone:
            return None
        return self._conversations.keep(self._body, self._owner, self._chain, self._recorder, self._stream)


class ProxiedRequests:
    """The handlers of C{/api/} and C{/v1/} for one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        max_messages = gateway.config.gateway.max_messages
        self._strict_reading = BodyReading(max_messages, strict=True)
        self._fast_reading = BodyReading(max_messages, strict=False)

    def _reading_for(self, ctx: RequestContext) -> BodyReading:
        """How the caller's body is read: strictly for a governed key, else fast; bounded either way."""
        governor = self.gateway.broker.governor
        return self._strict_reading if governor is not None and governor.governs(ctx) else self._fast_reading

    def _authenticated(self, request: IncomingRequest, ctx: RequestContext) -> bool:
        """Whether the caller may go on (with the gateway's API keys on); else it was answered 401."""
        authenticator = self.gateway.authenticator
        if not authenticator.enabled:
            return True
        try:
            caller = authenticator.caller(request)
        except AmbiguousCredentials as error:
            answer_error(request, errors.AMBIGUOUS_CREDENTIALS, f"{error}: send one")
            return False
        except KeyDisabled as error:
            answer_error(request, errors.KEY_DISABLED, f"{error}: its owner or an administrator can turn it on again")
            return False
        if caller is None:
            answer_error(
                request,
                errors.UNAUTHORIZED,
                "a valid API key is needed: Authorization: Bearer <key> or X-API-Key: <key>",
                [(b"WWW-Authenticate", b'Bearer realm="txgateway"')],
            )
            return False
        ctx.identify(caller)
        return True

    def api_request(self, request: IncomingRequest) -> Coroutine[Any, Any, None]:
        """Answer a C{/api/<service>/...} request: its API key, its service, then the broker."""
        return self._served(request, self._api_answer)

    def _api_answer(self, request: IncomingRequest) -> Awaitable[None] | None:
        """What answers an C{/api/} request (the broker's call), or L{None}: it was refused here."""
        ctx: RequestContext = request.context
        # Before the service lookup: a caller without a key learns nothing.
        if not self._authenticated(request, ctx):
            return None
        try:
            service, rest = split_api_path(request.path)
        except UnsafePath as error:
            answer_error(request, errors.NOT_FOUND, str(error))
            return None
        route = self.gateway.broker.routes.get(service)
        if route is None:
            answer_error(request, errors.UNKNOWN_SERVICE, f"no service is named {service!r}")
            return None
        ctx.service = service
        reading = self._reading_for(ctx)
        return self.gateway.broker.proxy(request, ctx, route, rest, request.query, reading)

    async def _served(self, request: IncomingRequest, answer: Callable[[IncomingRequest], Awaitable[Any] | None]) -> None:
        """
        Serve C{request} as C{answer} decides: it answers at once (a
        refusal; L{None}), or gives what answers it, awaited here (a
        L{GatewayError} becomes the error shape).  What it gives may end
        with a L{HeldTurn} (a conversation's turn, once its earlier turns
        are found), awaited here in turn; a L{HeldTurn}'s Response is kept
        before the answer's end goes out.  The only frame a
        request's answer keeps waiting above the broker's, for as long
        as a stream lasts: what decides is done with before it waits.
        """
        try:
            answering = answer(request)  # the broker refuses what it decides against at once
            if answering is None:
                return
            answered = await answering
            if type(answered) is HeldTurn:
                # A turn that goes on from an earlier one, found: what answers it.
                answering = answered
                await answering
            if type(answering) is HeldTurn:
                keeping = answering.keep(request)
                if keeping is not None:
                    await keeping
        except GatewayError as error:
            # The broker's refusal (nothing of an answer was written), in the error shape,
            # which nothing records: no Response to keep (a L{HeldTurn}'s recorder is let go).
            request.recorder = None
            request.context.stamp(request, self.gateway.clock.seconds())
            answer_error(request, error.kind, error.message, error.headers)
        except AnswerCutShort:
            pass

    def openai_request(self, request: IncomingRequest) -> Coroutine[Any, Any, None]:
        """
        Answer C{/v1/...}, OpenAI's API: C{GET /v1/models} (and one model)
        from the configuration, and every C{POST} routed by its body's
        C{model} to that model's targets; C{POST /v1/messages} is
        Anthropic's Messages API, answered in its shapes (errors too).
        """
        return self._served(request, self._openai_answer)

    def _openai_answer(self, request: IncomingRequest) -> Awaitable[None] | None:
        """What answers a C{/v1/} request (the broker's call, a held response, a conversation's turn), or L{None}: it was answered here."""
        ctx: RequestContext = request.context
        path = request.path
        counting = path in _TOKEN_COUNTS
        messages = path in (b"/v1/messages", b"/v1/messages/count_tokens")
        if messages or path.startswith(b"/v1/messages/"):
            ctx.client_api = ANTHROPIC
        if not self._authenticated(request, ctx):
            return None
        if path.startswith(b"/v1/messages/") and not counting:
            # Batches: the Messages API's other endpoints are not served.
            answer_error(request, errors.NOT_FOUND, f"{path.decode('latin-1')} is not served by this gateway")
            return None
        if path == b"/v1/models" or path.startswith(b"/v1/models/"):
            self._models(request, ctx, path)
            return None
        if path.startswith(b"/v1/responses/") and path != b"/v1/responses/input_tokens":
            return self._held_response(request, ctx, path)
        if path == b"/v1/conversations" or path.startswith(b"/v1/conversations/"):
            answer_error(
                request, errors.NOT_FOUND,
                "the Conversations API is not served by this gateway: go on from a response with previous_response_id",
            )
            return None
        if request.method != b"POST":
            if (request.header(b"upgrade") or b"").strip().lower() == b"websocket":
                # Codex asks for its WebSocket transport first (a GET); a 426 sends it to HTTP.
                answer_error(
                    request, errors.UPGRADE_REQUIRED,
                    "this gateway serves the API over HTTP only, not over a WebSocket: send the request over HTTP",
                )
                return None
            answer_error(
                request, errors.METHOD_NOT_ALLOWED,
                f"{request.method.decode('ascii', 'replace')} is not allowed here", [(b"Allow", b"POST")],
            )
            return None
        try:
            _decoded(request, self.gateway.config.gateway.max_body_size)
        except GatewayError as error:
            answer_error(request, error.kind, error.message)
            return None
        governor = self.gateway.broker.governor
        reading = self._reading_for(ctx)
        if reading.strict:
            try:
                refuse_unless_json(request)
            except GatewayError as error:
                answer_error(request, error.kind, error.message)
                return None
        try:
            if messages:
                call = MessagesCall.parse(request.body, reading)
            elif path in (b"/v1/responses", b"/v1/responses/input_tokens"):
                call = ResponsesCall.parse(request.body, reading)
            else:
                call = OpenAICall.parse(request.body, path, reading)
        except BadCall as error:
            api = "a Messages" if messages else ("a Responses" if path == b"/v1/responses" else "an OpenAI")
            answer_error(request, errors.BAD_REQUEST, f"{error}: {api} request is a JSON object with a model")
            return None
        if call.model is None:
            answer_error(request, errors.BAD_REQUEST, "the body has no model: a string naming the model is needed")
            return None
        if governor is not None:
            try:
                governor.check_model(ctx, call.model)
            except GatewayError as error:
                answer_error(request, error.kind, error.message)
                return None
        targets = self.gateway.broker.models.targets_for(call.model)
        if targets is None:
            if not self.gateway.broker.models.models:
                message = "no models are configured: add a [model:NAME] section (or [model:*]) to gateway.ini"
            else:
                message = f"no model is named {call.model!r}"
            answer_error(request, errors.MODEL_NOT_FOUND, message)
            return None
        ctx.service = targets[0].route.config.name
        ctx.model_section = call.model if call.model in self.gateway.broker.models.models else ANY_MODEL
        if counting and targets[0].route.config.speaks(call.api) != call.api:
            # Only a target that speaks the client's API counts its tokens: the others get the gateway's estimate.
            _estimated_tokens(request, ctx, path, call.body, self.gateway.clock.seconds())
            return None
        rest = path[len(b"/v1"):]
        if counting:
            # A count is no model call: its key and model were checked, and it costs nothing.  Only
            # the targets that count in the client's API are asked: a fallback of another API would
            # be sent a translated model call, one that generates.
            counters = [target for target in targets if target.route.config.speaks(call.api) == call.api]
            return self.gateway.broker.proxy_model(request, ctx, call, counters, rest, request.query, reading, uncharged=True)
        if path == b"/v1/responses":
            return self._conversation_turn(request, ctx, call, targets, rest, reading)
        return self.gateway.broker.proxy_model(request, ctx, call, targets, rest, request.query, reading)

    def _conversation_turn(
        self, request: IncomingRequest, ctx: RequestContext, call: ResponsesCall, targets: list, rest: bytes, reading: BodyReading,
    ) -> Awaitable[None] | None:
        """
        What answers a Responses call (L{None}: it was refused here), its
        conversation held by the gateway: sent on with the earlier turns
        when it goes on from one (C{previous_response_id}), and its
        Response kept unless the client says C{store: false}.  A turn with
        nothing to send on or keep is the broker's call itself: its stream
        waits in no frame of this.
        """
        body = call.body
        for field, why in _NOT_SERVED.items():
            if body.get(field) not in (None, False):
                answer_error(request, errors.BAD_REQUEST, f"{field!r} is not served by this gateway: {why}")
                return None
        conversations = self.gateway.conversations
        goes_on = body.get("previous_response_id") is not None
        if conversations is None and goes_on:
            answer_error(
                request, errors.BAD_REQUEST,
                "'previous_response_id' needs the responses the gateway holds, and it holds none ([responses] store = off): "
                "send the whole conversation as input",
            )
            return None
        if not goes_on:
            if conversations is None or body.get("store") is False:
                # No earlier turn to send, no Response to keep: the broker's call alone.
                return self.gateway.broker.proxy_model(request, ctx, call, targets, rest, request.query, reading)
            return self._kept_turn(request, ctx, call, targets, rest, reading, conversations, body, ())
        return self._continued_turn(request, ctx, call, targets, rest, reading, conversations)

    async def _continued_turn(
        self, request: IncomingRequest, ctx: RequestContext, call: ResponsesCall, targets: list, rest: bytes, reading: BodyReading,
        conversations: Any,
    ) -> "HeldTurn | None":
        """
        A turn that goes on from an earlier one: its conversation found and
        sent on with it, what answers it given back to L{_served} (which
        awaits it with no frame of this); L{None}: it was refused here.
        """
        body = call.body
        owner = ctx.caller.name if ctx.caller is not None else ""
        try:
            expanded, chain = await conversations.continued(body, owner)
            if chain:
                call = ResponsesCall.parse(encode_json(expanded), reading)
        except GatewayError as error:
            answer_error(request, error.kind, error.message)
            return None
        except BadCall as error:
            answer_error(request, errors.BAD_REQUEST, f"the conversation with its earlier turns: {error}")
            return None
        if body.get("store") is False:
            answering = self.gateway.broker.proxy_model(request, ctx, call, targets, rest, request.query, reading)
            return HeldTurn(answering, conversations, body, owner, (), None, call.stream)  # nothing to keep
        return self._kept_turn(request, ctx, call, targets, rest, reading, conversations, body, tuple(chain))

    def _kept_turn(
        self, request: IncomingRequest, ctx: RequestContext, call: ResponsesCall, targets: list, rest: bytes, reading: BodyReading,
        conversations: Any, body: dict, chain: tuple,
    ) -> HeldTurn:
        """
        The broker's call of a turn whose Response is kept (C{body}: the
        request as its client sent it; C{chain}: the turns it goes on
        from), its answer copied as it is written.  A refusal or a broken
        answer goes on to L{_served}, which answers it: neither is a Response to keep.
        """
        recorder = request.recorder = conversations.recorder(call.stream)
        owner = ctx.caller.name if ctx.caller is not None else ""
        answering = self.gateway.broker.proxy_model(request, ctx, call, targets, rest, request.query, reading)
        return HeldTurn(answering, conversations, body, owner, chain, recorder, call.stream)

    async def _held_response(self, request: IncomingRequest, ctx: RequestContext, path: bytes) -> None:
        """
        C{GET}/C{DELETE /v1/responses/{id}} and C{GET
        /v1/responses/{id}/input_items}: answered from the Responses the
        gateway holds for this caller (another caller's id is unknown).
        """
        conversations = self.gateway.conversations
        parts = path[len(b"/v1/responses/"):].split(b"/")
        response_id = unquote_to_bytes(parts[0]).decode("utf-8", "replace")
        tail = parts[1:]
        if conversations is None:
            answer_error(request, errors.NOT_FOUND, "this gateway holds no responses ([responses] store = off)")
            return
        owner = ctx.caller.name if ctx.caller is not None else ""
        method = request.method
        try:
            if not tail and method in (b"GET", b"HEAD"):
                _answer_json(request, await conversations.retrieve(response_id, owner))
            elif not tail and method == b"DELETE":
                _answer_json(request, await conversations.delete(response_id, owner))
            elif tail == [b"input_items"] and method in (b"GET", b"HEAD"):
                query = {
                    name.decode("utf-8", "replace"): value.decode("utf-8", "replace")
                    for name, value in parse_qsl(request.query, keep_blank_values=True)
                }
                _answer_json(request, await conversations.input_items(response_id, owner, query))
            elif tail == [b"cancel"] and method == b"POST":
                raise GatewayError(errors.BAD_REQUEST, "only a background response can be cancelled, and this gateway runs none")
            elif tail not in ([], [b"input_items"], [b"cancel"]):
                raise GatewayError(errors.NOT_FOUND, f"{path.decode('latin-1')[:200]} is not served by this gateway")
            else:
                allowed = b"GET, HEAD, DELETE" if not tail else (b"POST" if tail == [b"cancel"] else b"GET, HEAD")
                answer_error(
                    request, errors.METHOD_NOT_ALLOWED, f"{method.decode('ascii', 'replace')} is not allowed here", [(b"Allow", allowed)],
                )
        except GatewayError as error:
            answer_error(request, error.kind, error.message)

    def _models(self, request: IncomingRequest, ctx: RequestContext, path: bytes) -> None:
        """
        C{GET /v1/models} and C{/v1/models/NAME}: the models the caller's
        key may call, in OpenAI's shape, or in Anthropic's when the request
        carries C{anthropic-version} (as Anthropic's SDKs always do).
        """
        anthropic = request.header(b"anthropic-version") is not None
        if anthropic:
            ctx.client_api = ANTHROPIC
        models = self.gateway.broker.models
        if request.method not in (b"GET", b"HEAD"):
            answer_error(request, errors.METHOD_NOT_ALLOWED, "only GET is allowed here", [(b"Allow", b"GET, HEAD")])
            return
        governor = self.gateway.broker.governor
        key = governor.key_of(ctx) if governor is not None else None
        names = [name for name in models.names() if key is None or key.may_call_model(name)]
        created = int(self.gateway.started_at)
        described = _anthropic_model_object if anthropic else _model_object
        if path == b"/v1/models":
            data = [described(name, created) for name in names]
            if anthropic:
                first, last = (names[0], names[-1]) if names else (None, None)
                _answer_json(request, {"data": data, "has_more": False, "first_id": first, "last_id": last})
            else:
                _answer_json(request, {"object": "list", "data": data})
            return
        name = unquote_to_bytes(path[len(b"/v1/models/"):]).decode("utf-8", "replace")
        if name not in names:
            answer_error(request, errors.MODEL_NOT_FOUND, f"no model is named {name!r}")
            return
        _answer_json(request, described(name, created))
