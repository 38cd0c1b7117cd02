"""inference_svc's settings, read once from the environment. Defaults serve the CPU stack."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from cloudach import defaults as d
from cloudach.config import from_env, setting

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class InferenceConfig:
    #: where the gRPC server listens ("host:0" picks a free port)
    listen_address: str = setting(d.address(d.INFERENCE_PORT), "CLOUDACH_INFERENCE_LISTEN")
    #: Prometheus metrics on 127.0.0.1:this port (0: a free port; -1: not served)
    metrics_port: int = setting(d.INFERENCE_METRICS_PORT, "CLOUDACH_INFERENCE_METRICS_PORT")
    #: Triton gRPC endpoints, comma-separated (host:port, or dns:///name:port for every address a name
    #: resolves to, followed as they change); each stream goes to the least busy ready one
    triton_urls: tuple[str, ...] = setting(("127.0.0.1:8001",), "CLOUDACH_TRITON_URLS")
    #: auth_svc, whose published keys verify the callers' tokens
    auth_target: str = setting(d.address(d.AUTH_PORT), "CLOUDACH_AUTH_TARGET")
    #: billing_svc, told of every generation run for a caller that bills it ("" : none is reported)
    billing_target: str = setting("", "CLOUDACH_INFERENCE_BILLING_TARGET")
    #: file holding inference_svc's own service key, exchanged for the token billing_svc checks
    service_key_file: str = setting("", "CLOUDACH_INFERENCE_SERVICE_KEY_FILE")
    #: the durable outbox of generation reports waiting for billing_svc (SQLite)
    outbox_path: str = setting(f"{d.DATA_DIR}/{d.INFERENCE_OUTBOX}", "CLOUDACH_INFERENCE_OUTBOX_PATH")
    #: longest pause between delivery attempts while billing_svc is unreachable
    outbox_max_backoff_s: float = setting(30.0, "CLOUDACH_INFERENCE_OUTBOX_MAX_BACKOFF_S")
    #: at shutdown, how long the deliverer may go on emptying the outbox
    outbox_flush_s: float = setting(10.0, "CLOUDACH_INFERENCE_OUTBOX_FLUSH_S")
    #: the model registry (TOML)
    models_file: str = setting(str(REPO_ROOT / "deploy" / "inference" / "models.cpu.toml"), "CLOUDACH_MODELS_FILE")
    #: streams served at once; more are refused with RESOURCE_EXHAUSTED, never queued
    max_concurrent_streams: int = setting(256, "CLOUDACH_INFERENCE_MAX_STREAMS")
    #: longest wait for the model's next token (the first one included)
    token_timeout_s: float = setting(60.0, "CLOUDACH_INFERENCE_TOKEN_TIMEOUT_S")
    #: longest a single generation may run
    max_request_s: float = setting(600.0, "CLOUDACH_INFERENCE_MAX_REQUEST_S")
    #: how long in-flight streams may finish after SIGTERM
    shutdown_grace_s: float = setting(600.0, "CLOUDACH_INFERENCE_SHUTDOWN_GRACE_S")
    #: how often Triton's readiness is polled for the health service
    health_poll_s: float = setting(2.0, "CLOUDACH_INFERENCE_HEALTH_POLL_S")

    @classmethod
    def from_env(cls) -> InferenceConfig:
        return from_env(cls)
