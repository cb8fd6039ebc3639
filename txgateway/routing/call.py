"""
L{Call}: what one client request carries through the broker (its context,
the request, the path sent on, its targets, its deadline, the model
request read from its body and the transcript of its stream), one value
passed from part to part instead of a dozen parameters.  How a model call
is said to each target, and its answer read back, is its speaker's
(L{Call.speaker}): routing holds L{ISpeaker} and knows no API.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs

from txgateway.config.gateway import ServiceConfig
from txgateway.dataplane.headers import request_headers_for_upstream
from txgateway.dataplane.server import IncomingRequest
from txgateway.observability.context import CompletionFacts, RequestContext
from txgateway.routing.model import Target
from txgateway.speaking import IModelCall, ISpeaker, Speakers, Transcript, Untranslatable, bounded_id

__all__ = ["Call"]


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
    #: Primary first (a model's configured targets are one tuple shared by its calls).
    targets: Sequence[Target]
    speakers: Speakers
    model_call: IModelCall | None = None
    transcript: Transcript | None = None
    deadline_at: float = math.inf
    #: The body each translated target is sent (by the target's id), made
    #: once; L{None} until a target needs one (most calls never do).
    _translated: dict | None = None
    #: The speaker of the first target API asked for (most calls have one) and any others.
    _speaker: ISpeaker | None = None
    #: The last target L{_speaker} was asked for by (L{speaker}'s shortcut).
    _speaker_target: Target | None = None
    _other_speakers: dict | None = None
    #: The path is sent as the client gave it to a target of its own API
    #: (C{/api/<service>/...}), not as the model routes' endpoint.
    as_sent: bool = False
    #: The completion tokens its key reserved, past which a stream of this
    #: call is cut (L{None}: not bounded, no governed key).
    completion_reserved: int | None = None
    #: The target that gives the client its answer (or its error), once one does.
    answering: Target | None = None
    #: The times its stream was resumed (at most L{txgateway.routing.resume.MAX_RESUMES}).
    resumes: int = 0
    #: Its completion was lowered to what its key's budget pays for: its answer is not the
    #: client's request's (the response cache neither keeps it nor answers it).
    capped_by_budget: bool = False

    @classmethod
    def of(
        cls,
        request: IncomingRequest,
        ctx: RequestContext,
        path: bytes,
        targets: Sequence[Target],
        speakers: Speakers,
        model_call: IModelCall | None = None,
        as_sent: bool = False,
    ) -> "Call":
        """
        A call of C{request} to C{targets} (its deadline starts when the
        chain serves it); a model call's facts start on C{ctx} here.
        """
        transcript = None
        if model_call is not None:
            end_user, session = model_call.end_user()
            header = targets[0].route.config.end_user_header if targets else ""
            if header:
                # The application's own header wins over the body.
                end_user = bounded_id((request.header(header.encode("ascii")) or b"").decode("latin-1")) or end_user
            ctx.completion = CompletionFacts(
                requested_model=model_call.model, operation=model_call.operation(path), max_tokens=model_call.max_tokens,
                stream=model_call.stream, end_user=end_user,
                # Codex names its session in a header.
                session=session or bounded_id((request.header(b"session-id") or b"").decode("latin-1")),
            )
            if model_call.stream:
                # Its text is kept for a resume only where one may come.
                resumable = model_call.resumable_kind and any(target.route.config.resume == "prefill" for target in targets)
                transcript = Transcript(resumable)
        return cls(request, ctx, path, targets, speakers, model_call, transcript, as_sent=as_sent)

    def capped(self, model_call: IModelCall) -> None:
        """
        Send C{model_call} (this call with a lower completion maximum, what
        its key's budget still pays for) instead: every body and speaker is
        made anew from it.
        """
        self.model_call = model_call
        self.capped_by_budget = True
        self._translated = self._speaker = self._speaker_target = self._other_speakers = None
        if self.ctx.completion is not None:
            self.ctx.completion.max_tokens = model_call.max_tokens
        if any(self.translates_for(target) for target in self.targets):
            self.untranslatable()  # made once more from the capped call (each target was translated before)

    def answer_started(self) -> None:
        """
        The client's answer started: no target is tried again for it (a
        resumed stream is sent a body made anew, with its prefill), so the
        bodies made for translated targets are let go (a prompt of tens of
        KB, held for as long as a stream lasts), and so is what the model
        call kept to be sent unchanged.
        """
        self._translated = None
        if self.model_call is not None:
            self.model_call.answer_started()

    @property
    def client_gone(self) -> bool:
        """
        The client's connection ended before its answer did: no retry and
        no next target (a governed call carried on for its usage tries
        nothing more).
        """
        return self.request.gone

    @property
    def served_model(self) -> str | None:
        """The model name the answering target was sent (L{None}: none answered, or the client's own name went)."""
        return self.answering.model if self.answering is not None else None

    @property
    def idempotency_key(self) -> bool:
        """The client sent an C{Idempotency-Key}: the request may be sent again after a silence."""
        return self.request.header(b"idempotency-key") is not None

    def speaker(self, target: Target) -> ISpeaker:
        """
        How this model call is spoken to C{target}, and its answer read
        back (made once per target API: a translated stream's writer
        serves every attempt that continues the answer).

        @raise Untranslatable: no speaker carries the call's API to the target's.
        """
        if target is self._speaker_target:
            return self._speaker  # the target asked for last (each attempt asks four times)
        api = target.route.config.speaks(self.model_call.api)
        speaker = self._speaker
        if speaker is not None and speaker.target_api == api:
            self._speaker_target = target
            return speaker
        if speaker is None:
            speaker = self._speaker = self.speakers.speaker(self.model_call, api, self.path, self.ctx.started_at)
            self._speaker_target = target
            return speaker
        if self._other_speakers is None:
            self._other_speakers = {}
        speaker = self._other_speakers.get(api)
        if speaker is None:
            speaker = self._other_speakers[api] = self.speakers.speaker(self.model_call, api, self.path, self.ctx.started_at)
        return speaker

    def translates_for(self, target: Target) -> bool:
        """Whether C{target} speaks another API than the client's (the call is translated)."""
        model_call = self.model_call
        return model_call is not None and target.route.config.speaks(model_call.api) != model_call.api

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
                self._translated[id(target)] = self.speaker(target).body(target.route.config, target.model, None)
            except Untranslatable as error:
                refused.append((target, str(error)))
        return refused

    def completion_floor(self) -> int:
        """
        The most completion tokens a target is sent when the request names
        none (an OpenAI request translated for Claude carries the service's
        C{max_tokens}): what its reservation must cover.
        """
        if self.model_call is None:
            return 0
        return max(
            (self.speaker(target).completion_floor(target.route.config) for target in self.targets if self.translates_for(target)),
            default=0,
        )

    def body_for(self, target: Target, prefill: str | None = None) -> bytes:
        """The body sent to C{target} (the model renamed, translated, the text so far as a prefill)."""
        if self.model_call is None:
            return self.request.body
        if prefill is None and self._translated is not None:
            made = self._translated.get(id(target))
            if made is not None:
                return made
        return self.speaker(target).body(target.route.config, target.model, prefill)

    def path_for(self, target: Target, base_path: bytes) -> bytes:
        """
        The path (and query) sent to C{target}'s endpoint whose URL's path
        is C{base_path}: as the client gave it, or as the target's speaker says.
        """
        if self.model_call is None:
            return self.path
        return self.speaker(target).path(self.path, base_path, self.as_sent)

    def headers_for(self, config: ServiceConfig, target: Target, span_id: str | None = None) -> list[tuple[bytes, bytes]]:
        """
        The headers the request carries to C{target} of C{config}'s service
        (its trace context naming the attempt's span C{span_id} as the
        parent, when the attempt has one).
        """
        ctx = self.ctx
        extra = ctx.trace.headers(span_id) if ctx.trace is not None else []
        # The gateway's own API key stays here unless the service asks for it.
        withheld: tuple[bytes, ...] = ctx.caller.withheld if ctx.caller is not None and not config.forward_api_key else ()
        if self.model_call is not None:
            added, withheld = self.speaker(target).headers(self.request, config, withheld)
        else:
            key = config.api_key.encode("ascii") if config.api_key else None
            added, kept_back = self.speakers.apis[config.api].credentials(self.request, config, key, False)
            if kept_back:
                withheld += kept_back
        if added:
            extra.extend(added)
        if config.reads_answers:
            # The gateway reads these answers as they pass: no compression.
            extra.append((b"Accept-Encoding", b"identity"))
        return request_headers_for_upstream(self.request, ctx.request_id, ctx.client, extra=extra, withheld=withheld)
