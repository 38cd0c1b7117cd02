"""The edge's settings, read once from the environment, with documented defaults."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cloudach.config import env_float, env_int, env_str


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: inference_svc's gRPC address
    inference_target: str = "127.0.0.1:50051"
    #: SHA-256 digests of the accepted API keys; the keys themselves are never kept
    api_key_digests: frozenset[str] = frozenset()
    #: largest request body accepted (413 beyond it)
    max_body_bytes: int = 4 * 1024 * 1024
    #: requests in flight at once; beyond it 503 with Retry-After, never queued
    max_concurrent_requests: int = 1024
    #: deadline of one request, first byte to last token (504, or an error event mid-stream)
    request_timeout_s: float = 600.0
    #: a keep-alive comment is sent this often while a stream waits for its first token
    keepalive_s: float = 15.0
    #: kernel send buffer of a streaming connection: bounds memory per slow reader, and makes
    #: backpressure reach the relay (which then merges deltas) instead of hiding in 4 MB buffers
    stream_send_buffer_bytes: int = 64 * 1024
    #: seconds in-flight requests get to finish after SIGTERM
    shutdown_grace_s: float = 30.0

    @classmethod
    def from_env(cls) -> EdgeConfig:
        d = cls()
        digests = set()
        if os.environ.get("CLOUDACH_API_KEY"):
            digests.add(key_digest(os.environ["CLOUDACH_API_KEY"]))
        if os.environ.get("CLOUDACH_API_KEY_FILE"):
            with open(os.environ["CLOUDACH_API_KEY_FILE"]) as f:
                digests.add(key_digest(f.read().strip()))
        return cls(
            host=env_str("CLOUDACH_EDGE_HOST", d.host),
            port=env_int("CLOUDACH_PORT", d.port),
            inference_target=env_str("CLOUDACH_INFERENCE_TARGET", d.inference_target),
            api_key_digests=frozenset(digests),
            max_body_bytes=env_int("CLOUDACH_EDGE_MAX_BODY_BYTES", d.max_body_bytes),
            max_concurrent_requests=env_int("CLOUDACH_EDGE_MAX_REQUESTS", d.max_concurrent_requests),
            request_timeout_s=env_float("CLOUDACH_EDGE_REQUEST_TIMEOUT_S", d.request_timeout_s),
            keepalive_s=env_float("CLOUDACH_EDGE_KEEPALIVE_S", d.keepalive_s),
            stream_send_buffer_bytes=env_int("CLOUDACH_EDGE_STREAM_SNDBUF_BYTES", d.stream_send_buffer_bytes),
            shutdown_grace_s=env_float("CLOUDACH_EDGE_SHUTDOWN_GRACE_S", d.shutdown_grace_s),
        )
