"""POST /v1/chat/completions: OpenAI's chat request as inference_svc's GenerateRequest, and the
chat.completion / chat.completion.chunk shapes of the answer. edge.serving does the rest."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

from aiohttp import web

from cloudach.inference.v1 import inference_pb2 as pb
from edge import params
from edge.errors import bad_request
from edge.logprobs import chat_logprobs
from edge.schema import CREATE_CHAT_COMPLETION_REQUEST
from edge.job import Choice, Job
from edge.serving import serve
from edge.sse import ChunkEncoder
from edge.validation import validate

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT,
         "tool": pb.ROLE_TOOL}
TOOL_CHOICES = {"auto": pb.ToolChoice.MODE_AUTO, "none": pb.ToolChoice.MODE_NONE, "required": pb.ToolChoice.MODE_REQUIRED}


def _content(content: str | list | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def _message(i: int, m: dict) -> pb.ChatMessage:
    """One message; content may be missing only in an assistant turn with tool calls."""
    calls = m.get("tool_calls") or []
    if m.get("content") is None and not (m["role"] == "assistant" and calls):
        raise bad_request(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content",
                          code="missing_required_parameter")
    if calls and m["role"] != "assistant":
        raise bad_request(f"Invalid parameter: 'messages[{i}].tool_calls' is only allowed in assistant messages.",
                          param=f"messages[{i}].tool_calls", code="invalid_value")
    if m["role"] == "tool" and not m.get("tool_call_id"):
        raise bad_request(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                          param=f"messages[{i}].tool_call_id", code="missing_required_parameter")
    return pb.ChatMessage(
        role=ROLES[m["role"]], content=_content(m.get("content")), name=m.get("name") or "",
        tool_call_id=m.get("tool_call_id") or "",
        tool_calls=[pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                    for c in calls],
    )


def _tools(body: dict) -> tuple[list[pb.Tool], pb.ToolChoice]:
    """tools and tool_choice; inference_svc checks names, schemas and that a named tool exists."""
    tools = [pb.Tool(name=t["function"]["name"], description=t["function"].get("description") or "",
                     parameters_json=json.dumps(t["function"]["parameters"]) if "parameters" in t["function"] else "")
             for t in body.get("tools") or ()]
    choice = body.get("tool_choice")
    if choice is None:
        return tools, pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO if tools else pb.ToolChoice.MODE_NONE)
    if isinstance(choice, dict):
        return tools, pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function_name=choice["function"]["name"])
    if choice not in TOOL_CHOICES:
        raise bad_request(f"Invalid value: '{choice}'. Supported values are: 'none', 'auto' and 'required'.",
                          param="tool_choice", code="invalid_value")
    return tools, pb.ToolChoice(mode=TOOL_CHOICES[choice])


_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _guide(response_format: dict | None, messages: list[pb.ChatMessage]) -> pb.Guide | None:
    """response_format as inference_svc's guide (which checks that it compiles), with OpenAI's checks."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        if not any("json" in m.content.lower() for m in messages):
            raise bad_request("'messages' must contain the word 'json' in some form, to use 'response_format' of "
                              "type 'json_object'.", param="messages")
        return pb.Guide(type=pb.GUIDE_TYPE_JSON_OBJECT)
    spec = response_format.get("json_schema")
    if spec is None:
        raise bad_request("Missing required parameter: 'response_format.json_schema'.",
                          param="response_format.json_schema", code="missing_required_parameter")
    if not _SCHEMA_NAME.match(spec["name"]):
        raise bad_request("Invalid 'response_format.json_schema.name': string does not match pattern. Expected a "
                          "string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                          param="response_format.json_schema.name", code="invalid_value")
    schema = spec.get("schema") or {"type": "object"}
    return pb.Guide(type=pb.GUIDE_TYPE_JSON_SCHEMA, text=json.dumps(schema))


def parse_chat_request(body: dict) -> Job:
    """Validates an OpenAI request body against the published schema and translates it."""
    validate(CREATE_CHAT_COMPLETION_REQUEST, body)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad_request("Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported.",
                          param="max_tokens", code="invalid_parameter_combination")
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    messages = [_message(i, m) for i, m in enumerate(body["messages"])]
    tools, tool_choice = _tools(body)
    top_logprobs = body.get("top_logprobs") or 0
    if top_logprobs and not body.get("logprobs"):
        raise bad_request("Invalid value for 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' "
                          "is used.", param="top_logprobs", code="invalid_value")
    generate = pb.GenerateRequest(
        request_id=completion_id,
        model=body["model"],
        messages=messages,
        sampling=params.sampling(body),
        stopping=params.stopping(body, max_tokens_name),
        guide=_guide(body.get("response_format"), messages),
        n=body.get("n") or 1,
        logprobs=bool(body.get("logprobs")),
        top_logprobs=top_logprobs,
        tools=tools,
        tool_choice=tool_choice,
    )
    if body.get("parallel_tool_calls") is not None:
        generate.parallel_tool_calls = body["parallel_tool_calls"]
    return Job.from_body(body, completion_id, (generate,), CHAT, max_tokens_name,
                         prompt_chars=sum(len(m.content) for m in generate.messages))


class ChatFormat:
    """chat.completion and chat.completion.chunk."""

    @staticmethod
    def encoder(job: Job) -> ChunkEncoder:
        return ChunkEncoder(job.id, job.created, job.model, job.include_usage)

    @staticmethod
    def opening(job: Job, encoder: ChunkEncoder) -> bytes:
        return b"".join(encoder.role(i) for i in range(job.choices))

    @staticmethod
    def body(job: Job, choices: Sequence[Choice], usage: dict) -> dict:
        return {
            "id": job.id,
            "object": "chat.completion",
            "created": job.created,
            "model": job.model,
            "choices": [
                {
                    "index": c.index,
                    "message": _message_out(c),
                    "logprobs": chat_logprobs(c.logprobs) if job.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage,
        }


def _message_out(c: Choice) -> dict:
    message = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None, "refusal": None}
    if c.tool_calls:
        message["tool_calls"] = [{"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}}
                                 for t in c.tool_calls]
    return message


CHAT = ChatFormat()


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse_chat_request)


__all__ = ["create_chat_completion", "parse_chat_request"]
