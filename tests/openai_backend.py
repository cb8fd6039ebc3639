"""
A fake OpenAI-compatible backend for integration tests, run as its own
process:

    python tests/openai_backend.py PORT

It listens on 127.0.0.1:PORT (0: any free port) and prints "listening
PORT" once ready.  It serves C{POST .../chat/completions} (JSON or
streamed) and C{GET .../models}; what it does is chosen by the C{model}
the gateway sends it (any other name answers normally, naming that model):

    cut40       a stream that breaks (connection reset) after 40 of 60 words
    reset       the connection is reset before any answer
    hang        never answers
    slow        a role chunk at once, the first word after 3 s
    stall       10 words, then silence (headers and connection kept)
    malformed   10 words, then a chunk that is not JSON
    nodone      the whole stream, but no "data: [DONE]"
    status-503  503 every time
    status-429  429 with Retry-After: 1
    context     400 context_length_exceeded
    filter      400 content_filter
    noprefill   400 when the last message is the assistant's (no prefill)
    flap        503 while /control/flap/down was posted last, else normal
    drip        a stream of a word every 50 ms (a client can leave midway)

Given C{tools}, a request whose last message is not a C{tool} result is
answered with a call of the first tool (its arguments streamed in
pieces), and one whose last message is a result with "The tool said:
<result>".  A C{stop} that is one of the words ends the answer before it
(C{finish_reason} C{stop}, and vLLM's C{stop_reason} naming it).

C{POST .../responses} speaks the Responses API natively (its documented
event sequence): a reasoning item first when asked for C{reasoning} (its
C{encrypted_content} when C{include} asks), a C{function_call} of the
first tool given C{tools} (or "The tool said: <output>" once a
C{function_call_output} comes), a structured output for a C{json_schema}
C{text.format}; model C{cut} breaks after its first delta, C{resp-error}
sends an C{error} event before any output, C{resp-crlf} ends its events'
lines with CRLF.

The answer is always the same 60 words, "w1 w2 ... w60 ".  A request whose
last message is the assistant's (a prefill) is continued from there, and
any mode but noprefill/status/context/filter then answers normally.
C{GET /calls} says how many requests each model got, the last
C{Authorization} each saw, and every C{traceparent} it was sent.
"""

from __future__ import annotations

import os
import json
import sys
import time

from twisted.internet import reactor
from twisted.web import server
from twisted.web.resource import Resource

from fake_values import example_of, tool_call

WORDS = [f"w{i} " for i in range(1, 61)]
FULL = "".join(WORDS)
CALLS: dict[str, dict] = {}
FLAP = {"down": False}
INTERVAL = 0.003


def _json(request, body, code=200, headers=()) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    for name, value in headers:
        request.setHeader(name, value)
    return json.dumps(body).encode()


def _error(request, code, message, error_code=None, headers=()) -> bytes:
    return _json(request, {"error": {"message": message, "type": "invalid_request_error", "code": error_code}}, code, headers)


def _chunk(model: str, delta: dict, finish=None, usage=None, choices=True) -> bytes:
    body = {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Completions(Resource):
    isLeaf = True

    def render_GET(self, request):
        path = request.path.decode()
        if path.endswith("/calls"):
            return _json(request, CALLS)
        if path.endswith("/models"):
            return _json(request, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        return _json(request, {"error": {"message": "not here"}}, 404)

    def render_POST(self, request):
        path = request.path.decode()
        if path.endswith("/control/flap/down") or path.endswith("/control/flap/up"):
            FLAP["down"] = path.endswith("/down")
            return _json(request, FLAP)
        if path.endswith("/responses"):
            return self._responses(request, json.loads(request.content.read()))
        if not path.endswith("/chat/completions"):
            return _json(request, {"error": {"message": "not here"}}, 404)
        body = json.loads(request.content.read())
        model = body["model"]
        messages = body.get("messages", [])
        seen = CALLS.setdefault(model, {"count": 0, "prefills": 0, "authorization": None, "traceparents": []})
        seen["count"] += 1
        seen["traceparents"].append(request.getHeader("traceparent"))
        auth = request.getHeader("authorization")
        seen["authorization"] = auth
        prefill = messages[-1]["content"] if messages and messages[-1].get("role") == "assistant" else None
        if prefill is not None:
            seen["prefills"] += 1
        if model == "status-503" or (model == "flap" and FLAP["down"]):
            return _error(request, 503, "overloaded", "overloaded")
        if model == "status-429":
            return _error(request, 429, "slow down", "rate_limit_exceeded", [(b"retry-after", b"1")])
        if model == "context":
            return _error(request, 400, "This model's maximum context length is 10 tokens", "context_length_exceeded")
        if model == "filter":
            return _error(request, 400, "The response was filtered", "content_filter")
        if model == "noprefill" and prefill is not None:
            return _error(request, 400, "assistant prefill is not supported", "invalid_request_error")
        if model == "reset" and prefill is None:
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        if model == "hang" and prefill is None:
            return server.NOT_DONE_YET
        seen["last_messages"] = messages
        if body.get("tools"):
            seen["tools"] = body["tools"]
            return self._tools(request, body, model)
        shape = body.get("response_format") or {}
        if shape.get("type") == "json_schema":
            seen["response_format"] = shape
            return self._structured(request, model, shape["json_schema"].get("schema") or {}, body.get("stream"))
        seen["stop"] = body.get("stop")
        done = prefill or ""
        if not FULL.startswith(done):
            return _error(request, 400, "the prefill is not this answer's beginning", "bad_prefill")
        rest = WORDS[len(done.split()):]
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        matched = next((word.strip() for word in rest if word.strip() in stops), None)
        if matched is not None:
            rest = rest[:[word.strip() for word in rest].index(matched)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(rest), "total_tokens": prompt_tokens + len(rest)}
        if not body.get("stream"):
            return _json(request, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(rest)}, "finish_reason": "stop",
                             "stop_reason": matched}],
                "usage": usage,
            })
        request.setHeader(b"content-type", b"text/event-stream")
        mode = model if prefill is None else "words"
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        events = [_chunk(model, {"role": "assistant", "content": ""})]
        for number, word in enumerate(rest, 1):
            events.append(_chunk(model, {"content": word}))
            if mode == "cut40" and number == 40:
                events.append("cut")
                break
            if mode == "stall" and number == 10:
                events.append("stall")
                break
            if mode == "malformed" and number == 10:
                events.append(b"data: {this is not json\n\n")
                break
        else:
            events.append(_chunk(model, {}, finish="stop"))
            if include_usage:
                events.append(_chunk(model, {}, usage=usage, choices=False))
            if mode != "nodone":
                events.append(b"data: [DONE]\n\n")
            events.append("end")
        if mode == "slow":
            events.insert(1, ("pause", 3.0))
        if mode == "drip":
            events = [part for event in events for part in (event, ("pause", 0.05))][:-1]
        self._send(request, events)
        return server.NOT_DONE_YET

    def _structured(self, request, model, schema, stream):
        """An answer that is a JSON object of C{schema}'s properties (strings "Paris", numbers 21, booleans true)."""
        text = json.dumps(example_of(schema))
        usage = {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
        if not stream:
            return _json(request, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": usage,
            })
        request.setHeader(b"content-type", b"text/event-stream")
        events = [_chunk(model, {"role": "assistant", "content": ""}), _chunk(model, {"content": text[:5]}),
                  _chunk(model, {"content": text[5:]}), _chunk(model, {}, finish="stop"),
                  _chunk(model, {}, usage=usage, choices=False), b"data: [DONE]\n\n", "end"]
        self._send(request, events)
        return server.NOT_DONE_YET

    def _tools(self, request, body, model):
        messages = body["messages"]
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        # The turn since the assistant last spoke: tool results, and what follows them (the images they returned).
        since = len(messages) - next((n for n, m in enumerate(reversed(messages)) if m.get("role") == "assistant"), len(messages))
        results = [m for m in messages[since:] if m.get("role") == "tool"]
        if results:
            images = sum(1 for m in messages[since:] if m.get("role") == "user" and isinstance(m.get("content"), list)
                         for part in m["content"] if part.get("type") == "image_url")
            said = results[-1]["content"] + (f" (and {images} image{'s' if images > 1 else ''})" if images else "")
            message = {"role": "assistant", "content": f"The tool said: {said}"}
            finish = "stop"
        else:
            tools = [(t["function"]["name"], (t["function"].get("parameters") or {}).get("properties") or {}) for t in body["tools"]]
            name, given = tool_call(tools, body)
            call = {"id": "call_fake1", "type": "function", "function": {"name": name, "arguments": json.dumps(given)}}
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        if not body.get("stream"):
            return _json(request, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage,
            })
        request.setHeader(b"content-type", b"text/event-stream")
        events = [_chunk(model, {"role": "assistant", "content": ""})]
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            first = {"index": 0, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}
            events.append(_chunk(model, {"tool_calls": [first]}))
            arguments = call["function"]["arguments"]
            for part in (arguments[:3], arguments[3:9], arguments[9:]):
                events.append(_chunk(model, {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        else:
            events.append(_chunk(model, {"content": message["content"]}))
        events.append(_chunk(model, {}, finish=finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(_chunk(model, {}, usage=usage, choices=False))
        events += [b"data: [DONE]\n\n", "end"]
        self._send(request, events)
        return server.NOT_DONE_YET

    def _responses(self, request, body):
        """OpenAI's Responses API, natively: a JSON Response, or its documented event sequence (model C{cut}: broken after its first delta)."""
        model = body["model"]
        seen = CALLS.setdefault("responses:" + model, {"count": 0})
        seen["count"] += 1
        seen["last_body"] = body
        words = ["Hello", " from", " the", " test", " backend."]
        shape = (body.get("text") or {}).get("format") or {}
        if shape.get("type") == "json_schema":
            answer = json.dumps(example_of(shape.get("schema") or {}))
            words = [answer[:5], answer[5:]]
        text = "".join(words)
        usage = {"input_tokens": 11, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11 + len(words)}
        response = {"id": "resp_fake" + os.urandom(8).hex(), "object": "response", "created_at": int(time.time()), "model": model,
                    "status": "in_progress", "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
        message = {"type": "message", "id": "msg_fake", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        output = [message]
        reasoning = None
        if body.get("reasoning"):
            # A reasoning item first, its encrypted content only when asked for (as the API does).
            reasoning = {"type": "reasoning", "id": "rs_fake", "summary": [{"type": "summary_text", "text": "Thinking."}]}
            if "reasoning.encrypted_content" in (body.get("include") or []):
                reasoning["encrypted_content"] = "gAAAAB-openai-opaque"
            output = [reasoning, message]
        call = None
        if body.get("tools") and not any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in body.get("input") or []):
            tool = body["tools"][0]
            call = {"type": "function_call", "id": "fc_fake", "call_id": "call_native1", "name": tool.get("name"),
                    "arguments": '{"city": "Paris"}', "status": "completed"}
            output = [item for item in output if item is not message] + [call]
        elif body.get("tools"):
            said = [i for i in body["input"] if isinstance(i, dict) and i.get("type") == "function_call_output"][-1]["output"]
            text = f"The tool said: {said}"
            words = [text]
            message = {**message, "content": [{"type": "output_text", "text": text, "annotations": []}]}
            output = [item for item in output if item.get("type") != "message"] + [message]
        if model == "resp-error" and body.get("stream"):
            request.setHeader(b"content-type", b"text/event-stream")
            failed = {"type": "error", "code": "server_error", "message": "The model failed", "sequence_number": 0}
            self._send(request, [f"event: error\ndata: {json.dumps(failed)}\n\n".encode(), "end"])
            return server.NOT_DONE_YET
        done = {**response, "status": "completed", "output": output, "usage": usage}
        if not body.get("stream"):
            return _json(request, done)
        sequence = iter(range(1000))

        # Model resp-crlf frames its events with CRLF line ends (SSE allows them).
        line_end = "\r\n" if model == "resp-crlf" else "\n"

        def event(kind, **data):
            text = f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': next(sequence), **data})}\n\n"
            return text.replace("\n", line_end).encode()

        events = [event("response.created", response=response), event("response.in_progress", response=response)]
        if reasoning is not None:
            events += [
                event("response.output_item.added", output_index=0, item={**reasoning, "summary": []}),
                event("response.reasoning_summary_text.delta", item_id="rs_fake", output_index=0, summary_index=0, delta="Thinking."),
                event("response.output_item.done", output_index=0, item=reasoning),
            ]
        if call is not None:
            index = len(output) - 1
            events += [
                event("response.output_item.added", output_index=index, item={**call, "arguments": "", "status": "in_progress"}),
                event("response.function_call_arguments.delta", item_id="fc_fake", output_index=index, delta='{"city": '),
                event("response.function_call_arguments.delta", item_id="fc_fake", output_index=index, delta='"Paris"}'),
                event("response.function_call_arguments.done", item_id="fc_fake", output_index=index, arguments=call["arguments"]),
                event("response.output_item.done", output_index=index, item=call),
                event("response.completed", response=done), "end",
            ]
            request.setHeader(b"content-type", b"text/event-stream")
            self._send(request, events)
            return server.NOT_DONE_YET
        opened = {**message, "status": "in_progress", "content": []}
        last = len(output) - 1  # the message comes after any reasoning
        events += [
            event("response.output_item.added", output_index=last, item=opened),
            event("response.content_part.added", item_id="msg_fake", output_index=last, content_index=0,
                  part={"type": "output_text", "text": "", "annotations": []}),
        ]
        for number, word in enumerate(words):
            events.append(event("response.output_text.delta", item_id="msg_fake", output_index=last, content_index=0, delta=word))
            if model == "cut" and number == 0:
                events.append("cut")
        events += [
            event("response.output_text.done", item_id="msg_fake", output_index=last, content_index=0, text=text),
            event("response.content_part.done", item_id="msg_fake", output_index=last, content_index=0,
                  part={"type": "output_text", "text": text, "annotations": []}),
            event("response.output_item.done", output_index=last, item=message),
            event("response.completed", response=done), "end",
        ]
        request.setHeader(b"content-type", b"text/event-stream")
        self._send(request, events)
        return server.NOT_DONE_YET

    def _send(self, request, events) -> None:
        if request._disconnected:
            return
        if not events:
            return
        event, rest = events[0], events[1:]
        if event == "cut":
            request.transport.abortConnection()
            return
        if event == "stall":
            return
        if event == "end":
            request.finish()
            return
        if isinstance(event, tuple):
            reactor.callLater(event[1], self._send, request, rest)
            return
        request.write(event)
        reactor.callLater(INTERVAL, self._send, request, rest)


def main() -> None:
    port = reactor.listenTCP(int(sys.argv[1]), server.Site(Completions()), interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
