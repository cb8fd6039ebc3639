"""
The translation between OpenAI's Responses API and chat completions, as
pure functions and one small stateful writer with no I/O: a Responses
request as a chat request, a chat answer as a Response, and a chat stream
as the Responses API's documented event sequence.

A request field with no equivalent in chat completions raises
L{Untranslatable} naming it; a hint with no effect on the meaning of the
answer is dropped (L{_DROPPED}); built-in tools (web search, file search,
code interpreter...) reach only native targets and are left out here.
The README's "OpenAI's Responses API" has the table this module implements.
"""

from __future__ import annotations

import base64
import binascii
from types import MappingProxyType
from typing import Any, Mapping

from txgateway.openai.wire import ChunkFacts
from txgateway.openai.wire import decode_json as _loads
from txgateway.openai.wire import encode_json as _dumps
from txgateway.responses.wire import sse_event
from txgateway.speaking import MessageText, TextBuffer, Transcript, Untranslatable

__all__ = ["ChatToResponsesStream", "chat_answer_to_response", "responses_request_to_chat", "tool_names"]

#: What begins the C{encrypted_content} of a reasoning item holding Claude's signed thinking (base64 JSON after it).
CLAUDE_THINKING = "txgateway.claude-thinking.v1:"


def thinking_content(blocks: list) -> str:
    """Claude's signed thinking blocks as a reasoning item's opaque C{encrypted_content}."""
    return CLAUDE_THINKING + base64.b64encode(_dumps(blocks)).decode("ascii")


def claude_thinking(item: Any) -> list | None:
    """The thinking blocks a reasoning item holds from Claude (L{thinking_content}), or L{None} for any other."""
    content = item.get("encrypted_content") if isinstance(item, dict) else None
    if not isinstance(content, str) or not content.startswith(CLAUDE_THINKING):
        return None
    try:
        blocks = _loads(base64.b64decode(content[len(CLAUDE_THINKING):], validate=True))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None
    return blocks if isinstance(blocks, list) else None


#: How a tool of a C{namespace} is named to a chat target: C{namespace__name}.
_NAMESPACE_JOIN = "__"

#: Fields carried over to chat completions under their own name.
_SAME = ("temperature", "top_p", "parallel_tool_calls", "user")
#: Hints with no effect on the meaning of the answer: dropped.
_DROPPED = frozenset({
    "prompt_cache_key", "client_metadata", "include", "service_tier", "store", "metadata", "truncation",
    "stream_options", "background", "prompt_cache_retention", "top_logprobs",
})
_KNOWN = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "text", "max_output_tokens", "reasoning", "stream",
    "safety_identifier", *_SAME, *_DROPPED,
})
#: Tools the Responses API runs itself: a chat target has none of them.
_BUILTIN_TOOLS = frozenset({
    "web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview", "mcp",
    "image_generation", "local_shell", "web_search_preview_2025_03_11",
})


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Untranslatable(f"{where} is not a string")
    return value


def _chat_part(part: Any, where: str) -> dict:
    """One content part of a Responses message as a chat content part."""
    if not isinstance(part, dict):
        raise Untranslatable(f"{where} is not an object")
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text")}
    if kind == "refusal":
        return {"type": "text", "text": _text(part.get("refusal"), f"{where}.refusal")}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise Untranslatable(f"{where}: an image by file_id has no chat completions equivalent")
        image = {"url": url}
        if isinstance(part.get("detail"), str) and part["detail"] != "auto":
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file":
        file = {key: part[key] for key in ("file_data", "file_id", "filename") if isinstance(part.get(key), str)}
        if not file or "file_url" in part:
            raise Untranslatable(f"{where}: a file by URL has no chat completions equivalent")
        return {"type": "file", "file": file}
    raise Untranslatable(f"{where}: content of type {kind!r} has no chat completions equivalent")


def _content(content: Any, where: str, text_only: bool) -> str | list[dict]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content is neither a string nor a list of parts")
    parts = [_chat_part(part, f"{where}.content[{n}]") for n, part in enumerate(content)]
    if text_only or all(part["type"] == "text" for part in parts):
        if not all(part["type"] == "text" for part in parts):
            raise Untranslatable(f"{where}: only text can be said in this role")
        return "".join(part["text"] for part in parts)
    return parts


def _messages(items: Any, instructions: Any, thinking: bool = False) -> list[dict]:
    """
    The Responses C{input} (and C{instructions}) as chat messages.  With
    C{thinking} (the target is Claude), a reasoning item holding Claude's
    own signed thinking goes back on the assistant message after it
    (C{thinking_blocks}); any other reasoning is left out.
    """
    messages: list[dict] = []
    pending: list = []  # Claude's thinking, for the next assistant message
    if instructions is not None:
        messages.append({"role": "system", "content": _text(instructions, "instructions")})
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        raise Untranslatable("input is neither a string nor a list of items")
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if not isinstance(item, dict):
            raise Untranslatable(f"{where} is not an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise Untranslatable(f"{where}.role {role!r} has no chat completions equivalent")
            role = "system" if role == "developer" else role
            messages.append({"role": role, "content": _content(item.get("content"), where, role != "user")})
            if role == "assistant" and pending:
                messages[-1]["thinking_blocks"], pending = pending, []
        elif kind == "function_call":
            name = _text(item.get("name"), f"{where}.name")
            if isinstance(item.get("namespace"), str):
                name = item["namespace"] + _NAMESPACE_JOIN + name  # as its tool was named to the target
            call = {
                "id": _text(item.get("call_id"), f"{where}.call_id"), "type": "function",
                "function": {"name": name, "arguments": _text(item.get("arguments"), f"{where}.arguments")},
            }
            _add_call(messages, call, pending)
            pending = []
        elif kind == "custom_tool_call":
            # A custom tool is a function of one string to the target: its input goes as {"input": ...}.
            call = {
                "id": _text(item.get("call_id"), f"{where}.call_id"), "type": "function",
                "function": {"name": _text(item.get("name"), f"{where}.name"),
                             "arguments": _dumps({"input": _text(item.get("input"), f"{where}.input")}).decode("utf-8")},
            }
            _add_call(messages, call, pending)
            pending = []
        elif kind in ("function_call_output", "custom_tool_call_output"):
            output = item.get("output")
            content = output if isinstance(output, str) else _content(output, where, True)
            messages.append({"role": "tool", "tool_call_id": _text(item.get("call_id"), f"{where}.call_id"), "content": content})
        elif kind == "reasoning":
            blocks = claude_thinking(item) if thinking else None
            if blocks:
                pending.extend(blocks)
            continue  # reasoning from one provider is never sent to another
        else:
            raise Untranslatable(f"{where}: an item of type {kind!r} has no chat completions equivalent")
    return messages


def _add_call(messages: list[dict], call: dict, thinking: list) -> None:
    """A tool call on the assistant message it belongs to (a new one unless the last is an assistant's), with Claude's thinking before it."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and isinstance(last.get("content"), (str, type(None))):
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    if thinking:
        messages[-1].setdefault("thinking_blocks", []).extend(thinking)


def _custom_function(tool: dict, where: str) -> dict:
    """
    A C{custom} tool (free-form text in, as Codex's C{apply_patch}) as a
    chat function of one string, C{input}; its grammar, when it has one,
    said in the description (a chat target cannot be held to it).
    """
    name = _text(tool.get("name"), f"{where}.name")
    description = tool.get("description") if isinstance(tool.get("description"), str) else ""
    shape = tool.get("format")
    if isinstance(shape, dict) and shape.get("type") == "grammar" and isinstance(shape.get("definition"), str):
        description += f"\n\nThe input follows this {shape.get('syntax', 'lark')} grammar:\n{shape['definition']}"
    elif shape not in (None, {"type": "text"}):
        raise Untranslatable(f"{where}.format {shape!r} has no chat completions equivalent")
    function = {
        "name": name, "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]},
    }
    if description:
        function["description"] = description.strip()
    return {"type": "function", "function": function}


def _function(tool: dict, where: str, namespace: str | None = None) -> dict:
    name = _text(tool.get("name"), f"{where}.name")
    function = {"name": name if namespace is None else namespace + _NAMESPACE_JOIN + name}
    for field in ("description", "parameters", "strict"):
        if tool.get(field) is not None:
            function[field] = tool[field]
    return {"type": "function", "function": function}


#: The tool names of a request with none to name back (one mapping, read only, for every such stream).
_NO_NAMES: Mapping[str, tuple[str | None, str]] = MappingProxyType({})


def tool_names(tools: Any) -> Mapping[str, tuple[str | None, str]]:
    """
    The chat names of a request's tools that are not plain functions to
    the client: each C{namespace} tool's with its namespace and its own
    name, each C{custom} tool's with L{None} for namespace (its calls
    come back as C{custom_tool_call}s).
    """
    names: dict[str, tuple[str | None, str]] = {}
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "namespace" and isinstance(tool.get("name"), str):
            for inner in tool.get("tools") or ():
                if isinstance(inner, dict) and isinstance(inner.get("name"), str):
                    names[tool["name"] + _NAMESPACE_JOIN + inner["name"]] = (tool["name"], inner["name"])
        elif isinstance(tool, dict) and tool.get("type") == "custom" and isinstance(tool.get("name"), str):
            names[tool["name"]] = (None, tool["name"])
    return names or _NO_NAMES


def _tools(tools: Any) -> tuple[list[dict], list[str]]:
    """
    The function tools as chat tools (a C{namespace}'s flattened to
    C{namespace__name}), and the names of the built-in ones left out.
    """
    if not isinstance(tools, list):
        raise Untranslatable("tools is not a list")
    chat, left_out = [], []
    for n, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "function":
            chat.append(_function(tool, f"tools[{n}]"))
        elif kind == "namespace":
            namespace = _text(tool.get("name"), f"tools[{n}].name")
            for m, inner in enumerate(tool.get("tools") or ()):
                if not isinstance(inner, dict) or inner.get("type", "function") != "function":
                    raise Untranslatable(f"tools[{n}].tools[{m}]: only function tools can be said in a namespace")
                chat.append(_function(inner, f"tools[{n}].tools[{m}]", namespace))
        elif kind == "custom":
            chat.append(_custom_function(tool, f"tools[{n}]"))
        elif kind in _BUILTIN_TOOLS:
            left_out.append(kind)
        else:
            raise Untranslatable(f"tools[{n}]: a tool of type {kind!r} has no chat completions equivalent")
    return chat, left_out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom") and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise Untranslatable(f"tool_choice {choice!r} has no chat completions equivalent")


def _response_format(text: Any) -> dict | None:
    if not isinstance(text, dict):
        raise Untranslatable("text is not an object")
    shape = text.get("format")
    if shape is None or shape == {"type": "text"}:
        return None
    if isinstance(shape, dict) and shape.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(shape, dict) and shape.get("type") == "json_schema":
        schema = {key: shape[key] for key in ("name", "schema", "strict", "description") if key in shape}
        return {"type": "json_schema", "json_schema": schema}
    raise Untranslatable(f"text.format {shape!r} has no chat completions equivalent")


def responses_request_to_chat(body: dict, model: str | None, thinking: bool = False) -> tuple[dict, list[str]]:
    """
    A Responses request as a chat completions request for C{model}, and
    the built-in tools left out of it.  With C{thinking} (the chat request
    goes on to Claude), Claude's own reasoning items go back as the
    assistant messages' C{thinking_blocks}.

    @raise Untranslatable: a field (named) that chat completions cannot be asked.
    """
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise Untranslatable(f"{unknown[0]!r} has no chat completions equivalent")
    for field in ("previous_response_id", "conversation", "prompt"):
        if body.get(field) is not None:
            raise Untranslatable(f"{field!r} needs a conversation the gateway holds (on /v1/responses) or the target holds")
    if body.get("background") is True:
        raise Untranslatable("'background' mode is not served for a chat completions target")
    chat: dict[str, Any] = {
        "model": model or body.get("model"), "messages": _messages(body.get("input"), body.get("instructions"), thinking),
    }
    for field in _SAME:
        if body.get(field) is not None:
            chat[field] = body[field]
    if chat.get("user") is None and isinstance(body.get("safety_identifier"), str):
        chat["user"] = body["safety_identifier"]
    left_out: list[str] = []
    if body.get("tools"):
        tools, left_out = _tools(body["tools"])
        if tools:
            chat["tools"] = tools
            if body.get("tool_choice") is not None:
                chat["tool_choice"] = _tool_choice(body["tool_choice"])
        else:
            chat.pop("parallel_tool_calls", None)
    if body.get("text") is not None:
        shape = _response_format(body["text"])
        if shape is not None:
            chat["response_format"] = shape
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool):
        chat["max_tokens"] = limit
    elif limit is not None:
        raise Untranslatable("max_output_tokens is not an integer")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat, left_out


def _usage(usage: Any) -> dict | None:
    """A chat usage object in the Responses API's words."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    cached = prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0
    reasoning = completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0
    return {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached or 0},
        "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def _response(response_id: str, model: Any, created: int, output: list, usage: dict | None, finish: Any) -> dict:
    incomplete = finish == "length"
    return {
        "id": response_id, "object": "response", "created_at": created, "model": model,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "error": None, "output": output, "usage": usage,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {
        "type": "message", "id": item_id, "role": "assistant", "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _reasoning_item(item_id: str, text: str, blocks: list) -> dict:
    """
    A reasoning item: its text as the summary, and Claude's signed
    thinking blocks (when there are) as its opaque C{encrypted_content}.
    """
    return {
        "type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}] if text else [],
        "encrypted_content": thinking_content(blocks) if blocks else None,
    }


def _custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments of the chat function it was said as (C{{"input": ...}})."""
    try:
        decoded = _loads(arguments) if arguments else {}
    except (ValueError, UnicodeDecodeError):
        return arguments  # the target wrote the input itself: as it is
    value = decoded.get("input") if isinstance(decoded, dict) else None
    return value if isinstance(value, str) else arguments


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed", names: dict | None = None) -> dict:
    said = names.get(name) if names else None
    if said is not None and said[0] is None:
        # A custom tool, as the client named it: its input is the text the function was given.
        return {"type": "custom_tool_call", "id": "ctc_" + call_id, "call_id": call_id, "name": said[1],
                "input": _custom_input(arguments), "status": status}
    item = {"type": "function_call", "id": "fc_" + call_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}
    if said is not None:
        item["namespace"], item["name"] = said  # a namespace's tool, as the client named it
    return item


def chat_answer_to_response(body: bytes, created: int, names: dict | None = None, response_id: str | None = None) -> bytes:
    """
    A chat completion as a Response named C{response_id} (the gateway's
    own; L{None}: one made from the chat id), its items named after it.
    An answer that is not a chat completion passes as it is.
    """
    try:
        answer = _loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        return body
    choice = answer["choices"][0] if isinstance(answer["choices"][0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    base = response_id[len("resp_"):] if response_id else str(answer.get("id") or "chat")
    output: list[dict] = []
    reasoning = message.get("reasoning_content")
    blocks = message.get("thinking_blocks")
    if (isinstance(reasoning, str) and reasoning) or (isinstance(blocks, list) and blocks):
        output.append(_reasoning_item(
            "rs_" + base, reasoning if isinstance(reasoning, str) else "", blocks if isinstance(blocks, list) else [],
        ))
    if isinstance(message.get("content"), str) and message["content"]:
        output.append(_message_item("msg_" + base, message["content"]))
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            output.append(_call_item(str(call.get("id")), str(function.get("name")), str(function.get("arguments") or ""), names=names))
    return _dumps(_response("resp_" + base, answer.get("model"), created, output, _usage(answer.get("usage")), choice.get("finish_reason")))


class ChatToResponsesStream:
    """
    Writes a chat completion stream as the Responses API's event sequence,
    one call per event of the chat stream (and L{finish} for one that
    ended whole without C{[DONE]}): C{response.created} and
    C{response.in_progress} first; a message item (C{output_item.added},
    C{content_part.added}, C{output_text.delta}..., their C{done}s) for
    text; a function call item (C{function_call_arguments.delta}...) for
    each tool call; C{response.completed} (C{incomplete} at a length
    finish) with the usage last.  Every event has its C{sequence_number}.
    """

    __slots__ = (
        "_created", "_response_id", "_names", "_sequence", "_started", "_base", "_output", "_open", "_usage", "_finish",
        "_ended", "_delta_middle", "_transcript",
    )

    _delta_head = b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":'

    def __init__(self, created: int, names: Mapping | None = None, response_id: str | None = None) -> None:
        self._created = created  # the request's start on the gateway's clock, as every translated answer's
        #: The Response's id: the gateway's own (L{None}: one made from the chat stream's id).
        self._response_id = response_id
        #: The chat names of namespace and custom tools, as the client named them (L{tool_names}).
        self._names = names
        self._sequence = 0
        #: The Response's id and model, once the stream started (its first events carry the Response).
        self._started: tuple[str, Any] | None = None
        self._base = ""
        self._output: list[dict] = []
        #: The item open now: ["message", index, text, item id], ["call", index, id, name, arguments]
        #: or ["reasoning", index, text, item id, thinking blocks]; a message's text is a L{MessageText}
        #: (a L{TextBuffer} when no transcript keeps it), the others' text and arguments L{TextBuffer}s.
        self._open: list | None = None
        self._usage: dict | None = None
        self._finish: Any = None
        self._ended = False
        #: The open message's delta events' bytes between their sequence number and their text.
        self._delta_middle = b""
        #: The call's transcript, which keeps the text a message says (L{text_kept_by}), or L{None}.
        self._transcript: Transcript | None = None

    def text_kept_by(self, transcript: Transcript) -> None:
        """
        Read the events that C{transcript} is told of first (a relay's):
        each message's text is then the transcript's, not kept again (L{MessageText}).
        """
        self._transcript = transcript

    def _event(self, kind: str, **data: Any) -> bytes:
        event = sse_event(kind, {"type": kind, "sequence_number": self._sequence, **data})
        self._sequence += 1
        return event

    def _start(self, chunk: dict) -> bytes:
        base = self._response_id[len("resp_"):] if self._response_id else str(chunk.get("id") or "chat")
        started = _response("resp_" + base, chunk.get("model"), self._created, [], None, None)
        started["status"] = "in_progress"
        self._started = (started["id"], started["model"])
        self._base = base
        # The two first events carry the same Response: encoded once.
        response = _dumps(started)
        sequence = self._sequence
        self._sequence = sequence + 2
        return b"".join((
            b'event: response.created\ndata: {"type":"response.created","sequence_number":%d,"response":' % sequence, response,
            b'}\n\nevent: response.in_progress\ndata: {"type":"response.in_progress","sequence_number":%d,"response":' % (sequence + 1),
            response, b"}\n\n",
        ))

    def _close(self) -> bytes:
        """The open item's done events."""
        if self._open is None:
            return b""
        opened, self._open = self._open, None
        index = opened[1]
        if opened[0] == "message":
            text = str(opened[2])
            item = _message_item(opened[3], text)
            part = item["content"][0]
            out = self._event("response.output_text.done", item_id=opened[3], output_index=index, content_index=0, text=text)
            out += self._event("response.content_part.done", item_id=opened[3], output_index=index, content_index=0, part=part)
        elif opened[0] == "reasoning":
            text = str(opened[2])
            item = _reasoning_item(opened[3], text, opened[4])
            out = b""
            if opened[2]:
                part = {"type": "summary_text", "text": text}
                out += self._event("response.reasoning_summary_text.done", item_id=opened[3], output_index=index, summary_index=0, text=text)
                out += self._event("response.reasoning_summary_part.done", item_id=opened[3], output_index=index, summary_index=0, part=part)
        else:
            arguments = str(opened[4])
            item = _call_item(opened[2], opened[3], arguments, names=self._names)
            if item["type"] == "custom_tool_call":
                # Its input is known whole only now (it came inside the function's JSON arguments).
                out = self._event("response.custom_tool_call_input.delta", item_id=item["id"], output_index=index, delta=item["input"])
                out += self._event("response.custom_tool_call_input.done", item_id=item["id"], output_index=index, input=item["input"])
            else:
                out = self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index, arguments=arguments)
        self._output.append(item)
        return out + self._event("response.output_item.done", output_index=index, item=item)

    def _text(self, text: str) -> bytes:
        opened = self._open
        if opened is not None and opened[0] == "message":
            # The most common event: from a template, not a dict (each delta is its own event).
            opened[2].append(text)
            sequence = self._sequence
            self._sequence = sequence + 1
            return b"".join((self._delta_head, b"%d" % sequence, self._delta_middle, _dumps(text), b"}\n\n"))
        out = b""
        if self._open is None or self._open[0] != "message":
            out += self._close()
            item_id = f"msg_{self._base}_{len(self._output)}"
            transcript = self._transcript
            # A transcript that keeps no text now never will: the message keeps its own, plainly.
            said = MessageText(transcript) if transcript is not None and transcript.resumable else TextBuffer()
            self._open = ["message", len(self._output), said, item_id]
            opened = {**_message_item(item_id, "", "in_progress"), "content": []}
            out += self._event("response.output_item.added", output_index=self._open[1], item=opened)
            out += self._event("response.content_part.added", item_id=item_id, output_index=self._open[1], content_index=0,
                               part={"type": "output_text", "text": "", "annotations": []})
            self._delta_middle = b',"item_id":' + _dumps(item_id) + b',"output_index":%d,"content_index":0,"delta":' % self._open[1]
        self._open[2].append(text)
        return out + self._event("response.output_text.delta", item_id=self._open[3], output_index=self._open[1], content_index=0, delta=text)

    def _reasoning(self, text: str, blocks: list) -> bytes:
        """Reasoning (a chat stream's C{reasoning_content}, Claude's signed C{thinking_blocks}) as a reasoning item's events."""
        out = b""
        if self._open is None or self._open[0] != "reasoning":
            out += self._close()
            item_id = f"rs_{self._base}_{len(self._output)}"
            self._open = ["reasoning", len(self._output), TextBuffer(), item_id, []]
            out += self._event("response.output_item.added", output_index=self._open[1], item=_reasoning_item(item_id, "", []))
        opened = self._open
        if text:
            if not opened[2]:
                out += self._event("response.reasoning_summary_part.added", item_id=opened[3], output_index=opened[1], summary_index=0,
                                   part={"type": "summary_text", "text": ""})
            opened[2].append(text)
            out += self._event("response.reasoning_summary_text.delta", item_id=opened[3], output_index=opened[1], summary_index=0, delta=text)
        opened[4].extend(blocks)
        return out

    def _tool(self, call: dict) -> bytes:
        out = b""
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if call.get("id") is not None or self._open is None or self._open[0] != "call":
            out += self._close()
            call_id = str(call.get("id") or f"call_{len(self._output)}")
            self._open = ["call", len(self._output), call_id, str(function.get("name") or ""), TextBuffer()]
            out += self._event("response.output_item.added", output_index=self._open[1],
                               item=_call_item(call_id, self._open[3], "", "in_progress", self._names))
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._open[4].append(arguments)
            said = self._names.get(self._open[3]) if self._names else None
            if said is None or said[0] is not None:  # a custom tool's input is said whole when its call ends
                out += self._event("response.function_call_arguments.delta", item_id="fc_" + self._open[2],
                                   output_index=self._open[1], delta=arguments)
        return out

    def _end(self) -> bytes:
        if self._ended or self._started is None:
            return b""
        self._ended = True
        out = self._close()
        response = _response(*self._started, self._created, self._output, self._usage, self._finish)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def finish(self) -> bytes:
        """The end events of a stream that ended whole without C{[DONE]}."""
        return self._end()

    def __call__(self, event: bytes, facts: ChunkFacts) -> bytes:
        opened = self._open
        text = facts.text
        if (
            text and opened is not None and opened[0] == "message" and not facts.tool_call and not facts.finish_reasons
            and facts.usage is None and b'"reasoning' not in event
        ):
            # The most common chunk, more text of the message open: its delta event from the template, inline.
            opened[2].append(text)
            sequence = self._sequence
            self._sequence = sequence + 1
            return b"".join((self._delta_head, b"%d" % sequence, self._delta_middle, _dumps(text), b"}\n\n"))
        if facts.done:
            return self._end()
        chunk = facts.data
        if chunk is None:
            return b""  # a comment
        out = self._start(chunk) if self._started is None else b""
        if chunk.get("usage") is not None:
            self._usage = _usage(chunk["usage"])
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
            reasoning, blocks = delta.get("reasoning_content"), delta.get("thinking_blocks")
            if (isinstance(reasoning, str) and reasoning) or (isinstance(blocks, list) and blocks):
                out += self._reasoning(reasoning if isinstance(reasoning, str) else "", blocks if isinstance(blocks, list) else [])
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._text(delta["content"])
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._tool(call)
            if choice.get("finish_reason") is not None:
                self._finish = choice["finish_reason"]
                out += self._close()
        return out
