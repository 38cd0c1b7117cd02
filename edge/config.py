"""The edge's settings, read once from the environment, with documented defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

from cloudach.config import from_env, setting


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class EdgeConfig:
    host: str = setting("127.0.0.1", "CLOUDACH_EDGE_HOST")
    port: int = setting(8080, "CLOUDACH_PORT")
    #: inference_svc's gRPC address
    inference_target: str = setting("127.0.0.1:50051", "CLOUDACH_INFERENCE_TARGET")
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
    #: seconds in-flight requests get to finish after SIGTERM
    shutdown_grace_s: float = setting(30.0, "CLOUDACH_EDGE_SHUTDOWN_GRACE_S")
    #: SHA-256 digests of the accepted API keys (from CLOUDACH_API_KEY and CLOUDACH_API_KEY_FILE);
    #: the keys themselves are never kept
    api_key_digests: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> EdgeConfig:
        digests = set()
        if os.environ.get("CLOUDACH_API_KEY"):
            digests.add(key_digest(os.environ["CLOUDACH_API_KEY"]))
        if os.environ.get("CLOUDACH_API_KEY_FILE"):
            with open(os.environ["CLOUDACH_API_KEY_FILE"]) as f:
                digests.add(key_digest(f.read().strip()))
        return dataclasses.replace(from_env(cls), api_key_digests=frozenset(digests))
