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


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json_object(request: web.Request) -> dict:
    """The request's JSON object body: 415 for another content type, 400 if it does not parse.

    aiohttp itself refuses bodies over client_max_size (413) while reading.
    """
    if request.content_type != "application/json":
        raise ApiError(415, f"Invalid content type: {request.content_type or 'none'}. "
                       "Expected 'application/json'.", code="unsupported_media_type")
    raw = await request.read()
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError):
        raise bad_request(_UNPARSABLE) from None
    if not isinstance(body, dict):
        raise bad_request("Invalid type for request body: expected a JSON object.", code="invalid_type")
    return body


def request_id(request: web.Request) -> str:
    """The client's x-request-id when it is a sane token, otherwise a new one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"
