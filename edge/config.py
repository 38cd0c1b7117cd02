"""The edge's settings, read once from the environment, with documented defaults."""

from __future__ import annotations

from dataclasses import dataclass

from cloudach import defaults as d
from cloudach.config import from_env, setting


@dataclass(frozen=True)
class EdgeConfig:
    host: str = setting(d.HOST, "CLOUDACH_EDGE_HOST")
    port: int = setting(d.EDGE_PORT, "CLOUDACH_PORT")
    #: Prometheus /metrics on metrics_host:metrics_port, apart from the API (0: a free port; -1: not served)
    metrics_host: str = setting(d.HOST, "CLOUDACH_EDGE_METRICS_HOST")
    metrics_port: int = setting(d.EDGE_METRICS_PORT, "CLOUDACH_EDGE_METRICS_PORT")
    #: inference_svc's gRPC address
    inference_target: str = setting(d.address(d.INFERENCE_PORT), "CLOUDACH_INFERENCE_TARGET")
    #: Generate calls carried on a few shared GenerateMany streams (edge.mux), each message then
    #: carrying many calls' tokens; off: one gRPC stream per call
    multiplex: bool = setting(True, "CLOUDACH_EDGE_MULTIPLEX")
    #: shared streams per edge (spread over inference_svc's replicas like calls)
    mux_streams: int = setting(4, "CLOUDACH_EDGE_MUX_STREAMS")
    #: how often the edge's gRPC channels ping inference_svc, auth_svc and billing_svc
    grpc_keepalive_s: float = setting(30.0, "CLOUDACH_EDGE_GRPC_KEEPALIVE_S")
    #: auth_svc's gRPC address
    auth_target: str = setting(d.address(d.AUTH_PORT), "CLOUDACH_AUTH_TARGET")
    #: how long an answer of auth_svc about a key is reused (a revoked key works at most this long)
    auth_cache_ttl_s: float = setting(10.0, "CLOUDACH_EDGE_AUTH_CACHE_TTL_S")
    #: lookups of keys auth_svc does not know that one client address may cause per minute
    unknown_key_lookups_per_minute: int = setting(60, "CLOUDACH_EDGE_UNKNOWN_KEY_LOOKUPS_PER_MIN")
    #: billing_svc's gRPC address
    billing_target: str = setting(d.address(d.BILLING_PORT), "CLOUDACH_BILLING_TARGET")
    #: the prices budgets are held at: billing_svc's price list (the same file)
    prices_file: str = setting(d.PRICES_FILE, "CLOUDACH_EDGE_PRICES_FILE")
    #: batch jobs and their files: the database every edge replica shares, and where files' bytes go
    batch_database_url: str = setting(f"sqlite:///{d.DATA_DIR}/batches.db", "CLOUDACH_EDGE_BATCH_DATABASE_URL")
    files_dir: str = setting(f"{d.DATA_DIR}/files", "CLOUDACH_EDGE_FILES_DIR")
    #: a batch input file's limits: bytes, requests, bytes a line (OpenAI's are 200 MB, 50,000)
    max_file_bytes: int = setting(64 * 1024 * 1024, "CLOUDACH_EDGE_MAX_FILE_BYTES")
    max_batch_lines: int = setting(50_000, "CLOUDACH_EDGE_MAX_BATCH_LINES")
    max_batch_line_bytes: int = setting(1024 * 1024, "CLOUDACH_EDGE_MAX_BATCH_LINE_BYTES")
    #: batch requests one edge runs at once, and the interactive requests in flight that pause them
    batch_concurrency: int = setting(1, "CLOUDACH_EDGE_BATCH_CONCURRENCY")
    batch_pause_above: int = setting(8, "CLOUDACH_EDGE_BATCH_PAUSE_ABOVE")
    #: how long a runner's hold on a batch lasts unrenewed (another edge takes over after it)
    batch_lease_s: float = setting(15.0, "CLOUDACH_EDGE_BATCH_LEASE_S")
    #: the first pause before a batch request that failed with a 5xx runs again (doubling, at most 60 s)
    batch_retry_s: float = setting(2.0, "CLOUDACH_EDGE_BATCH_RETRY_S")
    #: the durable outbox of usage records waiting for billing_svc (SQLite)
    outbox_path: str = setting(f"{d.DATA_DIR}/{d.EDGE_OUTBOX}", "CLOUDACH_EDGE_OUTBOX_PATH")
    #: file holding the edge's own API key, exchanged for the token it presents to billing_svc
    service_key_file: str = setting("", "CLOUDACH_EDGE_SERVICE_KEY_FILE")
    #: longest pause between delivery attempts while billing_svc is unreachable
    outbox_max_backoff_s: float = setting(30.0, "CLOUDACH_EDGE_OUTBOX_MAX_BACKOFF_S")
    #: at shutdown, how long the deliverer may go on emptying the outbox
    outbox_flush_s: float = setting(10.0, "CLOUDACH_EDGE_OUTBOX_FLUSH_S")
    #: how often the outbox-depth gauge is refreshed
    outbox_depth_every_s: float = setting(5.0, "CLOUDACH_EDGE_OUTBOX_DEPTH_EVERY_S")
    #: Redis shared by the edge replicas for rate limits ("" keeps limits in this process)
    redis_url: str = setting("", "CLOUDACH_REDIS_URL")
    #: how long one Redis call may take before the limiter counts Redis as down
    redis_timeout_s: float = setting(0.25, "CLOUDACH_EDGE_REDIS_TIMEOUT_S")
    #: while Redis is down: how long to limit locally before trying it again
    redis_retry_s: float = setting(5.0, "CLOUDACH_EDGE_REDIS_RETRY_S")
    #: edge processes sharing the limits: with Redis down (or, above 1, without Redis: workers
    #: behind one port) each enforces 1/replicas of every limit
    edge_replicas: int = setting(1, "CLOUDACH_EDGE_REPLICAS")
    #: bind the API's port with SO_REUSEPORT, so several edge workers on one host share it
    reuse_port: bool = setting(False, "CLOUDACH_EDGE_REUSE_PORT")
    #: the window of "per minute" limits (shorter only in tests)
    rate_window_s: float = setting(60.0, "CLOUDACH_EDGE_RATE_WINDOW_S")
    #: completion tokens reserved against the token limit when a request sets no max_tokens
    default_reserved_output_tokens: int = setting(256, "CLOUDACH_EDGE_DEFAULT_RESERVED_TOKENS")
    #: largest request body accepted (413 beyond it)
    max_body_bytes: int = setting(4 * 1024 * 1024, "CLOUDACH_EDGE_MAX_BODY_BYTES")
    #: requests in flight at once; beyond it 503 with Retry-After, never queued
    max_concurrent_requests: int = setting(1024, "CLOUDACH_EDGE_MAX_REQUESTS")
    #: deadline of one request, first byte to last token (504, or an error event mid-stream)
    request_timeout_s: float = setting(600.0, "CLOUDACH_EDGE_REQUEST_TIMEOUT_S")
    #: a keep-alive comment is sent this often while a stream waits for its first token
    keepalive_s: float = setting(15.0, "CLOUDACH_EDGE_KEEPALIVE_S")
    #: kernel send buffer of a streaming connection: bounds memory per slow reader, and makes
    #: backpressure reach the relay (which then merges deltas) instead of hiding in 4 MB buffers
    stream_send_buffer_bytes: int = setting(64 * 1024, "CLOUDACH_EDGE_STREAM_SNDBUF_BYTES")
    #: a streaming client that reads nothing for this long (its buffers full) is disconnected
    stream_write_timeout_s: float = setting(30.0, "CLOUDACH_EDGE_WRITE_TIMEOUT_S")
    #: seconds in-flight requests get to finish after SIGTERM (new connections are refused at once):
    #: by default as long as a request may run, so a rolling update cuts no stream
    shutdown_grace_s: float = setting(600.0, "CLOUDACH_EDGE_SHUTDOWN_GRACE_S")

    @classmethod
    def from_env(cls) -> EdgeConfig:
        return from_env(cls)
