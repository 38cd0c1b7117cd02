"""GET /v1/usage: billed usage of an organization or a key, for dashboards (platform admins; others
may read their own organization's)."""

from __future__ import annotations

from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from cloudach.billing.v1 import billing_pb2 as pb
from edge.errors import bad_request
from edge.http import query_integer
from edge.state import PRINCIPAL, STATE


def _bucket(b: pb.UsageBucket) -> dict:
    return {"day": b.day or None, "model": b.model or None, "requests": b.requests, "prompt_tokens": b.prompt_tokens,
            "completion_tokens": b.completion_tokens, "cached_tokens": b.cached_tokens, "cost_micros": b.cost_micros}


def usage_json(reply: pb.GetUsageResponse, scope: str, value: str) -> dict:
    """The same JSON for the HTTP API and `cloudach usage --json`."""
    return {
        "object": "usage", scope: value, "currency": reply.currency,
        "data": [_bucket(b) for b in reply.buckets], "total": _bucket(reply.total),
    }


#: the last second a protobuf Timestamp holds (9999-12-31T23:59:59Z)
MAX_UNIX_S = 253_402_300_799


def _time(request: web.Request, name: str) -> Timestamp | None:
    """Unix seconds, when given."""
    if name not in request.query:
        return None
    return Timestamp(seconds=query_integer(request, name, 0, MAX_UNIX_S))


async def get_usage(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    scope = "key_id" if "key_id" in request.query else "organization"
    value = request.query.get(scope) or (principal.organization if scope == "organization" else "")
    start, end = _time(request, "start_time"), _time(request, "end_time")
    if start is not None and end is not None and end.seconds <= start.seconds:
        raise bad_request("Invalid 'end_time': it must be after 'start_time'.", param="end_time", code="invalid_value")
    query = pb.GetUsageRequest(**{scope: value}, start_time=start, end_time=end)
    reply = await request.app[STATE].billing.GetUsage(query, metadata=principal.usage_metadata, timeout=10)
    return web.json_response(usage_json(reply, scope, value))
