"""What the edge's handlers share, held in the application under one typed key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from grpc_health.v1.health_pb2_grpc import HealthStub

from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.inference.v1.inference_pb2_grpc import InferenceServiceStub
from cloudach.outbox import UsageOutbox
from edge.admission import Admission
from edge.auth import Authenticator, Principal
from edge.batch_store import BatchStore
from edge.budgets import Budgets
from edge.config import EdgeConfig
from edge.metrics import EdgeMetrics
from edge.ratelimit import Limiter


@dataclass
class EdgeState:
    config: EdgeConfig
    admission: Admission
    metrics: EdgeMetrics = field(default_factory=EdgeMetrics)
    # Set while the app runs (see app.channels): clients of the services behind the edge.
    inference: InferenceServiceStub = field(default=None)  # type: ignore[assignment]
    #: where Generate calls go: the stub, or the Multiplexer carrying them on shared streams
    generate: Any = field(default=None)
    inference_health: HealthStub = field(default=None)  # type: ignore[assignment]
    auth: Authenticator = field(default=None)  # type: ignore[assignment]
    limiter: Limiter = field(default=None)  # type: ignore[assignment]
    budgets: Budgets = field(default=None)  # type: ignore[assignment]
    #: files and batch jobs (None without a service identity to run them as their keys)
    batches: BatchStore | None = None
    #: this edge's runner of batch jobs (edge.batch_runner), stopped first at shutdown
    batch_runner: Any = None
    #: set when a batch is created or cancelled, so the runner does not wait for its next poll
    batch_wake: asyncio.Event = field(default_factory=asyncio.Event)
    billing: BillingServiceStub = field(default=None)  # type: ignore[assignment]
    outbox: UsageOutbox = field(default=None)  # type: ignore[assignment]
    #: set when a record is added, so the deliverer does not wait for its next poll
    outbox_wake: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("state", EdgeState)
#: the authenticated caller of a /v1 request
PRINCIPAL = web.RequestKey("principal", Principal)
#: x-ratelimit-* headers for the response, once the limiter has seen the request
RATE_HEADERS = web.RequestKey("rate_headers", dict)
#: the model a request asked for, for the request counter's label
MODEL = web.RequestKey("model", str)
#: which of max_tokens / max_completion_tokens the request used, to name it in errors
MAX_TOKENS_NAME = web.RequestKey("max_tokens_name", str)
