"""Request plumbing shared by the edge's routes: JSON bodies and request ids."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from aiohttp import web

from edge.errors import ApiError, bad_request

#: Per-request storage, typed: the request's id and when the edge started handling it.
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_UNPARSABLE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)"
)
_UNPARSABLE_TEXT = ("We could not parse the JSON body of your request: a string holds an unpaired UTF-16 surrogate "
                    "escape (\\ud800-\\udfff), which is not valid Unicode text.")


#: deeper than any request OpenAI defines needs (a json_schema nests, but not this far)
MAX_JSON_DEPTH = 64
#: a UTF-16 surrogate: JSON may escape one ("\ud800"), UTF-8 cannot carry it (protobuf refuses it)
_SURROGATE = re.compile("[\ud800-\udfff]")


def no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_values(body: Any) -> None:
    """Refuses nesting past MAX_JSON_DEPTH and strings (keys too) that are not valid Unicode text."""
    pending = [(body, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"The JSON body of your request nests deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise bad_request(_UNPARSABLE_TEXT)
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise bad_request(_UNPARSABLE_TEXT)
                pending.append((item, depth + 1))
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)


async def read_json_object(request: web.Request) -> dict:
    """The request's JSON object body: 415 for another content type, 400 if it does not parse.

    aiohttp itself refuses bodies over client_max_size (413) while reading.
    """
    if request.content_type != "application/json":
        raise ApiError(415, f"Invalid content type: {request.content_type or 'none'}. "
                       "Expected 'application/json'.", code="unsupported_media_type")
    raw = await request.read()
    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError):
        raise bad_request(_UNPARSABLE) from None
    except RecursionError:  # nested past what the parser's stack allows
        raise bad_request(f"The JSON body of your request nests deeper than {MAX_JSON_DEPTH} levels.") from None
    if not isinstance(body, dict):
        raise bad_request("Invalid type for request body: expected a JSON object.", code="invalid_type")
    check_values(body)
    return body


def request_id(request: web.Request) -> str:
    """The client's x-request-id when it is a sane token, otherwise a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"


def query_integer(request: web.Request, name: str, low: int, high: int, default: int | None = None) -> int:
    """An integer query parameter within [low, high]; missing: default, or a 400 when it has none."""
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise bad_request(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(f"Invalid '{name}': expected an integer.", param=name, code="invalid_type") from None
    if not low <= value <= high:
        raise bad_request(f"Invalid '{name}': expected a value from {low} to {high}.", param=name,
                          code="invalid_value")
    return value
