"""The `cloudach` command's settings: typed, read from the same variables as the services, with
the defaults the services declare (cloudach.defaults). Command-line options override them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cloudach import defaults as d
from cloudach.config import from_env, setting


@dataclass(frozen=True)
class ClientSettings:
    """Where a command finds the running services, and the key it calls them with."""

    auth_target: str = setting(d.address(d.AUTH_PORT), "CLOUDACH_AUTH_TARGET")
    billing_target: str = setting(d.address(d.BILLING_PORT), "CLOUDACH_BILLING_TARGET")
    inference_target: str = setting(d.address(d.INFERENCE_PORT), "CLOUDACH_INFERENCE_TARGET")
    edge_port: int = setting(d.EDGE_PORT, "CLOUDACH_PORT")
    #: takes precedence over the key file a command is given
    api_key: str = setting("", "CLOUDACH_API_KEY")
    #: the edge's usage outbox, for `cloudach status` when no stack state says where it is
    outbox_path: str = setting("", "CLOUDACH_EDGE_OUTBOX_PATH")

    @classmethod
    def from_env(cls) -> ClientSettings:
        return from_env(cls)


@dataclass(frozen=True)
class StackSettings:
    """What `cloudach up` binds, and hands its children explicitly."""

    #: the HTTP API
    port: int = setting(d.EDGE_PORT, "CLOUDACH_PORT")
    inference_port: int = setting(d.INFERENCE_PORT, "CLOUDACH_INFERENCE_PORT")
    auth_port: int = setting(d.AUTH_PORT, "CLOUDACH_AUTH_PORT")
    billing_port: int = setting(d.BILLING_PORT, "CLOUDACH_BILLING_PORT")
    #: the services' Prometheus ports (0: a free one; -1: not served)
    edge_metrics_port: int = setting(d.EDGE_METRICS_PORT, "CLOUDACH_EDGE_METRICS_PORT")
    inference_metrics_port: int = setting(d.INFERENCE_METRICS_PORT, "CLOUDACH_INFERENCE_METRICS_PORT")
    auth_metrics_port: int = setting(d.AUTH_METRICS_PORT, "CLOUDACH_AUTH_METRICS_PORT")
    billing_metrics_port: int = setting(d.BILLING_METRICS_PORT, "CLOUDACH_BILLING_METRICS_PORT")
    #: Triton's own OpenTelemetry traces go to this OTLP/HTTP URL ("": off)
    triton_trace_url: str = setting("", "CLOUDACH_TRITON_TRACE_URL")
    #: how many of each process (Tritons too) run, as a cluster's replicas would
    replicas: int = setting(1, "CLOUDACH_REPLICAS")
    #: edge processes per edge port (SO_REUSEPORT: the kernel spreads connections), one per core
    edge_workers: int = setting(1, "CLOUDACH_EDGE_WORKERS")
    #: PostgreSQL shared by auth_svc and billing_svc ("": SQLite files in the state directory)
    database_url: str = setting("", "CLOUDACH_DATABASE_URL")
    #: Redis shared by the edges for rate limits ("": each edge limits in its own process)
    redis_url: str = setting("", "CLOUDACH_STACK_REDIS_URL")

    @classmethod
    def from_env(cls) -> StackSettings:
        return from_env(cls)

    def with_options(self, **options: int | str | None) -> StackSettings:
        """These settings with the command line's options that were given."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def ports(self) -> dict[str, int]:
        """Every port the stack binds, by setting name (those not bound at all left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.endswith("port") and getattr(self, f.name) > 0}


def variable(cls: type, name: str) -> str:
    """The environment variable of a setting."""
    return next(f.metadata["env"] for f in dataclasses.fields(cls) if f.name == name)
