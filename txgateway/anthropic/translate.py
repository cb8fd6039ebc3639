"""
The translation between Anthropic's Messages API and OpenAI's chat
completions, both ways, as pure functions and small stateful writers with
no I/O: requests, JSON answers, event streams and error bodies.

A request field with no equivalent on the other side raises
L{Untranslatable} naming it: the gateway refuses the call (or that target)
with a 400 rather than drop what the client asked for.  The README's
"For Anthropic SDK users" has the table this module implements.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterable

from txgateway.anthropic.wire import error_type_for, sse_event, with_prefill
from txgateway.openai.wire import CONTEXT_PHRASES, ChunkFacts, chunk_event, error_codes
from txgateway.openai.wire import decode_json as _loads
from txgateway.speaking import Untranslatable
from txgateway.openai.wire import encode_json as _dumps

__all__ = [
    "ChatToMessagesStream",
    "StreamWriter",
    "MessagesToChatStream",
    "Untranslatable",
    "chat_answer_to_message",
    "chat_error_to_anthropic",
    "chat_request_to_messages",
    "message_answer_to_chat",
    "messages_error_to_chat",
    "messages_request_to_chat",
]


# -- the stop reasons ------------------------------------------------------

#: OpenAI's C{finish_reason} for each Messages C{stop_reason}.
_FINISH_OF_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
#: The Messages C{stop_reason} for each OpenAI C{finish_reason}.
_STOP_OF_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish: Any, matched: Any, stop_sequences: Iterable[str]) -> tuple[str | None, str | None]:
    """
    The Messages C{stop_reason} and C{stop_sequence} of an OpenAI choice's
    end: C{matched} is the stop string a backend names (vLLM's
    C{stop_reason}), which makes a C{stop} a C{stop_sequence}.
    """
    if not isinstance(finish, str):
        return None, None
    if finish == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return _STOP_OF_FINISH.get(finish, "end_turn"), None


# -- requests: Messages to chat ----------------------------------------------

#: The Messages request fields that have an OpenAI equivalent.
_MESSAGES_FIELDS = frozenset({
    "model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "stream", "metadata", "tools",
    "tool_choice", "thinking", "output_config", "context_management", "service_tier", "top_k",
})


def effort_of_budget(budget: Any) -> str:
    """The chat C{reasoning_effort} of a Messages thinking budget (the inverse of L{THINKING_BUDGETS}, by range)."""
    if not isinstance(budget, int) or budget <= 2048:
        return "low"
    return "medium" if budget <= 8192 else "high"


#: Messages C{output_config.effort} as chat's C{reasoning_effort}.
_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


def _effort(body: dict) -> str | None:
    """
    The C{reasoning_effort} a Messages call's thinking asks for: its
    C{output_config.effort}, else by its C{budget_tokens}; L{None} for no
    thinking (absent, C{disabled}, or C{adaptive} with no effort).
    """
    thinking = body.get("thinking")
    config = body.get("output_config") if isinstance(body.get("output_config"), dict) else {}
    if thinking is not None and not isinstance(thinking, dict):
        raise Untranslatable("thinking: expected an object")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in (None, "enabled", "adaptive", "disabled"):
        raise Untranslatable(f"thinking: the type {kind!r} has no OpenAI equivalent")
    if kind == "disabled":
        return None
    effort = config.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise Untranslatable(f"output_config.effort: {effort!r} has no OpenAI equivalent")
        return _EFFORTS[effort]
    return effort_of_budget(thinking.get("budget_tokens")) if kind == "enabled" else None


def _context_edits(management: Any) -> None:
    """
    A Messages C{context_management}: edits that only clear earlier
    thinking change nothing for a chat backend (it never gets earlier
    thinking); any other edit is refused by name.
    """
    edits = management.get("edits") if isinstance(management, dict) else None
    if not isinstance(edits, list) or set(management) - {"edits"}:
        raise Untranslatable("context_management: expected {\"edits\": [...]}")
    for number, edit in enumerate(edits):
        kind = edit.get("type") if isinstance(edit, dict) else None
        if not (isinstance(kind, str) and kind.startswith("clear_thinking")):
            raise Untranslatable(f"context_management.edits[{number}]: the edit {kind!r} has no OpenAI equivalent")


#: Messages fields at a value that changes nothing (the API's default): as good as absent.
_MESSAGES_NO_EFFECT = {"thinking": {"type": "disabled"}, "service_tier": "auto"}


def _asked(body: dict, no_effect: dict) -> set[str]:
    """The fields a request really asks for: those with a value that is not null nor a no-effect default."""
    return {field for field, value in body.items() if value is not None and no_effect.get(field, ...) != value}


def _string(value: Any, where: str) -> str:
    """C{value}, which must be a string."""
    if not isinstance(value, str):
        raise Untranslatable(f"{where}: expected a string")
    return value


def _text_of_blocks(blocks: Any, where: str) -> str:
    """The text of a string or a list of text blocks (their C{cache_control} hints aside)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise Untranslatable(f"{where}: expected a string or a list of text blocks")
    parts = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise Untranslatable(f"{where}: a {kind!r} block has no OpenAI equivalent here (only text)")
        parts.append(block["text"])
    return "\n".join(parts)


def _tool_result_of(block: dict, where: str) -> tuple[str, list[dict]]:
    """
    A C{tool_result}'s text, and its images and documents as chat parts:
    a chat C{tool} message holds only text, so what else a tool returned
    (Claude Code's C{Read} of a screenshot) follows the tool messages in
    a user message.
    """
    content = block.get("content", "")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: expected a string or a list of blocks")
    texts, attached = [], []
    for number, item in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        if kind == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif kind == "image":
            attached.append(_image_part(item.get("source"), at))
        elif kind == "document":
            attached.append(_document_part(item.get("source"), at))
        else:
            raise Untranslatable(f"{at}: a {kind!r} block has no OpenAI equivalent in a tool result")
    text = "\n".join(texts)
    if attached and not text:
        text = "(what the tool returned follows in the next message)"
    return text, attached


def _image_part(source: Any, where: str) -> dict:
    if isinstance(source, dict) and source.get("type") == "base64":
        return {"type": "image_url", "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"}}
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise Untranslatable(f"{where}: an image's source must be base64 or url")


def _document_part(source: Any, where: str) -> dict:
    if isinstance(source, dict) and source.get("type") == "base64":
        data_url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        return {"type": "file", "file": {"filename": "document.pdf", "file_data": data_url}}
    if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
        return {"type": "text", "text": source["data"]}
    raise Untranslatable(f"{where}: a document's source must be base64 or text")


def _user_turn(content: Any, where: str) -> list[dict]:
    """One user message as OpenAI's: its tool results first (one C{tool} message each), then the rest."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: expected a string or a list of blocks")
    tool_messages: list[dict] = []
    returned: list[dict] = []  # the images and documents tool results hold, which a chat tool message cannot
    parts: list[dict] = []
    for number, block in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _string(block.get("text", ""), f"{at}.text")})
        elif kind == "image":
            parts.append(_image_part(block.get("source"), at))
        elif kind == "document":
            parts.append(_document_part(block.get("source"), at))
        elif kind == "tool_result":
            text, attached = _tool_result_of(block, at)
            if block.get("is_error") is True:
                text = f"[tool error] {text}"
            tool_messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            if attached:
                returned.append({"type": "text", "text": f"What the tool call {block.get('tool_use_id')} returned:"})
                returned += attached
        else:
            raise Untranslatable(f"{at}: a {kind!r} block has no OpenAI equivalent")
    messages = tool_messages
    parts = returned + parts
    if parts:
        if all(part["type"] == "text" for part in parts):
            messages.append({"role": "user", "content": "\n".join(part["text"] for part in parts)})
        else:
            messages.append({"role": "user", "content": parts})
    return messages


def _tool_call_of(block: dict) -> dict:
    """A Messages C{tool_use} block as an OpenAI tool call (its input as JSON text)."""
    arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
    return {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}}


def _assistant_turn(content: Any, where: str) -> dict:
    """One assistant message as OpenAI's: its text, and its tool uses as C{tool_calls}."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: expected a string or a list of blocks")
    texts, calls = [], []
    for number, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_string(block.get("text", ""), f"{where}.content[{number}].text"))
        elif kind == "tool_use":
            calls.append(_tool_call_of(block))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier thinking never goes to another provider
        else:
            raise Untranslatable(f"{where}.content[{number}]: a {kind!r} block has no OpenAI equivalent")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _chat_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise Untranslatable("tools: expected a list")
    translated = []
    for number, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "name" not in tool:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise Untranslatable(f"tools[{number}]: the server tool {kind!r} has no OpenAI equivalent")
        function = {"name": tool["name"], "parameters": tool.get("input_schema", {"type": "object"})}
        if "description" in tool:
            function["description"] = tool["description"]
        translated.append({"type": "function", "function": function})
    return translated


def _chat_tool_choice(choice: Any) -> tuple[Any, bool]:
    """OpenAI's C{tool_choice}, and whether parallel tool calls are turned off."""
    if not isinstance(choice, dict):
        raise Untranslatable("tool_choice: expected an object")
    kind = choice.get("type")
    serial = choice.get("disable_parallel_tool_use") is True
    if kind == "auto":
        return "auto", serial
    if kind == "any":
        return "required", serial
    if kind == "none":
        return "none", serial
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, serial
    raise Untranslatable(f"tool_choice: the type {kind!r} has no OpenAI equivalent")


def messages_request_to_chat(
    body: dict, model: str | None, prefill: str | None = None, effort: bool = True, top_k: bool = False,
) -> dict:
    """
    A Messages request as an OpenAI chat completion request (sent as
    C{model} unless L{None}; with C{prefill}, the assistant text so far as
    the last message); its thinking as C{reasoning_effort} unless not
    C{effort}, its C{top_k} only with C{top_k}.  Raises L{Untranslatable}.
    """
    unknown = sorted(_asked(body, _MESSAGES_NO_EFFECT) - _MESSAGES_FIELDS)
    if unknown:
        raise Untranslatable(f"{unknown[0]!r} has no OpenAI equivalent")
    messages: list[dict] = []
    if "system" in body:
        messages.append({"role": "system", "content": _text_of_blocks(body["system"], "system")})
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise Untranslatable("messages: expected a list")
    for number, turn in enumerate(turns):
        where = f"messages[{number}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "user":
            messages.extend(_user_turn(turn.get("content"), where))
        elif role == "assistant":
            messages.append(_assistant_turn(turn.get("content"), where))
        elif role == "system":
            # Claude Code says some instructions as system turns among the messages.
            messages.append({"role": "system", "content": _text_of_blocks(turn.get("content"), f"{where}.content")})
        else:
            raise Untranslatable(f"{where}.role: expected user, assistant or system")
    if prefill is not None:
        if messages and messages[-1]["role"] == "assistant" and isinstance(messages[-1]["content"], str):
            messages[-1] = {**messages[-1], "content": messages[-1]["content"] + prefill}
        else:
            messages.append({"role": "assistant", "content": prefill})
    chat: dict[str, Any] = {"model": model if model is not None else body.get("model"), "messages": messages}
    for field in ("max_tokens", "temperature", "top_p"):
        if field in body:
            chat[field] = body[field]
    if "stop_sequences" in body:
        chat["stop"] = body["stop_sequences"]
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or set(metadata) - {"user_id"}:
            raise Untranslatable("metadata: only user_id has an OpenAI equivalent (user)")
        if metadata.get("user_id") is not None:
            chat["user"] = metadata["user_id"]
    if "tools" in body:
        chat["tools"] = _chat_tools(body["tools"])
    if "tool_choice" in body:
        chat["tool_choice"], serial = _chat_tool_choice(body["tool_choice"])
        if serial:
            chat["parallel_tool_calls"] = False
    reasoning = _effort(body)
    if reasoning is not None and effort:
        chat["reasoning_effort"] = reasoning
    output = body.get("output_config")
    if output is not None:
        if not isinstance(output, dict) or set(output) - {"effort", "format"}:
            raise Untranslatable("output_config: only effort and format have OpenAI equivalents")
        shape = output.get("format")
        if isinstance(shape, dict) and shape.get("type") == "json_schema" and isinstance(shape.get("schema"), dict):
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": shape["schema"]}}
        elif shape is not None:
            raise Untranslatable(f"output_config.format {shape!r} has no OpenAI equivalent")
    if body.get("context_management") is not None:
        _context_edits(body["context_management"])
    if top_k and body.get("top_k") is not None:
        chat["top_k"] = body["top_k"]
    return chat


# -- requests: chat to Messages ----------------------------------------------

#: The chat request fields that have a Messages equivalent (or are the gateway's own).
_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
        "stream_options", "user", "tools", "tool_choice", "parallel_tool_calls", "n", "reasoning_effort", "response_format",
    }
)

#: The thinking budget Claude gets for each chat C{reasoning_effort} (none for C{minimal} and C{none}).
THINKING_BUDGETS = {"low": 1024, "medium": 4096, "high": 16384}
#: The least thinking budget the Messages API takes.
_LEAST_THINKING = 1024


def _thinking_blocks(blocks: Any, where: str) -> list[dict]:
    """
    An assistant message's C{thinking_blocks} (Claude's own thinking,
    signed, as an earlier answer gave it: the chat convention LiteLLM
    uses too), checked: each goes back to Claude as it came.
    """
    if not isinstance(blocks, list):
        raise Untranslatable(f"{where}.thinking_blocks: expected a list")
    kept = []
    for number, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "thinking" and isinstance(block.get("thinking"), str) and isinstance(block.get("signature"), str):
            kept.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking" and isinstance(block.get("data"), str):
            kept.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise Untranslatable(f"{where}.thinking_blocks[{number}]: not a signed thinking block of Claude's")
    return kept


def _output_format(response_format: Any) -> dict | None:
    """
    A chat C{response_format} as the Messages API's structured output
    (C{output_config.format}): a C{json_schema} as it is, C{json_object} as
    the schema of any object; L{None} for text.
    """
    if response_format is None or response_format == {"type": "text"}:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return {"type": "json_schema", "schema": {"type": "object"}}
    shape = response_format.get("json_schema") if kind == "json_schema" else None
    if not isinstance(shape, dict) or not isinstance(shape.get("schema"), dict):
        raise Untranslatable(f"response_format {response_format!r} has no Anthropic equivalent")
    return {"type": "json_schema", "schema": shape["schema"]}


def _thinking(body: dict, max_tokens: int, choice: Any) -> dict | None:
    """
    The C{thinking} a chat C{reasoning_effort} asks Claude for, or L{None}
    when it asks for none, or when the request cannot think (the API
    refuses thinking with C{temperature} or C{top_p} changed, with a
    forced tool, or with a C{max_tokens} at or below the least budget).
    """
    budget = THINKING_BUDGETS.get(body.get("reasoning_effort"))
    if budget is None:
        return None
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature not in (None, 1) or (top_p is not None and top_p < 0.95) or choice not in (None, "auto", "none"):
        return None
    budget = min(budget, max_tokens - 1)
    return {"type": "enabled", "budget_tokens": budget} if budget >= _LEAST_THINKING else None


#: Chat fields at a value that changes nothing (OpenAI's default): as good as absent.
_CHAT_NO_EFFECT = {
    "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "store": False,
    "response_format": {"type": "text"}, "service_tier": "auto",
}


def _is_data_url(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("data:") and ";base64," in value


def _image_block(url: Any, where: str) -> dict:
    if not isinstance(url, str):
        raise Untranslatable(f"{where}: an image_url needs a url")
    if _is_data_url(url):
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks_of_parts(content: Any, where: str) -> str | list[dict]:
    """A chat message's content as Messages content: a string, or text, image and document blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Untranslatable(f"{where}.content: expected a string or a list of parts")
    blocks = []
    for number, part in enumerate(content):
        at = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            blocks.append(_image_block(image.get("url") if isinstance(image, dict) else image, at))
        elif kind == "file" and isinstance(part.get("file"), dict) and _is_data_url(part["file"].get("file_data")):
            media_type, data = part["file"]["file_data"][5:].split(";base64,", 1)
            blocks.append({"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}})
        else:
            raise Untranslatable(f"{at}: a {kind!r} part has no Anthropic equivalent")
    return blocks


def _tool_input(arguments: Any, where: str) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        raise Untranslatable(f"{where}: the tool call's arguments are not JSON") from None


def _append_turn(turns: list[dict], role: str, blocks: list[dict]) -> None:
    """Add blocks to the conversation: consecutive turns of one role become one (the API wants them alternating)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def _as_blocks(content: str | list[dict]) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def chat_request_to_messages(body: dict, model: str | None, default_max_tokens: int, prefill: str | None = None) -> dict:
    """
    An OpenAI chat completion request as a Messages request (C{max_tokens}
    is C{default_max_tokens} when it names none, as the API requires one).
    Raises L{Untranslatable}.
    """
    unknown = sorted(_asked(body, _CHAT_NO_EFFECT) - _CHAT_FIELDS)
    if unknown:
        raise Untranslatable(f"{unknown[0]!r} has no Anthropic equivalent")
    if body.get("n") not in (None, 1):
        raise Untranslatable("'n' above 1 has no Anthropic equivalent")
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and temperature > 1:
        raise Untranslatable("'temperature' above 1 has no Anthropic equivalent (its range is 0 to 1)")
    systems: list[str] = []
    turns: list[dict] = []
    chat_messages = body.get("messages")
    if not isinstance(chat_messages, list):
        raise Untranslatable("messages: expected a list")
    for number, message in enumerate(chat_messages):
        where = f"messages[{number}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            systems.append(_text_of_parts(message.get("content"), where))
        elif role == "user":
            _append_turn(turns, "user", _as_blocks(_blocks_of_parts(message.get("content"), where)))
        elif role == "assistant":
            blocks: list[dict] = []
            if message.get("thinking_blocks"):
                blocks.extend(_thinking_blocks(message["thinking_blocks"], where))  # first, as Claude gave them
            content = message.get("content")
            if content:
                blocks.extend(_as_blocks(_blocks_of_parts(content, where)))
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise Untranslatable(f"{where}.tool_calls: expected a list")
            for number, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise Untranslatable(f"{where}.tool_calls[{number}]: expected a function call")
                blocks.append(
                    {"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                     "input": _tool_input(function.get("arguments"), where)}
                )
            if blocks:  # the API refuses an empty turn
                _append_turn(turns, "assistant", blocks)
        elif role == "tool":
            result = {"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                      "content": _text_of_parts(message.get("content"), where)}
            _append_turn(turns, "user", [result])
        else:
            raise Untranslatable(f"{where}.role: {role!r} has no Anthropic equivalent")
    if prefill is not None:
        turns = with_prefill(turns, prefill)
    request: dict[str, Any] = {"model": model if model is not None else body.get("model"), "messages": turns}
    if systems:
        request["system"] = "\n".join(systems)
    maximum = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else body.get("max_tokens")
    request["max_tokens"] = maximum if isinstance(maximum, int) and not isinstance(maximum, bool) else default_max_tokens
    for field in ("temperature", "top_p"):
        if body.get(field) is not None:
            request[field] = body[field]
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, (str, list)):
            raise Untranslatable("stop: expected a string or a list")
        request["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if body.get("stream") is True:
        request["stream"] = True
    if body.get("user") is not None:
        request["metadata"] = {"user_id": body["user"]}
    if body.get("tools") is not None:
        request["tools"] = _messages_tools(body["tools"])
    choice = body.get("tool_choice")
    thinking = _thinking(body, request["max_tokens"], choice)
    if thinking is not None:
        request["thinking"] = thinking
    shape = _output_format(body.get("response_format"))
    if shape is not None:
        request["output_config"] = {"format": shape}
    serial = body.get("parallel_tool_calls") is False
    if choice is not None or (serial and "tools" in request):
        request["tool_choice"] = _messages_tool_choice(choice if choice is not None else "auto", serial)
    return request


def _text_of_parts(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in content):
        return "\n".join(str(part.get("text", "")) for part in content)
    raise Untranslatable(f"{where}.content: only text has an Anthropic equivalent here")


def _messages_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise Untranslatable("tools: expected a list")
    translated = []
    for number, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or "name" not in function:
            raise Untranslatable(f"tools[{number}]: only function tools have an Anthropic equivalent")
        one = {"name": function["name"], "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
        if function.get("description"):
            one["description"] = function["description"]
        translated.append(one)
    return translated


def _messages_tool_choice(choice: Any, serial: bool) -> dict:
    if choice == "auto":
        translated: dict[str, Any] = {"type": "auto"}
    elif choice == "required":
        translated = {"type": "any"}
    elif choice == "none":
        translated = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) and "name" in choice["function"]:
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise Untranslatable(f"tool_choice: {choice!r} has no Anthropic equivalent")
    if serial and translated["type"] != "none":
        translated["disable_parallel_tool_use"] = True
    return translated


# -- JSON answers --------------------------------------------------------------


def _tool_use_block(call: Any) -> dict:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments")
    try:
        tool_input = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        tool_input = {"_unparsed_arguments": arguments}
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": tool_input}


def _as_it_is_when_malformed(translate: Callable[..., bytes]) -> Callable[..., bytes]:
    """A backend's answer the translation cannot read (not JSON, or not the shape it claims) is returned as it is."""

    @functools.wraps(translate)
    def guarded(body: bytes, *args: Any) -> bytes:
        try:
            return translate(body, *args)
        except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError):
            return body

    return guarded


def _reasoning_of(delta: dict) -> str:
    """A chat message's (or delta's) reasoning text: C{reasoning_content} (vLLM, DeepSeek) or C{reasoning} (newer vLLM)."""
    for field in ("reasoning_content", "reasoning"):
        value = delta.get(field)
        if type(value) is str and value:
            return value
    return ""


@_as_it_is_when_malformed
def chat_answer_to_message(body: bytes, stop_sequences: Iterable[str] = ()) -> bytes:
    """An OpenAI chat completion (JSON) as a Messages answer; what is not one is returned as it is."""
    answer = _loads(body)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return body
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict] = []
    reasoning = _reasoning_of(message)
    if reasoning:
        # A backend's reasoning (vLLM's, DeepSeek's) as a thinking block: unsigned, as no provider signed it.
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        content.append(_tool_use_block(call))
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences)
    usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    prompt = usage.get("prompt_tokens") or 0
    cached = cached if isinstance(cached, int) and 0 < cached <= prompt else 0
    return _dumps(
        {
            "id": answer.get("id"),
            "type": "message",
            "role": "assistant",
            "model": answer.get("model"),
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": prompt - cached,
                "output_tokens": usage.get("completion_tokens") or 0,
                "cache_read_input_tokens": cached,
                "cache_creation_input_tokens": 0,
            },
        }
    )


def _chat_usage(usage: Any) -> dict:
    usage = usage if isinstance(usage, dict) else {}
    read = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + read
    completion = usage.get("output_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
    }


@_as_it_is_when_malformed
def message_answer_to_chat(body: bytes, created: int) -> bytes:
    """A Messages answer (JSON) as an OpenAI chat completion; what is not one is returned as it is."""
    answer = _loads(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("content"), list):
        return body
    texts, calls, thinking = [], [], []
    for block in answer["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            calls.append(_tool_call_of(block))
        elif kind in ("thinking", "redacted_thinking"):
            thinking.append(block)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    if thinking:
        # Claude's signed thinking, as chat says it (LiteLLM's convention): the text, and the blocks to send back.
        message["reasoning_content"] = "".join(str(block.get("thinking", "")) for block in thinking)
        message["thinking_blocks"] = thinking
    reason = answer.get("stop_reason")
    return _dumps(
        {
            "id": answer.get("id"),
            "object": "chat.completion",
            "created": created,
            "model": answer.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": _FINISH_OF_STOP.get(reason, "stop") if reason else None}],
            "usage": _chat_usage(answer.get("usage")),
        }
    )


# -- error bodies ----------------------------------------------------------------


def chat_error_to_anthropic(status: int, body: bytes) -> bytes:
    """An OpenAI-style error answer as the Messages API's error shape (its message kept)."""
    _, message = error_codes(body)
    if not message:
        message = body[:500].decode("utf-8", "replace") or f"the backend answered {status}"
    return _dumps({"type": "error", "error": {"type": error_type_for(status), "message": message}})



def messages_error_to_chat(status: int, body: bytes) -> bytes:
    """
    A Messages error answer as OpenAI's shape; a prompt too long for the
    model gets the code C{context_length_exceeded}, as OpenAI's has.
    """
    codes, message = error_codes(body)
    if not message:
        message = body[:500].decode("utf-8", "replace") or f"the backend answered {status}"
    kind = next(iter(sorted(codes - {"error"})), error_type_for(status))
    code = "context_length_exceeded" if any(phrase in message.lower() for phrase in CONTEXT_PHRASES) else None
    return _dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


# -- event streams -------------------------------------------------------------------


_TEXT_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
    b'"delta":{"type":"text_delta","text":%b}}\n\n'
)


class ChatToMessagesStream:
    """
    Writes an OpenAI chat completion stream, event by event, as the
    Messages API's event sequence: C{message_start} (and a C{ping}) at its
    first chunk, a thinking block for its reasoning (C{reasoning_content}),
    a text block for its text, a C{tool_use} block for each tool call (its
    arguments as C{input_json_delta}s), and at C{[DONE]}
    the C{message_delta} with the stop reason and usage, then
    C{message_stop}.  One writer serves one client's answer, across the
    attempts that continue it.
    """

    def __init__(self, stop_sequences: Iterable[str] = ()) -> None:
        self._stop_sequences = tuple(stop_sequences)
        self._started = False
        self._open: tuple[str, int] | None = None  # the open block: its kind and index (tool: OpenAI's index)
        self._next_index = 0
        self._stop: tuple[str | None, str | None] = (None, None)
        self._usage: dict = {}
        self._ended = False

    def finish(self) -> bytes:
        """The end of the answer when its stream ended whole without C{[DONE]} (nothing once it was written)."""
        if self._ended or not self._started:
            return b""
        return self._close() + self._end()

    def __call__(self, event: bytes, facts: ChunkFacts) -> bytes:
        if facts.done:
            return self.finish()
        chunk = facts.data
        if chunk is None:
            return sse_event("ping", {"type": "ping"}) if self._started else b""
        out = []
        if not self._started:
            self._started = True
            out.append(self._message_start(chunk))
        choices = chunk.get("choices")
        choice = choices[0] if type(choices) is list and choices and type(choices[0]) is dict else None
        if choice is not None:
            delta = choice.get("delta") if type(choice.get("delta")) is dict else {}
            reasoning = _reasoning_of(delta) if len(delta) > 1 or not facts.text else ""
            if reasoning:
                if self._open is None or self._open[0] != "thinking":
                    out.append(self._close())
                    out.append(self._start_block({"type": "thinking", "thinking": "", "signature": ""}, ("thinking", -1)))
                out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
            if facts.text:
                if self._open is None or self._open[0] != "text":
                    out.append(self._close())
                    out.append(self._start_block({"type": "text", "text": ""}, ("text", -1)))
                # The most common event: from a template, not a dict (the writer's stream 26% faster).
                out.append(_TEXT_DELTA % (self._next_index - 1, _dumps(facts.text)))
            calls = delta.get("tool_calls")
            for call in calls if type(calls) is list else ():
                out.append(self._tool_delta(call))
            if choice.get("finish_reason"):
                out.append(self._close())
                self._stop = _stop_reason(choice["finish_reason"], choice.get("stop_reason"), self._stop_sequences)
        if facts.usage is not None:
            self._usage = {
                "input_tokens": facts.usage.prompt_tokens - facts.usage.cached_tokens,
                "cache_read_input_tokens": facts.usage.cached_tokens,
                "output_tokens": facts.usage.completion_tokens,
            }
        return b"".join(out)

    def _message_start(self, chunk: dict) -> bytes:
        message = {
            "id": chunk.get("id"), "type": "message", "role": "assistant", "model": chunk.get("model"), "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse_event("message_start", {"type": "message_start", "message": message}) + sse_event("ping", {"type": "ping"})

    def _start_block(self, block: dict, opened: tuple[str, int]) -> bytes:
        index = self._next_index
        self._next_index += 1
        self._open = (opened[0], opened[1])
        return sse_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})

    def _delta(self, delta: dict) -> bytes:
        return sse_event("content_block_delta", {"type": "content_block_delta", "index": self._next_index - 1, "delta": delta})

    def _tool_delta(self, call: Any) -> bytes:
        if type(call) is not dict:
            return b""
        out = []
        function = call.get("function") if type(call.get("function")) is dict else {}
        index = call.get("index", 0)
        if self._open != ("tool", index):
            out.append(self._close())
            block = {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": {}}
            out.append(self._start_block(block, ("tool", index)))
        arguments = function.get("arguments")
        if arguments:
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return b"".join(out)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self._next_index - 1})

    def _end(self) -> bytes:
        self._ended = True
        stop_reason, stop_sequence = self._stop
        usage = self._usage or {"output_tokens": 0}
        delta = {"stop_reason": stop_reason or "end_turn", "stop_sequence": stop_sequence}
        return sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}) + sse_event(
            "message_stop", {"type": "message_stop"}
        )


_CONTENT_TAIL = b'},"finish_reason":null}]}\n\n'


class MessagesToChatStream:
    """
    Writes a Messages event stream, event by event, as an OpenAI chat
    completion stream: a role chunk at C{message_start}, a content chunk
    for each text delta, C{tool_calls} chunks for tool uses, the finish
    reason at C{message_delta} (then its usage, when the client asked for
    it), C{data: [DONE]} at C{message_stop}.  Thinking is said as chat
    says it (LiteLLM's convention): C{reasoning_content} deltas, then the
    whole signed block in C{thinking_blocks} when it ends.  One writer
    serves one client's answer, across the attempts that continue it.

    @param created: the C{created} time of every chunk.
    """

    def __init__(self, created: int, client_wants_usage: bool) -> None:
        self._created = created
        self._wants_usage = client_wants_usage
        self._id: str | None = None
        self._model: str | None = None
        self._tools: dict[int, int] = {}  # Messages block index -> tool call index
        #: The thinking blocks open now, by Messages block index: their text so far and signature.
        self._thinking: dict[int, list] = {}
        #: Every content chunk's bytes before its text, made at message_start.
        self._content_head: bytes | None = None
        self._ended = False

    def finish(self) -> bytes:
        """The end of the answer when its stream ended whole without C{message_stop} (nothing once it was written)."""
        if self._ended or self._id is None:
            return b""
        self._ended = True
        return b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish: str | None = None) -> bytes:
        return chunk_event(
            {
                "id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def __call__(self, event: bytes, facts: ChunkFacts) -> bytes:
        if facts.done:
            return self.finish()
        data = facts.data
        if data is None:
            return b""
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message") if type(data.get("message")) is dict else {}
            if self._id is None:
                self._id, self._model = message.get("id"), message.get("model")
                self._content_head = (
                    b'data: {"id":' + _dumps(self._id) + b',"object":"chat.completion.chunk","created":'
                    + _dumps(self._created) + b',"model":' + _dumps(self._model) + b',"choices":[{"index":0,"delta":{"content":'
                )
                return self._chunk({"role": "assistant", "content": ""})
            return b""
        if kind == "content_block_start":
            block = data.get("content_block") if type(data.get("content_block")) is dict else {}
            index = data.get("index")
            if block.get("type") == "thinking" and type(index) is int:
                self._thinking[index] = [[], block.get("signature") or ""]
                return b""
            if block.get("type") == "redacted_thinking":
                return self._chunk({"thinking_blocks": [block]})
            if block.get("type") != "tool_use" or type(index) is not int:
                return b""
            number = self._tools[index] = len(self._tools)
            call = {"index": number, "id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": ""}}
            return self._chunk({"tool_calls": [call]})
        if kind == "content_block_delta":
            delta = data.get("delta") if type(data.get("delta")) is dict else {}
            if facts.text:
                if self._content_head is None:  # no message_start came first
                    return self._chunk({"content": facts.text})
                # The most common chunk: from a template, not a dict (the writer's stream 41% faster).
                return b"".join((self._content_head, _dumps(facts.text), _CONTENT_TAIL))
            index = data.get("index")
            if type(index) is int and index in self._thinking:
                if delta.get("type") == "thinking_delta" and type(delta.get("thinking")) is str:
                    self._thinking[index][0].append(delta["thinking"])
                    return self._chunk({"reasoning_content": delta["thinking"]})
                if delta.get("type") == "signature_delta" and type(delta.get("signature")) is str:
                    self._thinking[index][1] += delta["signature"]
                return b""
            if delta.get("type") == "input_json_delta" and type(index) is int and index in self._tools:
                call = {"index": self._tools[index], "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [call]})
            return b""
        if kind == "message_delta":
            reason = facts.finish_reasons[0] if facts.finish_reasons else None
            out = self._chunk({}, _FINISH_OF_STOP.get(reason, "stop")) if reason else b""
            if self._wants_usage and facts.usage is not None:
                usage = {
                    "prompt_tokens": facts.usage.prompt_tokens,
                    "completion_tokens": facts.usage.completion_tokens,
                    "total_tokens": facts.usage.prompt_tokens + facts.usage.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": facts.usage.cached_tokens},
                }
                out += chunk_event(
                    {"id": self._id, "object": "chat.completion.chunk", "created": self._created, "model": self._model,
                     "choices": [], "usage": usage}
                )
            return out
        if kind == "content_block_stop" and type(data.get("index")) is int and data["index"] in self._thinking:
            parts, signature = self._thinking.pop(data["index"])
            return self._chunk({"thinking_blocks": [{"type": "thinking", "thinking": "".join(parts), "signature": signature}]})
        return b""  # content_block_stop, ping, and what OpenAI's stream has no place for


#: A writer: an event of the backend's stream, with what it carries, as the client's bytes.
StreamWriter = Callable[[bytes, ChunkFacts], bytes]
