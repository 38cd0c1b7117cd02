"""The BillingService gRPC servicer."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter

from cloudach.prices import PriceList
from billing_svc.store import Bucket, Group, Grouping, Record, UsageStore
from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.billing.v1 import billing_pb2_grpc
from cloudach.errors import InvalidArgument, PermissionDenied, shown
from cloudach.rpc.auth import require, scopes
from cloudach.tokens import ALL_ORGANIZATIONS, USAGE_READ, USAGE_WRITE

log = logging.getLogger(__name__)

OUTCOMES = {
    pb.OUTCOME_COMPLETED: "completed",
    pb.OUTCOME_CANCELLED_BY_CLIENT: "cancelled_by_client",
    pb.OUTCOME_FAILED_MID_STREAM: "failed_mid_stream",
    pb.OUTCOME_INTERRUPTED: "interrupted",
}


def _record(message: pb.UsageRecord) -> Record:
    for field in ("request_id", "key_id", "organization", "model"):
        if not getattr(message, field):
            raise InvalidArgument(f"record.{field} is required", param=f"record.{field}")
    if message.outcome not in OUTCOMES:
        raise InvalidArgument("record.outcome is required", param="record.outcome")
    if not message.started_at.seconds:
        raise InvalidArgument("record.started_at is required", param="record.started_at")
    return Record(
        request_id=message.request_id, key_id=message.key_id, organization=message.organization,
        model=message.model, prompt_tokens=message.prompt_tokens, completion_tokens=message.completion_tokens,
        outcome=OUTCOMES[message.outcome], started_at_ms=message.started_at.ToMilliseconds(),
        ended_at_ms=message.ended_at.ToMilliseconds(), time_to_first_token_ns=message.time_to_first_token_ns,
        user=message.user, cached_tokens=min(message.cached_tokens, message.prompt_tokens), batch_id=message.batch_id,
    )


def _bucket(b: Bucket) -> pb.UsageBucket:
    return pb.UsageBucket(day=b.day, model=b.model, requests=b.requests, prompt_tokens=b.prompt_tokens,
                          completion_tokens=b.completion_tokens, cost_micros=b.cost_micros, cached_tokens=b.cached_tokens)


def _group(g: Group) -> pb.UsageGroup:
    return pb.UsageGroup(
        bucket=g.bucket, key_id=g.key_id or "", model=g.model or "", batch=bool(g.batch), requests=g.requests,
        input_tokens=g.input_tokens, input_cached_tokens=g.input_cached_tokens, output_tokens=g.output_tokens,
        input_cost_picos=g.input_cost_picos, cached_input_cost_picos=g.cached_input_cost_picos,
        output_cost_picos=g.output_cost_picos)


#: bucket widths OpenAI's usage API knows (1m, 1h, 1d), and the most buckets one query may span
BUCKET_WIDTHS_S = (60, 3_600, 86_400)
MAX_BUCKETS = 10_000


#: the last millisecond a protobuf Timestamp holds (9999-12-31T23:59:59.999Z)
MAX_UNIX_MS = 253_402_300_799_999


def _range(request: pb.GetUsageRequest | pb.AggregateUsageRequest) -> tuple[int, int]:
    start = request.start_time.ToMilliseconds() if request.HasField("start_time") else 0
    end = request.end_time.ToMilliseconds() if request.HasField("end_time") else int(time.time() * 1000) + 86_400_000
    for name, ms in (("start_time", start), ("end_time", end)):
        if not 0 <= ms <= MAX_UNIX_MS:
            raise InvalidArgument(f"{name} must be between 1970 and 9999", param=name)
    if end <= start:
        raise InvalidArgument("end_time must be after start_time", param="end_time")
    return start, end


class BillingService(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, store: UsageStore, prices: PriceList, registry: CollectorRegistry | None = None) -> None:
        self._store = store
        self._prices = prices
        self._unpriced = Counter("cloudach_billing_unpriced_records_total",
                                 "Usage records of a model the price list does not name (recorded at zero: alert on it)",
                                 registry=registry or CollectorRegistry())

    async def RecordUsage(self, request: pb.RecordUsageRequest, context) -> pb.RecordUsageResponse:
        require(USAGE_WRITE)  # a service identity's scope: customers' tokens never carry it
        record = _record(request.record)
        if request.record.reporter == pb.REPORTER_INFERENCE:
            if not request.record.generation_id:
                raise InvalidArgument("record.generation_id is required in a report", param="record.generation_id")
            created = await self._store.report(request.record.generation_id, record, int(time.time() * 1000))
            return pb.RecordUsageResponse(created=created)
        if record.model not in self._prices.models:
            # Recorded all the same (tokens are never dropped), but never silently at zero.
            self._unpriced.inc()
            log.warning("UNPRICED MODEL: usage record %s for model %s recorded at price 0; add it to the price list",
                        record.request_id, shown(record.model))
        created = await self._store.record(record, self._prices.billed(record.model, record.outcome,
                                                                       bool(record.batch_id)))
        if not created:
            log.info("duplicate usage record %s ignored", record.request_id)
        return pb.RecordUsageResponse(created=created)

    async def GetUsage(self, request: pb.GetUsageRequest, context) -> pb.GetUsageResponse:
        claims = require(USAGE_READ)
        scope = request.WhichOneof("scope")
        if scope is None:
            raise InvalidArgument("organization or key_id is required", param="scope")
        value = getattr(request, scope)
        # Without the platform scope a caller reads its own organization only: the whole of it,
        # or one of its keys (another organization's key reads as no usage).
        organization = None if ALL_ORGANIZATIONS in scopes(claims) else str(claims.get("org", ""))
        if scope == "organization" and organization is not None and value != organization:
            raise PermissionDenied("reading another organization's usage needs a platform admin key",
                                   code="admin_required")
        start, end = _range(request)
        buckets = await self._store.usage(scope, value, start, end, organization)
        total = pb.UsageBucket(
            requests=sum(b.requests for b in buckets), prompt_tokens=sum(b.prompt_tokens for b in buckets),
            completion_tokens=sum(b.completion_tokens for b in buckets), cost_micros=sum(b.cost_micros for b in buckets),
            cached_tokens=sum(b.cached_tokens for b in buckets),
        )
        return pb.GetUsageResponse(buckets=[_bucket(b) for b in buckets], total=total, currency=self._prices.currency)

    async def AggregateUsage(self, request: pb.AggregateUsageRequest, context) -> pb.AggregateUsageResponse:
        claims = require(USAGE_READ)
        if not request.organization:
            raise InvalidArgument("organization is required", param="organization")
        if ALL_ORGANIZATIONS not in scopes(claims) and request.organization != str(claims.get("org", "")):
            raise PermissionDenied("reading another organization's usage needs a platform admin key",
                                   code="admin_required")
        if request.bucket_width_s not in BUCKET_WIDTHS_S:
            raise InvalidArgument(f"bucket_width_s must be one of {BUCKET_WIDTHS_S}", param="bucket_width_s")
        start, end = _range(request)
        if (end - start) // (request.bucket_width_s * 1000) > MAX_BUCKETS:
            raise InvalidArgument(f"the range spans more than {MAX_BUCKETS} buckets", param="end_time")
        grouping = Grouping(
            organization=request.organization, start_ms=start, end_ms=end, bucket_ms=request.bucket_width_s * 1000,
            by_key=request.group_by_key, by_model=request.group_by_model, by_batch=request.group_by_batch,
            key_ids=tuple(request.key_ids), models=tuple(request.models),
            batch=request.batch if request.HasField("batch") else None,
        )
        groups = await self._store.aggregate(grouping)
        return pb.AggregateUsageResponse(groups=[_group(g) for g in groups], currency=self._prices.currency)
