"""OpenAI's organization usage and costs APIs, for admin keys:
GET /v1/organization/usage/completions and GET /v1/organization/costs.

Both read billing_svc's ledger (the data of GET /v1/usage and `cloudach usage`) through one RPC,
AggregateUsage, and page through time buckets as OpenAI does: buckets of bucket_width from
start_time to end_time (default now), `limit` of them per page, `next_page` a cursor to the next.
A bucket without requests comes with no results. Cloudach has no projects or per-user keys:
grouping by project_id or user_id gives null, filtering by them matches nothing.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

from aiohttp import web
from google.protobuf.timestamp_pb2 import Timestamp

from cloudach.billing.v1 import billing_pb2 as pb
from edge.errors import ApiError, bad_request
from edge.http import query_integer
from edge.state import PRINCIPAL, STATE
from edge.usage import MAX_UNIX_S

WIDTHS = {"1m": 60, "1h": 3_600, "1d": 86_400}
#: OpenAI's default and largest `limit` (buckets per page) for each width
LIMITS = {"1m": (60, 1_440), "1h": (24, 168), "1d": (7, 31)}
COST_LIMITS = (7, 180)
USAGE_GROUPS = ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier")
COST_GROUPS = ("project_id", "line_item")


def _values(request: web.Request, name: str) -> list[str]:
    """An array parameter as the SDKs send it (`name[]=a&name[]=b`) or repeated (`name=a&name=b`)."""
    return [*request.query.getall(f"{name}[]", ()), *request.query.getall(name, ())]


def _choices(request: web.Request, name: str, allowed: tuple[str, ...]) -> list[str]:
    values = _values(request, name)
    for value in values:
        if value not in allowed:
            raise bad_request(f"Invalid '{name}': '{value}' is not one of {', '.join(allowed)}.", param=name,
                              code="invalid_value")
    return values


def _cursor(index: int) -> str:
    return "page_" + base64.urlsafe_b64encode(str(index).encode()).decode()


def _page(request: web.Request) -> int:
    raw = request.query.get("page")
    if not raw:
        return 0
    try:
        return int(base64.urlsafe_b64decode(raw.removeprefix("page_").encode()).decode())
    except (ValueError, UnicodeDecodeError):
        raise bad_request("Invalid 'page': not a cursor this API returned.", param="page", code="invalid_value") from None


@dataclass(frozen=True)
class Window:
    """The page's buckets: [first, last) of width_s seconds from start_s, none past end_s."""

    start_s: int
    end_s: int
    width_s: int
    first: int
    last: int
    total: int

    def bounds(self, index: int) -> tuple[int, int]:
        begin = self.start_s + index * self.width_s
        return begin, min(begin + self.width_s, self.end_s)


def _window(request: web.Request, width_s: int, limits: tuple[int, int]) -> Window:
    start = query_integer(request, "start_time", 0, MAX_UNIX_S)
    # by default, up to now (the current second included)
    end = query_integer(request, "end_time", start + 1, MAX_UNIX_S, default=max(start + 1, int(time.time()) + 1))
    limit = query_integer(request, "limit", 1, limits[1], default=limits[0])
    total = -(-(end - start) // width_s)
    first = _page(request)
    if not 0 <= first <= total:
        raise bad_request("Invalid 'page': not a cursor this API returned.", param="page", code="invalid_value")
    return Window(start, end, width_s, first, min(first + limit, total), total)


def _admin(request: web.Request) -> None:
    if not request[PRINCIPAL].admin:
        raise ApiError(401, "You have insufficient permissions for this operation. Missing scopes: api.usage.read. "
                            "The usage and costs APIs need an admin key (role org-admin or platform-admin).")


async def _aggregate(request: web.Request, window: Window, matchless: bool, **query) -> pb.AggregateUsageResponse:
    """The page's sums; none when a filter matches nothing or the page has no bucket."""
    if matchless or window.first == window.last:
        return pb.AggregateUsageResponse()
    principal = request[PRINCIPAL]
    begin, _ = window.bounds(window.first)
    _, end = window.bounds(window.last - 1)
    question = pb.AggregateUsageRequest(organization=principal.organization, start_time=Timestamp(seconds=begin),
                                        end_time=Timestamp(seconds=end), bucket_width_s=window.width_s, **query)
    return await request.app[STATE].billing.AggregateUsage(question, metadata=principal.usage_metadata, timeout=10)


def _pages(window: Window, results: dict[int, list[dict]]) -> dict:
    data = []
    for index in range(window.first, window.last):
        begin, end = window.bounds(index)
        data.append({"object": "bucket", "start_time": begin, "end_time": end, "results": results.get(index, [])})
    more = window.last < window.total
    return {"object": "page", "data": data, "has_more": more, "next_page": _cursor(window.last) if more else None}


async def completions_usage(request: web.Request) -> web.Response:
    _admin(request)
    width = request.query.get("bucket_width", "1d")
    if width not in WIDTHS:
        raise bad_request("Invalid 'bucket_width': expected one of 1m, 1h, 1d.", param="bucket_width",
                          code="invalid_value")
    window = _window(request, WIDTHS[width], LIMITS[width])
    groups = set(_choices(request, "group_by", USAGE_GROUPS))
    batch = request.query.get("batch")
    if batch not in (None, "true", "false"):
        raise bad_request("Invalid 'batch': expected true or false.", param="batch", code="invalid_type")
    query = dict(group_by_key="api_key_id" in groups, group_by_model="model" in groups,
                 group_by_batch="batch" in groups, key_ids=_values(request, "api_key_ids"),
                 models=_values(request, "models"))
    if batch is not None:
        query["batch"] = batch == "true"
    matchless = _values(request, "project_ids") or _values(request, "user_ids")
    reply = await _aggregate(request, window, matchless, **query)
    results: dict[int, list[dict]] = {}
    for g in reply.groups:
        results.setdefault(window.first + g.bucket, []).append({
            "object": "organization.usage.completions.result",
            "input_tokens": g.input_tokens, "output_tokens": g.output_tokens,
            "input_cached_tokens": g.input_cached_tokens, "input_audio_tokens": 0, "output_audio_tokens": 0,
            "num_model_requests": g.requests, "project_id": None, "user_id": None,
            "api_key_id": g.key_id if "api_key_id" in groups else None,
            "model": g.model if "model" in groups else None,
            "batch": g.batch if "batch" in groups else None,
            "service_tier": None,
        })
    return web.json_response(_pages(window, results))


def _amount(picos: int, currency: str) -> dict:
    """OpenAI's amount: a decimal value in the currency (rounded down to a micro-unit, as bills are)."""
    return {"value": (picos // 1_000_000) / 1_000_000, "currency": currency.lower()}


async def costs(request: web.Request) -> web.Response:
    _admin(request)
    if request.query.get("bucket_width", "1d") != "1d":
        raise bad_request("Invalid 'bucket_width': the costs API has daily buckets only (1d).", param="bucket_width",
                          code="invalid_value")
    window = _window(request, WIDTHS["1d"], COST_LIMITS)
    by_item = "line_item" in _choices(request, "group_by", COST_GROUPS)
    matchless = bool(_values(request, "project_ids"))
    reply = await _aggregate(request, window, matchless, group_by_model=by_item, group_by_batch=by_item)
    sums: dict[int, dict[str | None, int]] = {}
    for g in reply.groups:
        items = sums.setdefault(window.first + g.bucket, {})
        suffix = " (batch)" if g.batch else ""
        parts = ((f"{g.model}, input{suffix}", g.input_cost_picos),
                 (f"{g.model}, cached input{suffix}", g.cached_input_cost_picos),
                 (f"{g.model}, output{suffix}", g.output_cost_picos))
        for item, picos in parts:
            key = item if by_item else None
            if by_item and not picos:
                continue
            items[key] = items.get(key, 0) + picos
    currency = reply.currency or "USD"
    results = {index: [{"object": "organization.costs.result", "amount": _amount(picos, currency), "line_item": item,
                        "project_id": None} for item, picos in sorted(items.items(), key=lambda kv: kv[0] or "")]
               for index, items in sums.items()}
    return web.json_response(_pages(window, results))
