"""Tool calling: the tools shown to the model as it was trained to see them, and its calls read back.

Two formats, chosen per model in the registry (`tool_format`):
- "llama3_json": Llama 3.1 Instruct's JSON-based tool calling, as Meta's prompt format guide
  (llama.meta.com, model-cards-and-prompt-formats/llama3_1, "JSON based tool calling") and the
  chat template in meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json give it (vLLM's
  examples/tool_chat_template_llama3.1_json.jinja is the same): "Environment: ipython" in the
  system turn, the function definitions in the first user turn, a call answered as one bare
  `{"name": ..., "parameters": {...}}`, its result in an `ipython` turn.
- "hermes": the Hermes function-calling format (NousResearch Hermes 2 Pro; also Qwen2.5's), for
  ChatML models such as SmolLM2, whose own template has no tools: the definitions inside
  <tools></tools> in the system turn, each call as `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, results as `<tool_response>` in a `tool` turn. A 135M model follows it only when
  guided: tool_choice `required` or a named function constrain generation to a call.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cloudach.errors import InvalidArgument
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.templates import Message

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
_ALPHABET = string.ascii_letters + string.digits


def call_id() -> str:
    """OpenAI's shape: call_ and 24 letters and digits."""
    return "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    #: the key of a call's arguments in the model's JSON
    arguments_key: str
    #: the text around each call in the model's output ("" for a bare JSON object)
    opener: str
    closer: str
    #: the role of a tool's result turn
    result_role: str

    def definitions(self, tools: Sequence[pb.Tool]) -> str:
        """Hermes: one JSON line a tool; Llama 3.1: each indented by 4, a blank line apart (its template's tojson)."""
        functions = [{"type": "function", "function": _function(t)} for t in tools]
        if self.name == "hermes":
            return "\n".join(json.dumps(f) for f in functions)
        return "\n\n".join(json.dumps(f, indent=4) for f in functions)

    def call_text(self, call: pb.ToolCall) -> str:
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            arguments = call.arguments
        body = json.dumps({"name": call.name, self.arguments_key: arguments})
        return f"{self.opener}\n{body}\n{self.closer}" if self.opener else body

    def result_text(self, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>" if self.name == "hermes" else content

    def prepare(self, messages: Sequence[Message], tools: Sequence[pb.Tool], default_system: str | None) -> list[Message]:
        """The conversation with the tools shown, past calls and results in the model's format."""
        turns = [self._turn(m) for m in messages]
        if not tools:
            return turns
        if self.name == "hermes":
            return _with_system(turns, default_system, _HERMES_SYSTEM.format(tools=self.definitions(tools)))
        turns = _with_system(turns, default_system, "Environment: ipython")
        first_user = next((i for i, m in enumerate(turns) if m.role == "user"), None)
        if first_user is not None:
            turns[first_user] = replace(turns[first_user], content=_LLAMA_USER.format(
                tools=self.definitions(tools), question=turns[first_user].content))
        return turns

    def _turn(self, m: Message) -> Message:
        if m.role == "tool":
            return Message(self.result_role, self.result_text(m.content))
        if m.tool_calls:
            calls = "\n".join(self.call_text(c) for c in m.tool_calls)
            return Message("assistant", f"{m.content}\n{calls}" if m.content else calls)
        return m


def _function(tool: pb.Tool) -> dict:
    function = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = json.loads(tool.parameters_json) if tool.parameters_json else {"type": "object", "properties": {}}
    return function


def _with_system(turns: list[Message], default_system: str | None, extra: str) -> list[Message]:
    if turns and turns[0].role == "system":
        return [replace(turns[0], content=f"{turns[0].content}\n\n{extra}"), *turns[1:]]
    head = f"{default_system}\n\n{extra}" if default_system else extra
    return [Message("system", head), *turns]


_HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function "
    "call return a json object with function name and arguments within <tool_call></tool_call> XML tags as "
    "follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-dict>}}\n</tool_call>"
)
#: as Meta's chat template words it (no space before "Do not use variables": the template's own)
_LLAMA_USER = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments that "
    "best answers the given prompt.\n\nRespond in the format {{\"name\": function name, \"parameters\": dictionary "
    "of argument name and its value}}.Do not use variables.\n\n{tools}\n\n{question}"
)

FORMATS = {
    "hermes": ToolFormat("hermes", "arguments", "<tool_call>", "</tool_call>", "tool"),
    "llama3_json": ToolFormat("llama3_json", "parameters", "", "", "ipython"),
}


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for its generation."""

    format: ToolFormat
    mode: int  # pb.ToolChoice.Mode
    #: the guide forcing a call (required, or a named function), else None
    guide: tuple[str, str] | None
    parallel: bool


def check_tools(request: pb.GenerateRequest, tool_format: str) -> ToolPlan | None:
    """Validates the tools and tool choice (InvalidArgument names the field); None when the model
    is not to see tools at all."""
    tools = request.tools
    choice = request.tool_choice
    if not tools:
        if choice.mode in (pb.ToolChoice.MODE_REQUIRED, pb.ToolChoice.MODE_FUNCTION):
            raise InvalidArgument("tool_choice requires tools", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    schemas = {}
    for i, tool in enumerate(tools):
        if not NAME.match(tool.name):
            raise InvalidArgument(f"Invalid 'tools[{i}].function.name': string does not match pattern. Expected a "
                                  "string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                                  param=f"tools[{i}].function.name", code="invalid_value")
        if tool.name in schemas:
            raise InvalidArgument(f"tools[{i}]: the function name {tool.name!r} is used twice", param=f"tools[{i}].function.name")
        try:
            parameters = json.loads(tool.parameters_json) if tool.parameters_json else {"type": "object"}
        except ValueError:
            raise InvalidArgument(f"tools[{i}].function.parameters is not JSON", param=f"tools[{i}].function.parameters") from None
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise InvalidArgument(f"Invalid schema for function '{tool.name}': schema must be a JSON Schema of "
                                  "'type: \"object\"'.", param=f"tools[{i}].function.parameters", code="invalid_function_parameters")
        schemas[tool.name] = parameters
    if choice.mode == pb.ToolChoice.MODE_NONE:
        return None
    guide = None
    if choice.mode == pb.ToolChoice.MODE_FUNCTION:
        if choice.function_name not in schemas:
            raise InvalidArgument(f"Invalid 'tool_choice': no function named '{choice.function_name}' was given in "
                                  "'tools'.", param="tool_choice", code="invalid_value")
        guide = ("json_schema", json.dumps(_call_schema(choice.function_name, schemas[choice.function_name], tool_format)))
    elif choice.mode == pb.ToolChoice.MODE_REQUIRED:
        calls = [_call_schema(name, schema, tool_format) for name, schema in schemas.items()]
        guide = ("json_schema", json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls}))
    parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
    return ToolPlan(FORMATS[tool_format], choice.mode, guide, parallel)


def _call_schema(name: str, parameters: dict, tool_format: str) -> dict:
    """One call as the model writes it, the name first (so it can be streamed before the arguments)."""
    return {"type": "object", "properties": {"name": {"const": name}, FORMATS[tool_format].arguments_key: parameters},
            "required": ["name", FORMATS[tool_format].arguments_key], "additionalProperties": False}


#: what may follow a call's arguments before its closer (keys the model added, whitespace)
MAX_TAIL_CHARS = 256
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class CallParser:
    """Reads one choice's text as it streams: content, and tool calls as OpenAI streams them (a
    call's first delta: id and name; then fragments of its arguments)."""

    __slots__ = ("_format", "_forced", "_parallel", "_state", "_buffer", "_depth", "_in_string", "_escaped",
                 "calls", "_started")

    def __init__(self, plan: ToolPlan) -> None:
        self._format = plan.format
        self._forced = plan.guide is not None
        self._parallel = plan.parallel
        self.calls = 0
        self._started = False  # any text seen (a bare-JSON format's call must come first)
        self._buffer = ""
        self._depth = 0
        self._in_string = self._escaped = False
        self._state = "head" if self._forced else "content"

    def push(self, text: str) -> list[pb.TokenDelta]:
        out: list[pb.TokenDelta] = []
        self._feed(text, out)
        return out

    def flush(self) -> list[pb.TokenDelta]:
        """The end of the choice: what is held is given as content or as one whole call."""
        out: list[pb.TokenDelta] = []
        held, self._buffer = self._buffer, ""
        if self._state == "content" and (held.strip() or (held and not self.calls)):
            out.append(pb.TokenDelta(text=held))
        elif self._state == "head":
            self._whole(held, out)
        return out

    def _whole(self, held: str, out: list[pb.TokenDelta]) -> None:
        """A call read whole (its name did not come first): one start and one arguments delta, or
        the text as content when it is no call after all."""
        body = held.strip().removesuffix(self._format.closer).strip()
        try:
            call = json.loads(body)
            name = call["name"]
            arguments = call.get(self._format.arguments_key, call.get("arguments", {}))
        except (ValueError, KeyError, TypeError):
            out.append(pb.TokenDelta(text=("" if self._forced else self._format.opener) + held))
            return
        self._start(str(name), out)
        out.append(self._fragment(arguments if isinstance(arguments, str) else json.dumps(arguments)))

    def _feed(self, text: str, out: list[pb.TokenDelta]) -> None:
        while text:
            if self._state == "text":  # a bare-JSON format's answer that is no call
                out.append(pb.TokenDelta(text=text))
                return
            if self._state == "done":  # the one call parallel_tool_calls=false allows has been made
                return
            if self._state == "content":
                text = self._content(text, out)
            elif self._state == "head":
                text = self._head(text, out)
            elif self._state == "arguments":
                text = self._arguments(text, out)
            else:  # "tail": after a call's arguments, up to its closer
                text = self._tail(text)

    def _content(self, text: str, out: list[pb.TokenDelta]) -> str:
        opener = self._format.opener
        pending = self._buffer + text
        self._buffer = ""
        if not opener:  # a bare JSON call is the whole answer: it must come first
            if not self._started and not pending.strip():
                self._buffer = pending
                return ""
            if not self._started and pending.lstrip().startswith("{") and (self._parallel or not self.calls):
                self._started = True
                self._state = "head"
                return pending
            self._started = True
            out.append(pb.TokenDelta(text=pending))
            self._state = "text"
            return ""
        at = pending.find(opener) if (self._parallel or not self.calls) else -1
        if at >= 0:
            if pending[:at].strip() or (pending[:at] and not self.calls):
                out.append(pb.TokenDelta(text=pending[:at]))
            self._state = "head"
            return pending[at + len(opener):]
        hold = next((k for k in range(min(len(opener) - 1, len(pending)), 0, -1) if pending.endswith(opener[:k])), 0)
        emit = pending[:len(pending) - hold]
        if self.calls and not emit.strip():
            self._buffer = pending  # between calls: no content unless text follows
            return ""
        if emit:
            out.append(pb.TokenDelta(text=emit))
        self._buffer = pending[len(pending) - hold:]
        return ""

    def _head(self, text: str, out: list[pb.TokenDelta]) -> str:
        self._buffer += text
        match = _CALL_HEAD.match(self._buffer)
        if match is None:
            closer = self._format.closer
            if closer and closer in self._buffer:  # the whole call has come: read it whole
                body, rest = self._buffer.split(closer, 1)
                self._buffer = ""
                self._whole(body, out)
                self._state = "content"
                return rest.lstrip("\n")
            return ""  # otherwise read whole at the end (flush)
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:  # an escape JSON does not have: read the call whole at its end
            return ""
        rest = self._buffer[match.end():]
        self._buffer = ""
        self._start(name, out)
        self._state = "arguments"
        self._depth = 0
        return rest

    def _arguments(self, text: str, out: list[pb.TokenDelta]) -> str:
        """The arguments' JSON value as it streams: an object (a string or number too, as models
        unguided sometimes write), ending where the value does."""
        if self._depth == 0 and not self._in_string:
            text = text.lstrip()  # the value begins at its first character
            if not text:
                return ""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
                    if self._depth == 0:  # a string value, whole
                        return self._end_arguments(text, i + 1, out)
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                if self._depth == 0:  # a bare value, ended by the call's own brace
                    return self._end_arguments(text, i, out)
                self._depth -= 1
                if self._depth == 0:
                    return self._end_arguments(text, i + 1, out)
            elif c == "," and self._depth == 0:
                return self._end_arguments(text, i, out)
        out.append(self._fragment(text))
        return ""

    def _end_arguments(self, text: str, end: int, out: list[pb.TokenDelta]) -> str:
        if text[:end].strip():
            out.append(self._fragment(text[:end].rstrip()))
        self._state = "tail"
        return text[end:]

    def _tail(self, text: str) -> str:
        """After a call's arguments: the rest of the call (its closing brace, keys the model added,
        the closer) is skipped; what follows is content again (with parallel calls off, nothing is)."""
        self._buffer += text
        closer = self._format.closer
        if closer:
            at = self._buffer.find(closer)
            if at < 0:
                if len(self._buffer) <= MAX_TAIL_CHARS:
                    return ""
                rest, self._buffer = self._buffer, ""  # no closer after all: what followed is text
                return self._after_call(rest)
            rest, self._buffer = self._buffer[at + len(closer):], ""
            return self._after_call(rest.lstrip("\n"))
        stripped = self._buffer.lstrip()
        if not stripped:
            return ""
        self._buffer = ""
        return self._after_call(stripped[1:] if stripped[0] == "}" else stripped)

    def _after_call(self, rest: str) -> str:
        self._state = "content" if self._parallel else "done"
        return rest if self._parallel else ""

    def _start(self, name: str, out: list[pb.TokenDelta]) -> None:
        out.append(pb.TokenDelta(tool_call=pb.ToolCallDelta(index=self.calls, id=call_id(), name=name)))
        self.calls += 1

    def _fragment(self, arguments: str) -> pb.TokenDelta:
        return pb.TokenDelta(tool_call=pb.ToolCallDelta(index=self.calls - 1, arguments=arguments))
