"""inference_svc's settings, read once from the environment. Defaults serve the CPU stack."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from cloudach.config import env_float, env_int, env_list, env_str

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class InferenceConfig:
    #: where the gRPC server listens ("host:0" picks a free port)
    listen_address: str = "127.0.0.1:50051"
    #: Triton gRPC endpoints; each stream goes to the least busy one
    triton_urls: tuple[str, ...] = ("127.0.0.1:8001",)
    #: the model registry (TOML)
    models_file: str = str(REPO_ROOT / "deploy" / "inference" / "models.cpu.toml")
    #: streams served at once; more are refused with RESOURCE_EXHAUSTED, never queued
    max_concurrent_streams: int = 256
    #: longest wait for the model's next token (the first one included)
    token_timeout_s: float = 60.0
    #: longest a single generation may run
    max_request_s: float = 600.0
    #: how long in-flight streams may finish after SIGTERM
    shutdown_grace_s: float = 30.0
    #: how often Triton's readiness is polled for the health service
    health_poll_s: float = 2.0

    @classmethod
    def from_env(cls) -> InferenceConfig:
        d = cls()
        return cls(
            listen_address=env_str("CLOUDACH_INFERENCE_LISTEN", d.listen_address),
            triton_urls=tuple(env_list("CLOUDACH_TRITON_URLS", list(d.triton_urls))),
            models_file=env_str("CLOUDACH_MODELS_FILE", d.models_file),
            max_concurrent_streams=env_int("CLOUDACH_INFERENCE_MAX_STREAMS", d.max_concurrent_streams),
            token_timeout_s=env_float("CLOUDACH_INFERENCE_TOKEN_TIMEOUT_S", d.token_timeout_s),
            max_request_s=env_float("CLOUDACH_INFERENCE_MAX_REQUEST_S", d.max_request_s),
            shutdown_grace_s=env_float("CLOUDACH_INFERENCE_SHUTDOWN_GRACE_S", d.shutdown_grace_s),
            health_poll_s=env_float("CLOUDACH_INFERENCE_HEALTH_POLL_S", d.health_poll_s),
        )
