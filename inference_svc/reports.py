"""inference_svc's usage report of a generation it ran for the edge: the backstop that records a
request whose edge died holding the stream (billing_svc.store says how the two sources agree)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import propagate

from cloudach.billing.v1 import billing_pb2 as bpb
from cloudach.outbox import UsageOutbox

log = logging.getLogger(__name__)

Report = Callable[[bpb.UsageRecord], Awaitable[None]]


def usage_report(usage_id: str, generation_id: str, model: str, claims: dict[str, Any], prompt_tokens: int,
                 completion_tokens: int, outcome: int, started_at_ms: int) -> bpb.UsageRecord:
    """The report: the caller's key and organization from its verified token (never the request),
    the tokens the model generated (never fewer than the caller's client received)."""
    started, ended = Timestamp(), Timestamp()
    started.FromMilliseconds(started_at_ms)
    ended.FromMilliseconds(int(time.time() * 1000))
    return bpb.UsageRecord(
        request_id=usage_id, generation_id=generation_id, key_id=str(claims.get("sub", "")),
        organization=str(claims.get("org", "")), model=model, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, outcome=outcome, started_at=started, ended_at=ended,
        reporter=bpb.REPORTER_INFERENCE,
    )


def outbox_report(outbox: UsageOutbox, wake) -> Report:
    """Reports through the durable outbox, in the generation's trace; a failed write is logged
    loudly (the edge's own record still counts)."""

    async def report(record: bpb.UsageRecord) -> None:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        try:
            await outbox.add(record, carrier.get("traceparent", ""))
        except Exception:  # noqa: BLE001 - never fail a generation for its backstop
            log.exception("USAGE REPORT NOT STORED: generation %s of %s", record.generation_id, record.request_id)
            return
        wake.set()

    return report
