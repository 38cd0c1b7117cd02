"""The edge's Prometheus metrics, in its own registry, served at GET /metrics on an address of
their own (CLOUDACH_EDGE_METRICS_PORT), never on the public API's port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cloudach_edge_requests_total", "HTTP requests by route, status and model",
                                ["route", "status", "model"], registry=r)
        self.ttft = Histogram("cloudach_edge_time_to_first_token_seconds", "Arrival at the edge to first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("cloudach_edge_inter_token_latency_seconds", "Time between streamed deltas",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.output_tokens = Counter("cloudach_edge_output_tokens_total", "Completion tokens delivered", ["model"], registry=r)
        self.active_streams = Gauge("cloudach_edge_active_streams", "SSE streams open now", registry=r)
        self.rejections = Counter("cloudach_edge_admission_rejections_total",
                                  "Requests refused at admission: rate limits, capacity", ["reason"], registry=r)
        self.outbox_depth = Gauge("cloudach_edge_billing_outbox_depth", "Usage records waiting for billing_svc", registry=r)
        self.outbox_set_aside = Counter("cloudach_edge_billing_outbox_set_aside_total",
                                        "Usage records set aside: unreadable, or refused by billing_svc (alert on it)",
                                        registry=r)
        self.limiter_mode = Gauge("cloudach_edge_rate_limiter_mode",
                                  "1 for the mode in force: shared (Redis) or local (Redis down)", ["mode"], registry=r)
        self.auth_cache = Counter("cloudach_edge_auth_cache_total",
                                  "Key checks: from the cache (hit), by auth_svc (miss), refused without a lookup "
                                  "(rejected_locally: a bad checksum; lookup_budget_spent)", ["result"], registry=r)


METRICS = web.AppKey("metrics", EdgeMetrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics, in Prometheus's text format."""
    return web.Response(body=generate_latest(request.app[METRICS].registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

