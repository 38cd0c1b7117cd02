"""The public API's schemas, as JSON Schema (OpenAPI 3.1) documents.

This is the one description of the API: edge.validation checks requests against it and
edge.openapi publishes it at /openapi.json, so the two cannot drift. Names follow OpenAI's.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def nullable(schema: Schema) -> Schema:
    """The schema, or null (OpenAI accepts null for every optional field)."""
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*types, "null"]}


def named_schema(key: str, description: str) -> Schema:
    """A named JSON Schema, as OpenAI's function tools and json_schema response formats carry one."""
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "a-z, A-Z, 0-9, underscores and dashes, up to 64."},
            "description": {"type": "string"},
            key: {"type": "object", "description": description},
            "strict": nullable({"type": "boolean"}),
        },
        "required": ["name"],
        "additionalProperties": False,
    }


TEXT_PART: Schema = {
    "type": "object",
    "description": "A text content part. Images, audio and files are not supported yet.",
    "properties": {
        "type": {"type": "string", "enum": ["text"]},
        "text": {"type": "string"},
    },
    "required": ["type", "text"],
    "additionalProperties": False,
}

TOOL_CALL: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "arguments": {"type": "string", "description": "JSON text."}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "type", "function"],
    "additionalProperties": False,
}

MESSAGE: Schema = {
    "type": "object",
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "type": ["string", "array", "null"],
            "items": TEXT_PART,
            "description": "A string, or an array of text parts; may be null in an assistant turn with tool_calls.",
        },
        "name": {"type": "string", "description": "Accepted; neither model's template has a place for it."},
        "tool_calls": {"type": "array", "items": TOOL_CALL, "description": "An assistant turn's calls."},
        "tool_call_id": {"type": "string", "description": "A tool turn: the call it answers."},
        "refusal": nullable({"type": "string"}),
    },
    "required": ["role"],
    "additionalProperties": False,
}

TOOL: Schema = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": named_schema("parameters", "The arguments' JSON Schema (an object)."),
    },
    "required": ["type", "function"],
    "additionalProperties": False,
}

TOOL_CHOICE: Schema = {
    "type": ["string", "object"],
    "description": "none, auto, required, or {\"type\": \"function\", \"function\": {\"name\": ...}}. "
                   "required and a named function are enforced by guided decoding.",
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                     "additionalProperties": False},
    },
    "required": ["type", "function"],
    "additionalProperties": False,
}

RESPONSE_FORMAT: Schema = {
    "type": "object",
    "description": "Structured output: free text, any JSON object, or JSON valid against a JSON Schema "
                   "(by guided decoding: the model can only produce what the schema allows).",
    "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
        "json_schema": named_schema("schema", "A JSON Schema for the completion."),
    },
    "required": ["type"],
    "additionalProperties": False,
}

#: Fields OpenAI defines that Cloudach does not implement yet: accepted only at these values.
NEUTRAL_VALUES: dict[str, list[Any]] = {
    "functions": [None, []],
    "function_call": [None, "none", "auto"],
    "store": [None, False],
    "metadata": [None, {}],
    "service_tier": [None, "auto", "default"],
    "modalities": [None, ["text"]],
    "audio": [None],
    "prediction": [None],
    "reasoning_effort": [None],
    "web_search_options": [None],
}

CREATE_CHAT_COMPLETION_REQUEST: Schema = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "description": "A model id from GET /v1/models."},
        "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
        # int32, as TensorRT-LLM's request_output_len; the model's own limit is checked later.
        "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "seed": nullable({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
        "stop": {
            "type": ["string", "array", "null"],
            "items": {"type": "string"},
            "maxItems": 4,
            "description": "Up to 4 sequences where generation stops; they are not returned.",
        },
        "presence_penalty": nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "frequency_penalty": nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "logit_bias": nullable({
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "Token ids (as strings) mapped to a bias, -100 to 100, added to their logits before "
                           "sampling: -100 in effect bans a token, 100 in effect forces it.",
        }),
        "n": nullable({"type": "integer", "minimum": 1, "maximum": 128,
                       "description": "How many choices to generate; each model has its maximum (8 by default)."}),
        "logprobs": nullable({"type": "boolean", "description": "Return each output token's log probability."}),
        "top_logprobs": nullable({"type": "integer", "minimum": 0, "maximum": 20,
                                  "description": "With logprobs: the most likely tokens at each position, 0 to 20."}),
        "stream": nullable({"type": "boolean"}),
        "stream_options": nullable(
            {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
                "additionalProperties": False,
            }
        ),
        "user": {"type": "string"},
        "response_format": nullable(RESPONSE_FORMAT),
        "tools": nullable({"type": "array", "items": TOOL, "maxItems": 128}),
        "tool_choice": nullable(TOOL_CHOICE),
        "parallel_tool_calls": nullable({"type": "boolean"}),
        **{name: {"description": f"Accepted only as one of {values!r}: not supported yet."}
           for name, values in NEUTRAL_VALUES.items()},
    },
    "required": ["model", "messages"],
    "additionalProperties": False,
}

#: Fields chat and legacy completions define alike.
_COMMON = {k: CREATE_CHAT_COMPLETION_REQUEST["properties"][k] for k in (
    "model", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias", "n",
    "stream", "stream_options", "user")}

CREATE_COMPLETION_REQUEST: Schema = {
    "type": "object",
    "description": "The legacy completions API: the prompt goes to the model as it is, without a chat template.",
    "properties": {
        **_COMMON,
        "prompt": {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1, "maxItems": 32,
                   "description": "A string, or an array of up to 32 strings: n choices for each. Token arrays "
                                  "are not supported."},
        "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1,
                                "description": "Default 16, as OpenAI's."}),
        "echo": nullable({"type": "boolean", "description": "Return the prompt before the completion."}),
        "logprobs": nullable({"type": "integer", "minimum": 0, "maximum": 5,
                              "description": "Log probs of each token and of this many most likely ones."}),
        "best_of": nullable({"type": "integer", "minimum": 1, "maximum": 20,
                             "description": "Only n (no extra candidates) is supported."}),
        "suffix": nullable({"type": "string", "description": "Not supported (insertion): refused unless null."}),
    },
    "required": ["model", "prompt"],
    "additionalProperties": False,
}

USAGE: Schema = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {
            "type": "object",
            "properties": {"cached_tokens": {"type": "integer", "description": "Prompt tokens served from a cached prefix."},
                           "audio_tokens": {"type": "integer"}},
        },
        "completion_tokens_details": {
            "type": "object",
            "properties": {name: {"type": "integer"} for name in (
                "reasoning_tokens", "audio_tokens", "accepted_prediction_tokens", "rejected_prediction_tokens")},
        },
    },
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
}

FINISH_REASON: Schema = {"type": "string", "enum": ["stop", "length", "tool_calls"]}

def _completion(object_name: str, choice: Schema, usage: Schema, description: str = "") -> Schema:
    """chat.completion and chat.completion.chunk share their envelope; only the choices differ."""
    return {
        "type": "object",
        **({"description": description} if description else {}),
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [object_name]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, **choice, "logprobs": {"type": ["object", "null"]}}}},
            "usage": usage,
        },
    }


CHAT_COMPLETION = _completion(
    "chat.completion",
    {
        "message": {
            "type": "object",
            "properties": {
                "role": {"type": "string", "enum": ["assistant"]},
                "content": {"type": ["string", "null"]},
                "refusal": {"type": "null"},
                "tool_calls": {"type": "array", "items": TOOL_CALL},
            },
        },
        "finish_reason": FINISH_REASON,
    },
    USAGE,
)

CHAT_COMPLETION_CHUNK = _completion(
    "chat.completion.chunk",
    {
        "delta": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"},
                                                   "tool_calls": {"type": "array"}}},
        "finish_reason": {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", None]},
    },
    {"anyOf": [USAGE, {"type": "null"}]},
    "One Server-Sent Event `data:` payload of a streamed chat completion.",
)

TEXT_COMPLETION = _completion(
    "text_completion",
    {"text": {"type": "string"}, "finish_reason": {"type": ["string", "null"], "enum": ["stop", "length", None]}},
    {"anyOf": [USAGE, {"type": "null"}]},
    "A legacy completion; streamed, each Server-Sent Event `data:` payload is one of these.",
)

MODEL: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["model"]},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

MODEL_LIST: Schema = {
    "type": "object",
    "properties": {"object": {"type": "string", "enum": ["list"]}, "data": {"type": "array", "items": MODEL}},
}

ERROR_RESPONSE: Schema = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
