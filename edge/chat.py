"""POST /v1/chat/completions: OpenAI's chat request as inference_svc's GenerateRequest, and the
chat.completion / chat.completion.chunk shapes of the answer. edge.serving does the rest."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence

from aiohttp import web

from cloudach.inference.v1 import inference_pb2 as pb
from edge import params
from edge.errors import bad_request
from edge.logprobs import chat_logprobs
from edge.schema import CREATE_CHAT_COMPLETION_REQUEST
from edge.serving import Choice, Job, serve
from edge.sse import ChunkEncoder
from edge.validation import validate

ROLES = {"system": pb.ROLE_SYSTEM, "developer": pb.ROLE_DEVELOPER, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def _content(content: str | list) -> str:
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


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
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    messages = [pb.ChatMessage(role=ROLES[m["role"]], content=_content(m["content"])) for m in body["messages"]]
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
    )
    return Job(
        id=completion_id,
        created=int(time.time()),
        model=body["model"],
        stream=bool(body.get("stream")),
        include_usage=params.include_usage(body),
        generates=(generate,),
        format=CHAT,
        max_tokens_name=max_tokens_name,
        prompt_chars=sum(len(m.content) for m in generate.messages),
        user=body.get("user") or "",
    )


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
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(c.logprobs) if job.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": usage,
        }


CHAT = ChatFormat()


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    return await serve(request, parse_chat_request)


__all__ = ["create_chat_completion", "parse_chat_request"]
